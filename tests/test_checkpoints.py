"""Checkpoint files: every wrapper and format loads to the same model, through timm's pretrained
path and through dinat.checkpoints; mismatches are listed; rpb resizing; atomic saving. Nothing is
downloaded: every file is written by the test."""

from __future__ import annotations

import argparse
import datetime
import os
import re
import urllib.error

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import dinat
from dinat.checkpoints import (
    CheckpointError,
    CheckpointMismatchError,
    load_checkpoint,
    load_state_dict,
    resize_rpb,
    resolve_pretrained_file,
    save_checkpoint,
    unwrap_state_dict,
    write_text_atomic,
)

X = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def source() -> tuple[dict, torch.Tensor]:
    torch.manual_seed(1)
    model = timm.create_model("dinat_mini").eval()
    with torch.no_grad():
        return model.state_dict(), model(X)


def _write(kind: str, state_dict: dict, path) -> str:
    if kind == "safetensors":
        save_file({k: v.contiguous() for k, v in state_dict.items()}, str(path / "w.safetensors"))
        return str(path / "w.safetensors")
    obj = {
        "bare": state_dict,
        "state_dict": {"state_dict": state_dict, "epoch": 3},
        "ema": {
            "state_dict": {k: torch.zeros_like(v) for k, v in state_dict.items()},
            "state_dict_ema": state_dict,
        },
        "model": {"model": state_dict, "optimizer": {}},
        "dinat-train": {"model": {k: torch.zeros_like(v) for k, v in state_dict.items()}, "state_dict_ema": state_dict},
        "ddp": {f"module.{k}": v for k, v in state_dict.items()},
    }[kind]
    torch.save(obj, path / "w.pth")
    return str(path / "w.pth")


@pytest.mark.parametrize("kind", ["bare", "state_dict", "ema", "model", "dinat-train", "ddp", "safetensors"])
def test_pretrained_file_same_logits(kind: str, source, tmp_path) -> None:
    state_dict, expected = source
    path = _write(kind, state_dict, tmp_path)
    model = timm.create_model("dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()
    direct = timm.create_model("dinat_mini").eval()
    load_checkpoint(direct, path)
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=0, atol=0)
        torch.testing.assert_close(direct(X), expected, rtol=0, atol=0)
    assert load_state_dict(path).keys() == state_dict.keys()


