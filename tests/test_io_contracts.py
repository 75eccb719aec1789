"""Contracts of reading and writing around the models: checkpoint unwrapping and filtering, rpb
resizing, downloads, image folders, the digits split, the command's exit codes, the bench's
results, and the timm feature API (forward_intermediates, pruning, grouping, checkpointing).
Small models only; nothing is downloaded; the bench's timings are stubbed."""

from __future__ import annotations

import json

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from PIL import Image
from timm.models import group_parameters

import dinat
from _train_utils import MODEL, write_pngs
from dinat import bench, cli
from dinat.checkpoints import (
    CheckpointMismatchError,
    load_checkpoint,
    resize_rpb,
    resolve_pretrained_file,
    unwrap_state_dict,
)
from dinat.data import DataError, Digits, ImageFolder

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def nano_file(tmp_path_factory):
    """A dinat_nano state_dict and the .pth file holding it."""
    torch.manual_seed(3)
    state_dict = timm.create_model(MODEL).state_dict()
    path = tmp_path_factory.mktemp("nano") / "nano.pth"
    torch.save(state_dict, path)
    return state_dict, path


# --- checkpoints ------------------------------------------------------------------------------


def test_unwrap_prefers_state_dict_ema_model_ema_state_dict_model_in_that_order() -> None:
    """The wrapper keys are tried in the documented order: state_dict_ema, model_ema (with use_ema),
    then state_dict, then model."""
    wrapper = {name: {"w": torch.full((1,), float(i))} for i, name in enumerate(["model", "state_dict"])}
    assert unwrap_state_dict(wrapper)["w"] == 1
    wrapper.update({"model_ema": {"w": torch.full((1,), 2.0)}, "state_dict_ema": {"w": torch.full((1,), 3.0)}})
    assert unwrap_state_dict(wrapper)["w"] == 3
    assert unwrap_state_dict({k: v for k, v in wrapper.items() if k != "state_dict_ema"})["w"] == 2
    assert unwrap_state_dict(wrapper, use_ema=False)["w"] == 1


def test_a_prefix_is_stripped_only_when_every_key_has_it() -> None:
    """module. / _orig_mod. are wrapper prefixes only when all keys carry them; otherwise keys stay."""
    mixed = {"module.w": torch.zeros(1), "b": torch.zeros(1), "_orig_mod.x": torch.zeros(1)}
    assert unwrap_state_dict(mixed).keys() == mixed.keys()


def test_the_classifier_is_checked_when_the_class_count_is_the_released_one(nano_file, tmp_path) -> None:
    """Only a model with another class count than the pretrained cfg's may skip the file's head: with
    the same count, a file without a head is a CheckpointMismatchError naming head.weight and head.bias."""
    headless = {k: v for k, v in nano_file[0].items() if not k.startswith("head.")}
    torch.save(headless, tmp_path / "headless.pth")
    overlay = dict(file=str(tmp_path / "headless.pth"))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(2\): head.weight, head.bias"):
        timm.create_model(MODEL, pretrained=True, pretrained_cfg_overlay=overlay)
    assert timm.create_model(MODEL, pretrained=True, num_classes=3, pretrained_cfg_overlay=overlay).num_classes == 3


def test_pretrained_weights_load_into_another_in_chans(nano_file) -> None:
    """in_chans=1: the first conv's weight is exempt from the strict check and timm adapts it (sums
    the 3 input channels); everything else loads as it is."""
    state_dict, path = nano_file
    model = timm.create_model(MODEL, pretrained=True, in_chans=1, pretrained_cfg_overlay=dict(file=str(path)))
    conv = model.patch_embed.proj[0].weight
    assert conv.shape[1] == 1
    torch.testing.assert_close(conv, state_dict["patch_embed.proj.0.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.levels[1].blocks[0].attn.rpb, state_dict["levels.1.blocks.0.attn.rpb"])


def test_relative_position_index_buffers_stay_the_models_own(tmp_path) -> None:
    """ViT-rpb's computed relative_position_index is kept whatever the file holds (load_checkpoint and
    timm's pretrained path), while its learned weights are loaded."""
    small = dict(embed_dim=32, depth=1, num_heads=2)
    torch.manual_seed(0)
    source = timm.create_model("vitrpb_small", **small).state_dict()
    own = source["layers.0.attn.relative_position_index"].clone()
    file = dict(source, **{"layers.0.attn.relative_position_index": torch.zeros_like(own)})
    torch.save(file, tmp_path / "w.pth")
    direct = timm.create_model("vitrpb_small", **small)
    load_checkpoint(direct, tmp_path / "w.pth")
    overlay = dict(file=str(tmp_path / "w.pth"))
    pretrained = timm.create_model("vitrpb_small", pretrained=True, pretrained_cfg_overlay=overlay, **small)
    for model in (direct, pretrained):
        assert torch.equal(model.layers[0].attn.relative_position_index, own)
        torch.testing.assert_close(model.layers[0].attn.rpb, source["layers.0.attn.rpb"])


def test_resize_rpb_to_a_rectangular_kernel_keeps_the_dtype() -> None:
    """kernel_size (kh, kw) gives (heads, 2kh-1, 2kw-1) tables, bicubic as for square ones, in the
    table's dtype; an even side is refused whichever it is."""
    table = torch.randn(2, 13, 13, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    out = resize_rpb({"a.attn.rpb": table}, (5, 9))["a.attn.rpb"]
    expected = F.interpolate(table[None].float(), size=(9, 17), mode="bicubic", align_corners=False)[0]
    assert out.shape == (2, 9, 17) and out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected.to(torch.bfloat16))
    for bad in ((7, 4), (4, 7), (7, 1)):
        with pytest.raises(ValueError, match="kernel_size must be odd and >= 3"):
            resize_rpb({"a.attn.rpb": table}, bad)


def test_download_keeps_the_callers_cfg_overlay(monkeypatch, nano_file) -> None:
    """The downloaded file is added to the caller's pretrained_cfg_overlay, not put in its place."""
    monkeypatch.setattr("timm.models._hub.download_cached_file", lambda url, **kwargs: str(nano_file[1]))
    kwargs: dict = {"pretrained_cfg_overlay": {"crop_pct": 1.0, "mean": (0.5, 0.5, 0.5)}}
    resolve_pretrained_file("dinat_mini", kwargs)
    assert kwargs["pretrained_cfg_overlay"] == {"crop_pct": 1.0, "mean": (0.5, 0.5, 0.5), "file": str(nano_file[1])}


# --- factory ----------------------------------------------------------------------------------


def test_create_model_takes_pretrained_tags() -> None:
    """NAME.TAG selects a pretrained tag, as in timm: dinat_large.in22k has a 21841-class head."""
    with torch.device("meta"):
        assert dinat.create_model("dinat_large.in22k").num_classes == 21841
    with pytest.raises(ValueError, match="unknown model 'dinat_larg.in22k'"):
        dinat.create_model("dinat_larg.in22k")


def test_create_model_checkpoint_path_is_strict_and_keeps_the_overlay(nano_file, tmp_path) -> None:
    """checkpoint_path loads strictly (a missing key is an error); with features_only, the caller's
    pretrained_cfg_overlay is kept beside the file."""
    state_dict, path = nano_file
    torch.save({k: v for k, v in state_dict.items() if k != "norm.weight"}, tmp_path / "partial.pth")
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): norm.weight"):
        dinat.create_model(MODEL, checkpoint_path=tmp_path / "partial.pth")
    features = dinat.create_model(
        MODEL, features_only=True, checkpoint_path=path, pretrained_cfg_overlay=dict(crop_pct=0.5)
    )
    assert features.pretrained_cfg["crop_pct"] == 0.5 and features.pretrained_cfg["file"] == str(path)


# --- image folders and digits -------------------------------------------------------------------


def test_sixteen_bit_pgm_keeps_its_levels(tmp_path) -> None:
    """A 16-bit PGM (Pillow mode "I") maps 0..65535 onto 0..255 (/257), not clipped to white."""
    (tmp_path / "a").mkdir()
    ramp = np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "a" / "ramp.pgm")
    with Image.open(tmp_path / "a" / "ramp.pgm") as img:
        assert img.mode == "I"
    levels = np.asarray(ImageFolder(tmp_path)[0][0])
    assert levels.max() == 255
    np.testing.assert_allclose(levels[..., 1], ramp / 257.0, atol=0.5)