def test_create_model_checkpoint_path(source, tmp_path) -> None:
    state_dict, expected = source
    model = dinat.create_model("dinat_mini", checkpoint_path=_write("ddp", state_dict, tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(X), expected, rtol=0, atol=0)


def test_create_model_features_only_checkpoint_path(source, tmp_path) -> None:
    """features_only drops the final norm and head; the file's other weights load, checked strictly."""
    state_dict = dict(source[0])
    path = _write("dinat-train", state_dict, tmp_path)
    features = dinat.create_model("dinat_mini", features_only=True, checkpoint_path=path).eval()
    full = dinat.create_model("dinat_mini", checkpoint_path=path).eval()
    with torch.no_grad():
        last = full.forward_intermediates(X, intermediates_only=True)[-1]
        torch.testing.assert_close(features(X)[-1], last, rtol=0, atol=0)
    del state_dict["levels.0.blocks.0.attn.rpb"]
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \(1\): levels.0.blocks.0.attn.rpb"):
        dinat.create_model("dinat_mini", features_only=True, checkpoint_path=_write("bare", state_dict, tmp_path))


def test_features_only_takes_a_file_with_another_head(source, tmp_path) -> None:
    """A backbone from a file with any classifier (ImageNet-22K's 21841 classes, a fine-tuned 10):
    features_only has no head, so the file's is not compared; the rest still is, strictly."""
    state_dict = dict(source[0], **{"head.weight": torch.zeros(10, 512), "head.bias": torch.zeros(10)})
    path = _write("bare", state_dict, tmp_path)
    (tmp_path / "full").mkdir()
    full = dinat.create_model("dinat_mini", checkpoint_path=_write("ddp", source[0], tmp_path / "full")).eval()
    through_timm = timm.create_model(
        "dinat_mini", features_only=True, pretrained=True, pretrained_cfg_overlay=dict(file=path)
    ).eval()
    through_dinat = dinat.create_model("dinat_mini", features_only=True, checkpoint_path=path).eval()
    with torch.no_grad():
        expected = full.forward_intermediates(X, intermediates_only=True)
        for features in (through_timm, through_dinat):
            for got, want in zip(features(X), expected, strict=True):
                torch.testing.assert_close(got, want, rtol=0, atol=0)
    state_dict["levels.1.downsample.reduction.weight"] = torch.zeros(3)
    with pytest.raises(CheckpointMismatchError, match=r"levels.1.downsample.reduction.weight: checkpoint \(3,\)"):
        dinat.create_model("dinat_mini", features_only=True, checkpoint_path=_write("bare", state_dict, tmp_path))


@pytest.mark.parametrize("features_only", [False, True], ids=["model", "features_only"])
def test_bad_pretrained_file_is_a_clear_error(tmp_path, features_only: bool) -> None:
    """timm.create_model(pretrained=True, pretrained_cfg_overlay=dict(file=...)), and
    dinat.create_model(checkpoint_path=...) with features_only, which goes that way: the file is
    checked before timm's reader sees it (which fails with a bare KeyError, EOFError or
    AttributeError), and the error names it."""
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    files = {
        "garbage.pth": b"hello",
        "empty.pth": b"",
        "truncated.pth": good.read_bytes()[:300],
        "bad.safetensors": b"not a checkpoint",
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save([1, 2, 3], tmp_path / "list.pth")
    torch.save({"optimizer": {}}, tmp_path / "no_weights.pth")
    expected = {
        "garbage.pth": " is not a readable checkpoint: neither a zip archive nor a pickle",
        "empty.pth": " is not a readable checkpoint: neither a zip archive nor a pickle",
        "truncated.pth": " is not a readable checkpoint: neither a zip archive nor a pickle",
        "bad.safetensors": " is not a readable checkpoint: SafetensorError",
        "list.pth": ": a checkpoint must be a dict, got list",
        "no_weights.pth": ": checkpoint is neither a state_dict nor a wrapper",
    }
    for name, message in expected.items():
        path = tmp_path / name
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}{message}"):
            timm.create_model(
                "dinat_mini", pretrained=True, features_only=features_only, pretrained_cfg_overlay=dict(file=str(path))
            )
        with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}{message}"):
            dinat.create_model("dinat_mini", features_only=features_only, checkpoint_path=path)
    missing = tmp_path / "missing.pth"
    with pytest.raises(FileNotFoundError, match=f"no checkpoint file at {missing}"):
        timm.create_model("dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=str(missing)))
    with pytest.raises(FileNotFoundError, match=f"no checkpoint file at {missing}"):
        dinat.create_model("dinat_mini", features_only=features_only, checkpoint_path=missing)


def test_pretrained_new_head(source, tmp_path) -> None:
    path = _write("bare", source[0], tmp_path)
    model = timm.create_model("dinat_mini", pretrained=True, num_classes=5, pretrained_cfg_overlay=dict(file=path))
    assert model.get_classifier().out_features == 5
    torch.testing.assert_close(model.levels[0].blocks[0].attn.rpb, source[0]["levels.0.blocks.0.attn.rpb"])


def test_wrong_file_lists_keys(source, tmp_path) -> None:
    state_dict = dict(source[0])
    del state_dict["norm.weight"]
    state_dict["extra.weight"] = torch.zeros(1)
    state_dict["levels.0.blocks.0.attn.rpb"] = torch.zeros(2, 21, 21)
    path = _write("bare", state_dict, tmp_path)
    pattern = r"missing keys \(1\): norm.weight(.|\n)*unexpected keys \(1\): extra.weight(.|\n)*"
    pattern += r"levels.0.blocks.0.attn.rpb: checkpoint \(2, 21, 21\), model \(2, 13, 13\)"
    with pytest.raises(CheckpointMismatchError, match=pattern):
        timm.create_model("dinat_mini", pretrained=True, pretrained_cfg_overlay=dict(file=path))
    model = timm.create_model("dinat_mini")
    with pytest.raises(CheckpointMismatchError, match=pattern) as info:
        load_checkpoint(model, path)
    assert info.value.missing == ["norm.weight"] and info.value.unexpected == ["extra.weight"]
    report = load_checkpoint(model, path, strict=False)
    assert report["missing"] == ["norm.weight"] and len(report["mismatched"]) == 1
    torch.testing.assert_close(model.head.weight, source[0]["head.weight"])


def test_bad_files(tmp_path) -> None:
    torch.save({"optimizer": {"lr": 1.0}, "epoch": 1}, tmp_path / "x.pth")
    with pytest.raises(ValueError, match="neither a state_dict nor a wrapper.*optimizer, epoch"):
        load_state_dict(tmp_path / "x.pth")
    with pytest.raises(FileNotFoundError, match="no checkpoint file"):
        load_state_dict(tmp_path / "missing.pth")
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(good.read_bytes()[:300])
    (tmp_path / "x.safetensors").write_bytes(b"not a checkpoint")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    for bad in (truncated, tmp_path / "notes.pth"):
        with pytest.raises(CheckpointError, match=f"{bad} is not a readable checkpoint: neither a zip archive nor a"):
            load_state_dict(bad)
    with pytest.raises(CheckpointError, match="x.safetensors is not a readable checkpoint: SafetensorError"):
        load_state_dict(tmp_path / "x.safetensors")
    torch.save({"state_dict": {"w": torch.ones(2)}, "when": datetime.date(2022, 9, 29)}, tmp_path / "objects.pth")
    with pytest.raises(CheckpointError, match="objects.pth is not a readable checkpoint: it holds a datetime.date"):
        load_state_dict(tmp_path / "objects.pth")


def test_checkpoint_of_timm_train_script(tmp_path) -> None:
    """timm's train.py (the original's) saves its argparse arguments with the weights: loadable
    weights only, EMA weights preferred."""
    checkpoint = {
        "epoch": 299,
        "arch": "dinat_mini",
        "state_dict": {"module.w": torch.zeros(2)},
        "state_dict_ema": {"w": torch.ones(2)},
        "args": argparse.Namespace(model="dinat_mini", lr=1e-3, aa="rand-m9-mstd0.5-inc1"),
    }
    torch.save(checkpoint, tmp_path / "model_best.pth.tar")
    assert load_state_dict(tmp_path / "model_best.pth.tar")["w"].sum() == 2
    assert load_state_dict(tmp_path / "model_best.pth.tar", use_ema=False)["w"].sum() == 0


def test_resize_rpb() -> None:
    torch.manual_seed(0)
    small = timm.create_model("dinat_nano", kernel_size=7).eval()
    resized = resize_rpb(small.state_dict(), 11)
    table = small.state_dict()["levels.1.blocks.0.attn.rpb"]
    expected = F.interpolate(table[None], size=(21, 21), mode="bicubic", align_corners=False)[0]
    torch.testing.assert_close(resized["levels.1.blocks.0.attn.rpb"], expected)
    assert small.state_dict()["levels.1.blocks.0.attn.rpb"].shape == (2, 13, 13)  # input untouched
    large = timm.create_model("dinat_nano", kernel_size=11).eval()
    load_checkpoint(large, resized)  # strict
    torch.testing.assert_close(
        resize_rpb(resized, 11)["levels.0.blocks.0.attn.rpb"], resized["levels.0.blocks.0.attn.rpb"]
    )
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        resize_rpb(resized, 4)


def test_resize_rpb_refuses_full_attention_tables() -> None:
    with torch.device("meta"):
        vit = timm.create_model("vitrpb_small")
    with pytest.raises(ValueError, match=r"layers.0.attn.rpb must be a neighborhood-attention table .*\(12, 27, 27\)"):
        resize_rpb(vit.state_dict(), 11)


@pytest.mark.parametrize("prefixes", ["module._orig_mod.", "_orig_mod.module.", "module.module."])
def test_nested_wrapper_prefixes_are_stripped(prefixes: str) -> None:
    """DDP of a compiled model, a compiled DDP model: every prefix goes, in any order."""
    assert unwrap_state_dict({f"{prefixes}w": torch.zeros(2)}).keys() == {"w"}


def test_save_checkpoint_atomic(tmp_path, monkeypatch) -> None:
    path = tmp_path / "sub" / "ckpt.pth"
    save_checkpoint({"a": torch.ones(2)}, path)
    save_checkpoint({"a": torch.zeros(2)}, path)
    assert torch.load(path)["a"].sum() == 0
    transposed = torch.arange(12.0).view(3, 4).t()  # non-contiguous: safetensors takes contiguous tensors
    save_checkpoint({"w": torch.ones(3), "t": transposed}, tmp_path / "w.safetensors")
    loaded = load_state_dict(tmp_path / "w.safetensors")
    assert loaded["w"].sum() == 3 and torch.equal(loaded["t"], transposed)

    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # not mkstemp's private 0o600

    def broken_save(obj, f):  # torch.save wraps a failed write (disk full) in a RuntimeError
        f.write(b"partial")
        try:
            raise OSError(28, "No space left on device")
        except OSError as error:
            raise RuntimeError("unexpected pos 64 vs 0") from error

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(CheckpointError, match=rf"could not write {path}: .*No space left on device; the previous file"):
        save_checkpoint({"a": torch.ones(2)}, path)
    monkeypatch.undo()
    assert torch.load(path)["a"].sum() == 0  # the old file is intact
    assert sorted(p.name for p in path.parent.iterdir()) == ["ckpt.pth"]  # no temporary left


def test_run_files_are_replaced_atomically(tmp_path, monkeypatch) -> None:
    """config.yaml, summary.json, metrics and results files: a failed write (here, the disk full at
    fsync) keeps the previous file whole and leaves no temporary file."""
    path = tmp_path / "config.yaml"
    write_text_atomic(path, "lr: 0.001\n")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(CheckpointError, match=rf"could not write {path}: .*No space left on device; the previous file"):
        write_text_atomic(path, "lr: 0.002\n" * 1000)
    assert path.read_text() == "lr: 0.001\n" and [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_alternative_url(monkeypatch, tmp_path) -> None:
    tried, cache_dirs = [], []

    def fake_download(url, **kwargs):
        tried.append(url)
        cache_dirs.append(kwargs.get("cache_dir"))
        if "_in1k_224" in url:
            raise urllib.error.HTTPError(url, 404, "Not Found", None, None)
        return str(tmp_path / "w.pth")

    monkeypatch.setattr("timm.models._hub.download_cached_file", fake_download)
    torch.save(timm.create_model("dinat_s_tiny").state_dict(), tmp_path / "w.pth")
    kwargs: dict = {}
    resolve_pretrained_file("dinat_s_tiny", kwargs)
    assert tried[0].endswith("dinat_s_tiny_in1k_224.pth") and tried[1].endswith("dinat_s_tiny_1k_224.pth")
    assert kwargs["pretrained_cfg_overlay"]["file"] == str(tmp_path / "w.pth")
    kwargs = {"pretrained_cfg_overlay": {"file": str(tmp_path / "w.pth")}}  # the user's own file: no download
    resolve_pretrained_file("dinat_s_tiny", kwargs)
    assert kwargs == {"pretrained_cfg_overlay": {"file": str(tmp_path / "w.pth")}} and len(tried) == 2
    # timm.create_model(..., cache_dir=D) downloads into D, the fallback URLs too
    timm.create_model("dinat_s_tiny", pretrained=True, cache_dir=str(tmp_path / "cache"))
    assert cache_dirs == [None, None, str(tmp_path / "cache"), str(tmp_path / "cache")]


def test_read_state_dict_of_a_training_checkpoint(tmp_path) -> None:
    """`dinat validate`'s reader: a `dinat train` checkpoint gives its model weights, or with
    use_ema its EMA weights (an error naming the file when it has none); DDP prefixes are dropped."""
    from dinat.validate import read_state_dict

    model, ema = {"module.w": torch.zeros(2)}, {"w": torch.ones(2)}
    path = tmp_path / "last.pth"
    torch.save({"model": model, "state_dict_ema": ema, "optimizer": {"state": {}}, "epoch": 3}, path)
    assert read_state_dict(path)["w"].sum() == 0 and read_state_dict(path, use_ema=True)["w"].sum() == 2
    torch.save({"model": model, "state_dict_ema": None, "epoch": 3}, path)
    assert list(read_state_dict(path)) == ["w"]
    with pytest.raises(CheckpointError, match=f"{path} has no EMA weights"):
        read_state_dict(path, use_ema=True)


@pytest.mark.parametrize("model", ["dinat_mini", "dinat_s_tiny"], ids=["one-url", "fallback-urls"])
def test_failed_download_is_a_clear_error(monkeypatch, capsys, model) -> None:
    """Offline (or a moved file): the error names the model and every URL tried, and the way out;
    the command exits with 2, no traceback."""
    from dinat.cli import main

    def offline(url, *args, **kwargs):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr("timm.models._hub.download_cached_file", offline)
    monkeypatch.setattr("timm.models._builder.load_state_dict_from_url", offline)
    assert main(["validate", "--model", model, "--pretrained", "--dataset", "digits", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert f"could not download the weights of {model}" in err and f"{model}_in1k_224.pth" in err
    assert "Name or service not known" in err and "--checkpoint" in err and "Traceback" not in err
    with pytest.raises(CheckpointError, match=f"could not download the weights of {model}"):  # the Python API too
        dinat.create_model(model, pretrained=True)


def test_bad_cached_download_is_a_clear_error(monkeypatch, tmp_path, capsys) -> None:
    """A cached download that is truncated (or an HTML page), or holds another model's weights: an
    error naming the cached file (exit 2, no traceback), which the user can then delete."""
    from dinat.cli import main

    cached = tmp_path / "dinat_mini_in1k_224.pth"
    monkeypatch.setattr("timm.models._hub.download_cached_file", lambda url, **kwargs: str(cached))
    command = ["validate", "--model", "dinat_mini", "--pretrained", "--dataset", "digits", "--device", "cpu"]
    torch.save(timm.create_model("dinat_s_tiny").state_dict(), cached)
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"checkpoint does not match the model (pretrained weights of dinat_mini in {cached})" in err
    assert "Traceback" not in err
    cached.write_bytes(cached.read_bytes()[:100_000])
    assert main(command) == 2
    err = capsys.readouterr().err
    assert f"its cached download {cached} is not a readable checkpoint" in err
    assert "delete it to download it again" in err
    with pytest.raises(CheckpointError, match="delete it to download it again"):  # the Python API too
        dinat.create_model("dinat_mini", pretrained=True)
    # a bad file from the first URL: the fallback URLs are tried
    good = tmp_path / "good.pth"
    torch.save(timm.create_model("dinat_s_tiny").state_dict(), good)
    downloads = {"dinat_s_tiny_in1k_224.pth": cached, "dinat_s_tiny_1k_224.pth": good}
    monkeypatch.setattr(
        "timm.models._hub.download_cached_file", lambda url, **kwargs: str(downloads[url.rpartition("/")[2]])
    )
    kwargs: dict = {}
    resolve_pretrained_file("dinat_s_tiny", kwargs)
    assert kwargs["pretrained_cfg_overlay"]["file"] == str(good)