def test_conversion_to_rgb_keeps_the_colours(tmp_path) -> None:
    """RGBA drops its alpha (no compositing onto a background), a palette image takes its palette's
    colours, CMYK and grayscale convert as Pillow does: the original loader's img.convert('RGB')."""
    (tmp_path / "a").mkdir()
    rgba = Image.new("RGBA", (4, 4), (200, 100, 50, 0))
    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 180, 240] + [0] * 762)
    palette.info["transparency"] = 1
    images = {"0rgba.png": rgba, "1palette.png": palette, "2cmyk.tif": Image.new("CMYK", (4, 4), (10, 200, 30, 5))}
    images["3gray.png"] = Image.new("L", (4, 4), 77)
    for name, img in images.items():
        img.save(tmp_path / "a" / name)
    ds = ImageFolder(tmp_path)
    got = [np.asarray(ds[i][0])[0, 0].tolist() for i in range(len(ds))]
    assert got == [[200, 100, 50], [10, 180, 240], list(images["2cmyk.tif"].convert("RGB").getpixel((0, 0))), [77] * 3]


def test_image_files_are_found_by_extension_in_any_case_sorted_hidden_ones_skipped(tmp_path) -> None:
    """Upper-case extensions count; hidden files (macOS ._x.jpg) and hidden folders do not; files are
    listed in sorted order whatever order the file system gives."""
    folder = tmp_path / "c"
    names = ["k.png", "B.PNG", "d.JPG", "a.jpeg", "m.png", "Z.png", "e.png", "c.png"]
    names += ["sub/y.png", "sub/b.png", "q/a.png", "A/x.png", "m2/z.png", "m10/z.png", "f/g.png"]
    for name in [*names, ".ipynb_checkpoints/a.png"]:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (2, 2)).save(folder / name, format="PNG")
    (folder / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (folder / "notes.txt").write_text("x")
    ds = ImageFolder(tmp_path)
    expected = sorted(names, key=lambda n: (n.count("/"), *n.split("/")))  # a folder's files, then its subfolders
    assert [p[len(str(folder)) + 1 :] for p, _ in ds.samples] == expected


def test_a_class_folder_unknown_to_the_training_classes_is_an_error(tmp_path) -> None:
    """A validation folder numbered by the training classes may lack one, not add one."""
    write_pngs(tmp_path, classes=2, per_class=1, splits=("val",))
    with pytest.raises(DataError, match=r"class folders \['class_1'\] are not among the training classes"):
        ImageFolder(tmp_path / "val", classes=["class_0"])


def test_digits_pixels_span_0_to_255_and_the_split_is_stratified() -> None:
    """sklearn's 0..16 levels are scaled to 0..255; each class is 20% of the validation split (+-1)."""
    train_set, val_set = Digits("train"), Digits("val")
    assert train_set.images.min() == 0 and train_set.images.max() == 255
    assert np.asarray(val_set[0][0]).max() == val_set.images[0].max() > 16
    per_class = np.bincount(train_set.targets + val_set.targets, minlength=10)
    assert np.all(np.abs(np.bincount(val_set.targets, minlength=10) - 0.2 * per_class) <= 1)


# --- the command --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--epoch", "3"], "dinat train: error: unrecognized arguments: --epoch (did you mean --epochs"),
        (["validate", "--model"], "dinat validate: error: argument --model: expected one argument"),
        (["bench", "--batch", "0"], "dinat bench: error: --batch, --threads, --repeats must be >= 1, got 0"),
    ],
)
def test_argument_errors_are_one_line_that_points_to_help(capsys, argv, message) -> None:
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and err.startswith(message), err
    assert err.endswith(f"(see dinat {argv[0]} --help)\n") and err.count("\n") == 1, err


def test_help_exits_0_and_errors_exit_2_in_one_line(monkeypatch, capsys) -> None:
    """--help prints the usage on stdout with status 0 (no command: on stderr, status 2); an OSError
    (a path that cannot be used) is 'error: MESSAGE' with status 2; an error re-raised from a
    DataLoader worker shows its own message."""
    assert cli.main(["--help"]) == 0
    assert "dinat train" in capsys.readouterr().out
    assert cli.main([]) == 2  # no command: the usage, on stderr as for any error
    printed = capsys.readouterr()
    assert "dinat train" in printed.err and printed.out == ""

    def fails(error):
        def command(argv):
            raise error

        return command

    monkeypatch.setitem(cli.COMMANDS, "train", fails(PermissionError(13, "Permission denied", "/data/x")))
    assert cli.main(["train"]) == 2
    assert capsys.readouterr().err == "error: [Errno 13] Permission denied: '/data/x'\n"
    worker = (
        "Caught DataError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "folder.py", line 40, in load_rgb\n'
        "dinat.data.folder.DataError: cannot read image /d/x.png: broken (use --skip-bad-images to skip such files)\n"
    )
    monkeypatch.setitem(cli.COMMANDS, "train", fails(DataError(worker)))
    assert cli.main(["train"]) == 2
    err = capsys.readouterr().err
    assert err == "error: cannot read image /d/x.png: broken (use --skip-bad-images to skip such files)\n"


# --- bench --------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--threads", "--repeats"])
def test_bench_refuses_zero_threads_or_repeats(flag, tmp_path, capsys) -> None:
    """--threads and --repeats must be >= 1, like --batch: an argument error before anything runs."""
    with pytest.raises(SystemExit):
        bench.main(["--suite", "op", flag, "0", "--output", str(tmp_path)])
    assert "--batch, --threads, --repeats must be >= 1" in capsys.readouterr().err
    assert not (tmp_path / "bench.json").exists()


def test_bench_results_from_stubbed_timings(monkeypatch, tmp_path, capsys) -> None:
    """Ratios are candidate / window (op) and model / Swin-T (img/s, memory); a model without @BACKEND
    runs on --backend; the JSON holds what main returns and the tables print the ratios."""
    seconds = {"fast": 0.002, "window": 0.004, "dense_sdpa": 0.008, MODEL: 0.25, bench.YARDSTICKS[0]: 0.5}
    seconds[MODEL + "@cpu"] = 1.0
    monkeypatch.setattr(bench, "interleaved_medians", lambda candidates, *a, **k: {n: seconds[n] for n in candidates})
    monkeypatch.setattr(bench, "_build", lambda name: torch.nn.Linear(1, 1))
    backends = {}

    def memory(name, batch, threads, device, dtype, backend="auto"):
        backends.setdefault(name, []).append(backend)
        return 50.0 if name == MODEL else 200.0

    monkeypatch.setattr(bench, "peak_train_memory_mb", memory)
    models = [MODEL, MODEL + "@cpu", bench.YARDSTICKS[0]]
    argv = ["--batch", "2", "--repeats", "1", "--threads", "1", "--no-reference", "--backend", "reference"]
    results = bench.main([*argv, "--models", *models, "--output", str(tmp_path)])
    assert json.loads((tmp_path / "bench.json").read_text()) == results
    assert len(results["op"]) == 7
    for row in results["op"]:
        assert row["fast_fwd_vs_window"] == row["fast_fwdbwd_vs_window"] == 0.5
        assert row["dense_sdpa_fwd_vs_window"] == 2.0 and row["fast_fwd_ms"] == pytest.approx(2.0)
    rows = {row["model"]: row for row in results["model"]}
    assert rows[MODEL]["infer_img_s"] == rows[MODEL]["train_img_s"] == 8.0
    assert rows[MODEL]["infer_vs_swin_t"] == rows[MODEL]["train_vs_swin_t"] == 2.0
    assert rows[MODEL]["mem_vs_swin_t"] == 0.25 and rows[MODEL + "@cpu"]["infer_vs_swin_t"] == 0.5
    assert backends == {MODEL: ["reference", "cpu"], bench.YARDSTICKS[0]: ["reference"]}
    out = capsys.readouterr().out
    assert f"{MODEL} | 8.00 | 2.00 | 8.00 | 2.00 | 50.00 | 0.25" in out
    assert results["command"] == "dinat bench " + " ".join([*argv, "--models", *models, "--output", str(tmp_path)])


# --- the timm feature API -----------------------------------------------------------------------


@pytest.fixture
def nano():
    torch.manual_seed(0)
    return timm.create_model(MODEL, drop_path_rate=0.0).eval()


def test_forward_intermediates_norm_format_and_stop_early(nano) -> None:
    """norm=True normalises the last stage's map only; output_fmt NHWC gives the NCHW maps permuted;
    stop_early runs no stage after the last index asked for, and the maps are the same."""
    with torch.no_grad():
        final, maps = nano.forward_intermediates(X)
        _, normed = nano.forward_intermediates(X, norm=True)
        nhwc = nano.forward_intermediates(X, output_fmt="NHWC", intermediates_only=True)
        torch.testing.assert_close(normed[-1], nano.norm(maps[-1].permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        torch.testing.assert_close(final, nano.forward_features(X))
        for a, b in zip(maps[:-1], normed[:-1], strict=True):
            torch.testing.assert_close(a, b)
        assert not torch.allclose(maps[-1], normed[-1])
        for a, b in zip(maps, nhwc, strict=True):
            assert b.shape == (a.shape[0], *a.shape[2:], a.shape[1])
            torch.testing.assert_close(b, a.permute(0, 2, 3, 1))
        ran = []
        nano.levels[2].blocks[0].register_forward_hook(lambda *a: ran.append(2))
        early = nano.forward_intermediates(X, indices=[0, 1], stop_early=True, intermediates_only=True)
        assert ran == []
        torch.testing.assert_close(early, maps[:2])
    with pytest.raises(ValueError, match="output_fmt must be 'NCHW' or 'NHWC', got 'NLC'"):
        nano.forward_intermediates(X, output_fmt="NLC")


def test_prune_intermediate_layers(nano) -> None:
    """Pruning to stages 0 and 2 drops stage 3, stage 2's downsample, the final norm (even with
    prune_norm=False: it is the last stage's) and the head; the kept stages' maps are unchanged."""
    with torch.no_grad():
        _, maps = nano.forward_intermediates(X)
    assert nano.prune_intermediate_layers([0, 2], prune_norm=False) == [0, 2]
    keys = nano.state_dict().keys()
    assert not any(k.startswith(("levels.3", "levels.2.downsample", "norm.", "head.")) for k in keys)
    assert any(k.startswith("levels.1.downsample") for k in keys)
    assert nano.num_classes == 0 and isinstance(nano.head, torch.nn.Identity)
    with torch.no_grad():
        final, pruned = nano.forward_intermediates(X)
    assert len(pruned) == 3
    torch.testing.assert_close(pruned, maps[:3])
    torch.testing.assert_close(final, pruned[2].permute(0, 2, 3, 1))


def test_coarse_group_matcher_has_a_group_per_stage(nano) -> None:
    """coarse=True: the stem, then one group per stage (its downsample included), then norm and head."""
    group_of = group_parameters(nano, nano.group_matcher(coarse=True), reverse=True)
    assert group_of["patch_embed.proj.0.weight"] == 0
    for i in range(4):
        assert group_of[f"levels.{i}.blocks.0.attn.rpb"] == group_of[f"levels.{i}.blocks.1.mlp.fc2.weight"] == i + 1
    assert group_of["levels.2.downsample.norm.weight"] == 3
    assert group_of["norm.weight"] > 4 and group_of["head.weight"] > 4


def test_set_grad_checkpointing_false_turns_it_off(nano) -> None:
    """With checkpointing on, backward runs each block's forward again; off again, it does not."""
    calls = []
    nano.levels[0].blocks[0].register_forward_pre_hook(lambda *a: calls.append(1))
    counts = []
    for enable in (True, False):
        nano.set_grad_checkpointing(enable)
        calls.clear()
        nano(X[..., :32, :32]).sum().backward()
        counts.append(len(calls))
    assert counts == [2, 1]
