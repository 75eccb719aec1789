"""A few steps of the real training loop on PNG images the test writes; fine-tuning; validate."""

from __future__ import annotations

import csv
import json
import math
import os
import shutil

import pytest
import timm
import torch
import yaml

import dinat
from _train_utils import MODEL, TINY, write_pngs
from dinat import train, validate
from dinat.checkpoints import CheckpointError
from dinat.cli import main as cli_main
from dinat.config import ConfigError, make_config
from dinat.factory import compile_model
from dinat.ops import reference


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = write_pngs(tmp_path_factory.mktemp("data"), per_class=8)
    out = tmp_path_factory.mktemp("run")
    summary = train.main([str(root), *TINY, "--epochs", "4", "--output", str(out), "--checkpoint-hist", "2"])
    return root, out, summary


def test_loss_decreases_and_files_appear(trained):
    _, out, summary = trained
    for name in ("last.pth", "model_best.pth", "metrics.csv", "metrics.png", "config.yaml", "summary.json"):
        assert (out / name).is_file(), name
    assert len(list(out.glob("checkpoint-*.pth"))) == 2
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses
    assert json.loads((out / "summary.json").read_text())["val_top1"] == summary["val_top1"]
    assert summary["epoch"] == 4 and summary["epoch_complete"]
    assert not list(out.glob(".*tmp*")), "temporary files left behind"


def test_validate_checkpoint_writes_table_and_json(trained, capsys):
    root, out, summary = trained
    results_file = out / "val.json"
    code = cli_main(
        [
            "validate",
            "--model",
            MODEL,
            "--checkpoint",
            str(out / "last.pth"),
            str(root),
            "--batch-size",
            "8",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--results-file",
            str(results_file),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "top1" in printed and "img_per_s" in printed
    # evaluated as trained: the size and crop of the checkpoint's config, not 224 px
    imagenet = "mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)"
    assert f"images: 32 px, crop_pct 1.0, bicubic, {imagenet} (the training checkpoint's config)" in printed
    results = json.loads(results_file.read_text())
    assert results["images"] == 16 and (results["img_size"], results["crop_pct"]) == (32, 1.0)
    assert results["top1"] == pytest.approx(summary["val_top1"])
    assert results["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)


def test_validate_any_batch_size_and_only_the_trained_model(trained, tmp_path, capsys):
    """validate never mixes images: an odd batch size is fine (mixup's even-batch rule is
    training's). A `dinat train` checkpoint of another architecture is refused by name, even when
    its weights fit the model given (nat_mini's fit dinat_mini's: they differ only in dilation)."""
    root, out, summary = trained
    args = ["validate", "--model", MODEL, str(root), "--workers", "0", "--device", "cpu"]
    odd = ["--batch-size", "7", "--results-file", str(tmp_path / "odd.json")]
    assert cli_main([*args, "--checkpoint", str(out / "last.pth"), *odd]) == 0
    assert json.loads((tmp_path / "odd.json").read_text())["top1"] == pytest.approx(summary["val_top1"])
    ckpt = torch.load(out / "last.pth")
    ckpt["config"]["model"] = "nat_nano"
    torch.save(ckpt, tmp_path / "other.pth")
    assert cli_main([*args, "--checkpoint", str(tmp_path / "other.pth")]) == 2
    assert f"{tmp_path / 'other.pth'} is a checkpoint of nat_nano, not {MODEL}: give --model nat_nano" in (
        capsys.readouterr().err
    )
    ckpt["config"]["model"] = f"{MODEL}.some_tag"  # the same architecture
    torch.save(ckpt, tmp_path / "tagged.pth")
    assert cli_main([*args, "--checkpoint", str(tmp_path / "tagged.pth")]) == 0


def test_random_erasing_follows_mixing(trained, tmp_path, monkeypatch):
    """With mixup/cutmix the batch is erased after it is mixed (the original's loader mixed in its
    collate and erased after it); without, each image is erased in its transform."""
    from timm.data.random_erasing import RandomErasing

    from dinat.data import train_transform

    root, _, _ = trained
    events = []

    class Mixing(train.Mixup):
        def __call__(self, x, y):
            events.append("mix")
            return super().__call__(x, y)

    class Erasing(train.RandomErasing):
        def __call__(self, x):
            events.append("erase")
            return super().__call__(x)

    monkeypatch.setattr(train, "Mixup", Mixing)
    monkeypatch.setattr(train, "RandomErasing", Erasing)
    mixing = ["--mixup", "0.8", "--cutmix", "1.0", "--reprob", "0.5"]
    train.main([str(root), *TINY, *mixing, "--epochs", "1", "--max-steps", "2", "--output", str(tmp_path)])
    assert events == ["mix", "erase"] * 2

    def erasers(**overrides):
        transform = train_transform(make_config({"img_size": 32, **overrides}, check_model=False))
        return [t for t in transform.transforms if isinstance(t, RandomErasing)]

    assert erasers(mixup=0.8, reprob=0.5) == [] and len(erasers(mixup=0.0, cutmix=0.0, reprob=0.5)) == 1


def test_logged_lr_ema_and_constant_schedule(trained, tmp_path):
    """metrics.csv's lr is the one the epoch's last step used; the EMA averages from its first update
    (decay 0.5: half the initial weights, half those after one step); 'constant' has no cooldown."""
    root, _, _ = trained
    cosine = ["--epochs", "1", "--sched", "cosine", "--lr", "1e-3", "--min-lr", "1e-5"]
    summary = train.main([str(root), *TINY, *cosine, "--output", str(tmp_path / "cosine")])
    # 16 images, batch 4: steps t = 0..3 of a 4-step cosine; the last used t = 3, not t = 4 (min_lr)
    assert summary["lr"] == pytest.approx(1e-5 + 0.5 * (1e-3 - 1e-5) * (1 + math.cos(math.pi * 3 / 4)))
    ema = ["--model-ema", "--model-ema-decay", "0.5", "--max-steps", "1", "--drop-path", "0"]
    train.main([str(root), *TINY, *ema, "--epochs", "1", "--output", str(tmp_path / "ema")])
    ckpt = torch.load(tmp_path / "ema" / "last.pth")
    torch.manual_seed(42)  # the run's seed: its initial weights
    initial = timm.create_model(MODEL, num_classes=2, drop_path_rate=0.0).state_dict()
    expected = 0.5 * initial["head.weight"] + 0.5 * ckpt["model"]["head.weight"]
    torch.testing.assert_close(ckpt["state_dict_ema"]["head.weight"], expected)
    constant = ["--sched", "constant", "--epochs", "1", "--cooldown-epochs", "2"]
    assert train.main([str(root), *TINY, *constant, "--output", str(tmp_path / "constant")])["epoch"] == 1


def test_ema_started_at_resume_averages_from_the_resumed_weights(trained, tmp_path):
    """--model-ema given at --resume of a run without one: the EMA starts from the resumed weights
    (as the original's train.py builds it after resuming), not from the initial ones."""
    root, _, _ = trained
    run = [str(root), *TINY, "--epochs", "1", "--drop-path", "0", "--output", str(tmp_path)]
    train.main([*run, "--max-steps", "1"])
    resumed = torch.load(tmp_path / "last.pth")["model"]
    ema = ["--model-ema", "--model-ema-decay", "0.5", "--max-steps", "2", "--resume", str(tmp_path / "last.pth")]
    train.main([*run, *ema])
    ckpt = torch.load(tmp_path / "last.pth")
    expected = 0.5 * resumed["head.weight"] + 0.5 * ckpt["model"]["head.weight"]
    torch.testing.assert_close(ckpt["state_dict_ema"]["head.weight"], expected)


def test_weights_that_do_not_fit_are_named_once(tmp_path):
    """Another model's weights: each key listed once, under the model's name; a file holding no
    weights is named in the error."""
    torch.save(timm.create_model(MODEL, num_classes=3, kernel_size=3).state_dict(), tmp_path / "k3.pth")
    message = (
        rf"k3.pth does not fit {MODEL}: missing \[\], unexpected \[\], other shapes \['levels.0.blocks.0.attn.rpb'"
    )
    with pytest.raises(CheckpointError, match=message):
        validate.load_weights(validate.create_model(MODEL, 3), tmp_path / "k3.pth")
    torch.save({"x": 1}, tmp_path / "junk.pth")
    with pytest.raises(CheckpointError, match=r"junk.pth: checkpoint is neither a state_dict nor a wrapper"):
        validate.load_weights(validate.create_model(MODEL, 3), tmp_path / "junk.pth")


def test_evaluation_preprocessing_as_given_else_trained_else_the_models_cfg():
    """As timm's validate.py: a model's pretrained cfg sets the default size, crop and normalisation
    (384 px, crop 1.0 for the 384 models); a `dinat train` checkpoint's config comes first, a flag
    before both."""
    none = dict.fromkeys(validate.PREPROCESSING)
    imagenet = {"mean": timm.data.IMAGENET_DEFAULT_MEAN, "std": timm.data.IMAGENET_DEFAULT_STD}
    assert validate.resolve_preprocessing("dinat_large_384", none, {}) == (
        {"img_size": 384, "crop_pct": 1.0, "interpolation": "bicubic", **imagenet},
        "dinat_large_384's pretrained cfg",
    )
    cfg = timm.models.get_pretrained_cfg("dinat_mini")
    assert validate.resolve_preprocessing("dinat_mini", none, {})[0] == {
        "img_size": 224,
        "crop_pct": cfg.crop_pct,
        "interpolation": cfg.interpolation,
        **imagenet,
    }
    vit = validate.resolve_preprocessing("vit_tiny_patch16_224.augreg_in21k_ft_in1k", none, {})[0]
    assert vit["mean"] == vit["std"] == (0.5, 0.5, 0.5)
    # a training config as saved (yaml: lists)
    trained = {"img_size": 32, "crop_pct": 1.0, "interpolation": "bilinear", "mean": [0.1] * 3, "std": [0.9] * 3}
    assert validate.resolve_preprocessing("dinat_large_384", dict(none, crop_pct=0.9), trained) == (
        {"img_size": 32, "crop_pct": 0.9, "interpolation": "bilinear", "mean": (0.1,) * 3, "std": (0.9,) * 3},
        "the training checkpoint's config; crop_pct as given",
    )
    given = {"img_size": 64, "crop_pct": 0.95, "interpolation": "bicubic", "mean": (0.2,) * 3, "std": (0.3,) * 3}
    assert validate.resolve_preprocessing("dinat_large_384", given, trained) == (given, "as given")


def test_validate_normalises_as_the_run_trained(trained, tmp_path, capsys):
    """A run trained with its own mean/std is evaluated with them: validate gives the run's numbers."""
    root, _, _ = trained
    norm = ["--mean", "0.1", "0.2", "0.3", "--std", "0.9", "0.8", "0.7"]
    summary = train.main([str(root), *TINY, "--epochs", "1", *norm, "--output", str(tmp_path)])
    args = ["--model", MODEL, "--checkpoint", str(tmp_path / "last.pth"), str(root), "--workers", "0"]
    results = validate.main([*args, "--device", "cpu"])
    assert "mean (0.1, 0.2, 0.3), std (0.9, 0.8, 0.7) (the training checkpoint's config)" in capsys.readouterr().out
    assert results["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    assert results["mean"] == (0.1, 0.2, 0.3) and results["std"] == (0.9, 0.8, 0.7)
    imagenet = ["--device", "cpu", "--mean", "0.485", "0.456", "0.406", "--std", "0.229", "0.224", "0.225"]
    imagenet = validate.main([*args[:-3], *imagenet, *args[-3:]])  # the data folder after --std's three numbers
    assert imagenet["loss"] != pytest.approx(summary["val_loss"], rel=1e-4)


def test_ema_weights_are_where_timm_and_validate_look(trained, tmp_path, capsys):
    """With --model-ema the checkpoint keeps the EMA weights under timm's `state_dict_ema`: the epoch's
    metrics are the EMA's, `validate --use-ema` reproduces them, and timm's pretrained-file route and
    `dinat.create_model(checkpoint_path=...)` both load them."""
    root, _, _ = trained
    args = [str(root), *TINY, "--epochs", "1", "--model-ema", "--model-ema-decay", "0.5", "--output", str(tmp_path)]
    summary = train.main(args)
    ckpt = torch.load(tmp_path / "last.pth")
    assert not torch.equal(ckpt["state_dict_ema"]["head.weight"], ckpt["model"]["head.weight"])
    val = [str(root), "--model", MODEL, "--checkpoint", str(tmp_path / "last.pth"), "--img-size", "32"]
    val += ["--crop-pct", "1.0", "--workers", "0", "--device", "cpu", "--results-file", str(tmp_path / "v.json")]
    assert cli_main(["validate", *val, "--use-ema"]) == 0
    assert json.loads((tmp_path / "v.json").read_text())["loss"] == pytest.approx(summary["val_loss"], rel=1e-4)
    overlay = dict(file=str(tmp_path / "last.pth"), num_classes=2)  # the file's head, not a new one
    for model in (
        timm.create_model(MODEL, pretrained=True, num_classes=2, pretrained_cfg_overlay=overlay),
        dinat.create_model(MODEL, num_classes=2, checkpoint_path=tmp_path / "last.pth"),
    ):
        assert torch.equal(model.head.weight, ckpt["state_dict_ema"]["head.weight"])


def test_attention_backend_option(trained, tmp_path, monkeypatch, capsys):
    """--attention reaches the ops in train and validate (here: every call on the reference)."""
    root, out, summary = trained
    calls = []
    real = reference.na2d
    monkeypatch.setattr(reference, "na2d", lambda *args: calls.append(1) or real(*args))
    common = ["--img-size", "32", "--crop-pct", "1.0", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    args = ["--model", MODEL, "--checkpoint", str(out / "last.pth"), str(root), *common, "--attention", "reference"]
    results = validate.main(args)
    assert calls and results["top1"] == pytest.approx(summary["val_top1"])
    calls.clear()
    train.main([str(root), *TINY, "--max-steps", "1", "--output", str(tmp_path), "--attention", "reference"])
    assert calls
    if not torch.cuda.is_available():  # a backend that cannot run here is a clear error, before training
        argv = ["train", str(root), *TINY, "--output", str(tmp_path / "x"), "--attention", "triton"]
        assert cli_main(argv) == 2
        assert "attention 'triton'" in capsys.readouterr().err
        argv = ["validate", "--model", MODEL, "--checkpoint", str(out / "last.pth"), str(root), *common]
        assert cli_main([*argv, "--attention", "triton"]) == 2
        assert "attention 'triton'" in capsys.readouterr().err


def test_fine_tune_with_a_new_head(trained, tmp_path):
    root, out, _ = trained
    data3 = write_pngs(tmp_path / "three", classes=3, per_class=4)
    summary = train.main(
        [
            str(data3),
            *TINY,
            "--epochs",
            "1",
            "--output",
            str(tmp_path / "ft"),
            "--initial-checkpoint",
            str(out / "last.pth"),
            "--amp",  # bf16 autocast on CPU
        ]
    )
    assert summary["epoch"] == 1
    model = validate.create_model(MODEL, 3)
    new = validate.load_weights(model, out / "last.pth")
    assert new and all(k.startswith("head") for k in new)
    old = torch.load(out / "last.pth", weights_only=True)["model"]
    same = [k for k in old if k not in new]
    assert all(torch.equal(model.state_dict()[k], old[k]) for k in same)


def test_schedulers_per_iteration():
    """cosine: warmup from warmup_lr, then down to min_lr, then cooldown; linear; constant."""
    from timm.scheduler import create_scheduler_v2

    def lrs(sched, warmup):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-3)
        s, n = create_scheduler_v2(
            opt,
            sched=sched,
            decay_rate=1.0,
            num_epochs=10,
            warmup_epochs=warmup,
            cooldown_epochs=2,
            warmup_lr=1e-6,
            min_lr=5e-6,
            step_on_epochs=False,
            updates_per_epoch=4,
        )
        out = []
        for step in range(n * 4):
            s.step_update(step)
            out.append(opt.param_groups[0]["lr"])
        return n, out

    n, cos = lrs("cosine", 2)
    assert n == 12 and cos[0] == pytest.approx(1e-6) and 0.85e-3 < max(cos) <= 1e-3
    assert len(set(cos[:8])) == 8  # changes every iteration, not every epoch
    assert cos[-8:] == [pytest.approx(5e-6)] * 8
    _, lin = lrs("poly", 0)  # `linear` maps to poly with power 1
    assert lin[0] == pytest.approx(1e-3) and lin[20] == pytest.approx(5e-6 + (1e-3 - 5e-6) / 2)
    _, const = lrs("constant", 0)
    assert set(const) == {1e-3}


def test_lr_is_as_given_unless_lr_base():
    from dinat.config import make_config

    assert train.effective_lr(make_config({"lr": 1e-3, "batch_size": 128}, check_model=False), 8) == 1e-3
    base = {"lr_base": 1e-3, "lr_base_size": 1024, "batch_size": 64}
    # timm's rule: the square root of the batch ratio for adaptive optimizers, linear for SGD
    assert train.effective_lr(make_config(base, check_model=False), 4) == pytest.approx(1e-3 * 0.5)
    assert train.effective_lr(make_config({**base, "opt": "lamb"}, check_model=False), 4) == pytest.approx(5e-4)
    assert train.effective_lr(make_config({**base, "opt": "sgd"}, check_model=False), 4) == pytest.approx(2.5e-4)
    linear = make_config({**base, "lr_base_scale": "linear"}, check_model=False)
    assert train.effective_lr(linear, 4) == pytest.approx(1e-3 * 256 / 1024)
    # a run saved before lr_base_scale existed scaled linearly, and resumes so
    assert make_config(resumed=base, check_model=False).lr_base_scale == "linear"
    assert make_config(resumed={**base, "lr_base_scale": ""}, check_model=False).lr_base_scale == ""
    with pytest.raises(ConfigError, match="lr_base_scale.*'cube'"):
        make_config({**base, "lr_base_scale": "cube"}, check_model=False)


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, capsys):
    root = write_pngs(tmp_path / "data", per_class=8)
    out = tmp_path / "nan"
    with pytest.raises(SystemExit) as stop:
        train.main(
            [
                str(root),
                *TINY,
                "--epochs",
                "3",
                "--lr",
                "1e30",
                "--weight-decay",
                "0",
                "--clip-grad",
                "0",
                "--checkpoint-interval",
                "1",
                "--output",
                str(out),
            ]
        )
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "loss is" in err and "last good checkpoint" in err and str(out / "last.pth") in err
    ckpt = torch.load(out / "last.pth", weights_only=True)
    assert ckpt["step"] >= 1
    assert not list(out.glob(".*tmp*"))


def test_nan_loss_is_caught_at_the_next_log_step_before_anything_is_saved(tmp_path, capsys):
    """The loss is checked every --log-interval steps (one host sync), not at every step."""
    root = write_pngs(tmp_path / "data", per_class=8)
    out = tmp_path / "nan"
    argv = [str(root), *TINY, "--epochs", "3", "--lr", "1e30", "--weight-decay", "0", "--clip-grad", "0"]
    with pytest.raises(SystemExit):
        train.main([*argv, "--log-interval", "3", "--output", str(out)])
    err = capsys.readouterr().err
    assert "loss is not finite by epoch 1, step 3; stopping (no checkpoint was saved)" in err
    assert not (out / "last.pth").exists()


@pytest.mark.parametrize(
    "amp_dtype,device,bf16_gpu,expected,scaled",
    [
        ("auto", "cpu", False, torch.bfloat16, False),
        ("auto", "cuda", True, torch.bfloat16, False),
        ("auto", "cuda", False, torch.float16, True),
        ("float16", "cuda", True, torch.float16, True),
        ("bfloat16", "cuda", True, torch.bfloat16, False),
        ("float16", "cpu", False, torch.float16, True),
    ],
)
def test_amp_is_bfloat16_by_default_and_float16_gets_a_scaler(
    amp_dtype, device, bf16_gpu, expected, scaled, monkeypatch
):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: bf16_gpu)
    autocast, scaler = validate.autocast_and_scaler(True, amp_dtype, torch.device(device))
    assert autocast.keywords["dtype"] == expected and autocast.keywords["device_type"] == device
    assert (scaler is not None) == scaled
    with pytest.raises(ConfigError, match="'float8'"):
        validate.autocast_and_scaler(True, "float8", torch.device(device))


def test_device_names(monkeypatch):
    """'cuda' means this process's GPU; a device that is not there or not a device is a clear error."""
    assert validate.pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="'gpu0'"):
        validate.pick_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="'cuda': CUDA is not available"):
            validate.pick_device("cuda")
        assert validate.pick_device("auto") == torch.device("cpu")
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert validate.pick_device("cuda", local_rank=1) == torch.device("cuda", 1)
    assert validate.pick_device("auto", local_rank=0) == torch.device("cuda", 0)
    assert chosen == [torch.device("cuda", 1), torch.device("cuda", 0)]
    with pytest.raises(ConfigError, match="there are 2 CUDA devices"):
        validate.pick_device("cuda:2")


def test_compile_flag_compiles_the_model(trained, tmp_path, monkeypatch):
    """--compile hands the model to torch.compile in train and validate, in the mode given, for
    static shapes (recorded, not compiled here)."""
    root, out, _ = trained
    compiled = []

    def record(model, mode, dynamic):
        assert dynamic is False
        compiled.append(mode)
        return model

    monkeypatch.setattr(torch, "compile", record)
    run = [str(root), *TINY, "--max-steps", "1", "--compile"]
    train.main([*run, "--output", str(tmp_path / "a")])
    train.main([*run, "--compile-mode", "reduce-overhead", "--output", str(tmp_path / "b")])
    common = ["--img-size", "32", "--crop-pct", "1.0", "--batch-size", "8", "--workers", "0", "--device", "cpu"]
    checkpoint = ["--model", MODEL, "--checkpoint", str(out / "last.pth"), str(root), *common]
    validate.main([*checkpoint, "--compile"])
    validate.main([*checkpoint, "--compile", "max-autotune"])
    assert compiled == [None, "reduce-overhead", None, "max-autotune"]
    with pytest.raises(ValueError, match="compile mode must be one of default, reduce-overhead, .*got 'fast'"):
        compile_model(torch.nn.Linear(1, 1), "fast")


@pytest.mark.parametrize("hard_links", [True, False], ids=["links", "copies"])
@pytest.mark.parametrize("eval_metric", ["top1", "loss"])
def test_best_checkpoints_by_eval_metric(tmp_path, monkeypatch, eval_metric, hard_links):
    """checkpoint-E.pth for the best `hist` epochs and model_best.pth for the best one: the highest
    top-1, or the lowest loss."""
    if not hard_links:  # a file system without them: copies

        def no_link(*args):
            raise PermissionError("hard links are not supported here")

        monkeypatch.setattr(os, "link", no_link)
    rows = [
        {"val_top1": 60.0, "val_loss": 0.9},
        {"val_top1": 80.0, "val_loss": 0.5},
        {"val_top1": 70.0, "val_loss": 0.7},
    ]
    best = []
    for epoch, row in enumerate(rows, start=1):
        (tmp_path / "new.pth").write_text(f"epoch {epoch}")
        (tmp_path / "new.pth").replace(tmp_path / "last.pth")  # a new file each epoch, as save_atomic writes
        before, best = best, train.rank_best(best, train.checkpoint_score(row, eval_metric), epoch, hist=2)
        train.keep_best(tmp_path, before, best, epoch)
    assert sorted(p.name for p in tmp_path.glob("checkpoint-*.pth")) == ["checkpoint-2.pth", "checkpoint-3.pth"]
    assert (tmp_path / "model_best.pth").read_text() == "epoch 2"


def test_resumed_run_keeps_its_ranking_of_checkpoints(trained, tmp_path, capsys):
    """last.pth carries the ranking that includes its own epoch: a resumed run keeps --checkpoint-hist
    files and the best epoch's model_best.pth; a finished run has nothing to train."""
    root, _, _ = trained
    common = [str(root), *TINY, "--output", str(tmp_path), "--checkpoint-hist", "1", "--eval-metric", "loss"]

    def best_so_far(ckpt: dict) -> list:
        losses = [h["val_loss"] for h in ckpt["history"]]
        return [(-min(losses), losses.index(min(losses)) + 1)]

    train.main([*common, "--epochs", "2"])
    ckpt = torch.load(tmp_path / "last.pth")
    assert [tuple(b) for b in ckpt["best"]] == best_so_far(ckpt)
    resume = ["--resume", str(tmp_path / "last.pth")]
    assert cli_main(["train", *common, *resume, "--epochs", "2"]) == 2
    assert "is at the end of its 2 epochs; raise --epochs (now 2, plus 0 of cooldown)" in capsys.readouterr().err
    train.main([*common, *resume, "--epochs", "3", "--lr", "1.0"])  # a 3rd epoch that is worse
    ckpt = torch.load(tmp_path / "last.pth")
    (best,) = best_so_far(ckpt)
    assert [p.name for p in tmp_path.glob("checkpoint-*.pth")] == [f"checkpoint-{best[1]}.pth"]
    assert torch.load(tmp_path / "model_best.pth")["history"][-1]["epoch"] == best[1]


def test_resume_from_the_wrong_file_is_a_clear_error(trained, tmp_path, capsys):
    """--resume takes a `dinat train` checkpoint of the same model; other files are named and explained."""
    root, out, _ = trained
    weights = tmp_path / "weights.pth"
    torch.save(torch.load(out / "last.pth")["model"], weights)
    common = [str(root), *TINY, "--output", str(tmp_path / "run")]
    cases = [
        (["--model", "nat_mini", "--resume", str(out / "last.pth")], f"is a checkpoint of {MODEL}, not nat_mini"),
        (["--resume", str(weights)], "is not a `dinat train` checkpoint (it has no model, optimizer,"),
        (["--resume", str(out / "last.pth"), "--num-classes", "5"], "does not fit the model"),
    ]
    for extra, message in cases:
        assert cli_main(["train", *common, *extra]) == 2
        assert message in capsys.readouterr().err
    # an earlier checkpoint of a run, resumed in the run's folder, would replace the later ones
    older = min(out.glob("checkpoint-*.pth"), key=lambda p: int(p.stem.split("-")[1]))
    files = {p: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli_main(["train", str(root), "--resume", str(older)]) == 2
    assert f"{out} holds this run further on than {older} ({out / 'last.pth'}: epoch 4, sample 0)" in (
        capsys.readouterr().err
    )
    assert {p: p.stat().st_mtime_ns for p in out.iterdir()} == files


def test_optimizer_settings_given_at_resume_apply(trained, tmp_path, capsys):
    """Flags given at --resume override the saved config, the optimizer's settings too (its moments
    are the checkpoint's); another optimizer is refused, as its state cannot carry over."""
    root, _, _ = trained
    run = tmp_path / "run"
    train.main([str(root), *TINY, "--epochs", "2", "--max-steps", "2", "--output", str(run)])
    before = torch.load(run / "last.pth")["optimizer"]
    resume = [str(root), "--resume", str(run / "last.pth")]
    assert cli_main(["train", *resume, "--opt", "sgd"]) == 2
    assert f"opt 'sgd': {run / 'last.pth'} was trained with 'adamw'" in capsys.readouterr().err
    train.main([*resume, "--max-steps", "3", "--weight-decay", "0.3", "--opt-betas", "0.8", "0.9", "--opt-eps", "1e-6"])
    after = torch.load(run / "last.pth")["optimizer"]
    assert [g["weight_decay"] for g in after["param_groups"]] == [0.0, 0.3]  # rpb, norms and biases: none
    assert {(tuple(g["betas"]), g["eps"]) for g in after["param_groups"]} == {((0.8, 0.9), 1e-6)}
    assert after["state"][0]["step"] == before["state"][0]["step"] + 1
    # counters kept in the param groups (Lookahead's step) go on from the checkpoint's
    ahead = tmp_path / "lookahead"
    train.main([str(root), *TINY, "--opt", "lookahead_adamw", "--max-steps", "2", "--output", str(ahead)])
    train.main([str(root), "--resume", str(ahead / "last.pth"), "--max-steps", "3"])
    assert {g["lookahead_step"] for g in torch.load(ahead / "last.pth")["optimizer"]["param_groups"]} == {3}


def test_resume_with_another_batch_size_or_more_epochs(trained, tmp_path):
    """A mid-epoch checkpoint records the samples taken, not batches: resumed with another batch size
    (or number of processes), the run takes the rest of the epoch and the step count and learning
    rates of a run that had that batch size from the start."""
    root, _, _ = trained
    common = [str(root), *TINY, "--epochs", "2"]
    partial = train.main([*common, "--max-steps", "3", "--output", str(tmp_path / "a")])  # batch 4 of 16 images
    assert partial["step"] == 3 and partial["epoch"] == 1 and not partial["epoch_complete"]
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["epoch_complete"] is False
    ckpt = torch.load(tmp_path / "a" / "last.pth")
    assert (ckpt["epoch"], ckpt["samples"], ckpt["step"]) == (0, 12, 3)
    shutil.copytree(tmp_path / "a", tmp_path / "c")
    resume = ["--resume", str(tmp_path / "a" / "last.pth")]
    train.main([*common, "--batch-size", "2", "--output", str(tmp_path / "a"), *resume])
    # with a batch larger than the epoch's rest (4 images), that rest is empty: the run goes on
    larger = train.main([*common, "--batch-size", "8", "--resume", str(tmp_path / "c" / "last.pth")])
    assert (larger["epoch"], larger["step"]) == (2, 1 + 2) and len(
        torch.load(tmp_path / "c" / "last.pth")["history"]
    ) == 2
    train.main([*common, "--batch-size", "2", "--output", str(tmp_path / "b")])
    resumed, fresh = (torch.load(tmp_path / run / "last.pth") for run in "ab")
    assert resumed["step"] == fresh["step"] == 16
    assert [h["lr"] for h in resumed["history"]] == [h["lr"] for h in fresh["history"]]
    # the schedule follows the config: a finished run can be extended
    more = train.main(
        [
            *common,
            "--batch-size",
            "2",
            "--epochs",
            "3",
            "--output",
            str(tmp_path / "b"),
            "--resume",
            str(tmp_path / "b" / "last.pth"),
        ]
    )
    assert (more["epoch"], more["step"]) == (3, 24)


def test_unknown_or_abbreviated_flags_are_errors_suggesting_the_close_ones(capsys):
    """argparse would take `--epoch 1` for `--epochs 1`; an unknown flag names the close ones."""
    for command, flag, close in (("train", "--epoch", "--epochs"), ("validate", "--img", "--img-size")):
        with pytest.raises(SystemExit) as stop:
            cli_main([command, "--model", MODEL, "--pretrained", flag, "1"])
        assert stop.value.code == 2
        assert f"unrecognized arguments: {flag} (did you mean {close}" in capsys.readouterr().err


def test_output_folder_errors(trained, tmp_path, capsys):
    """A new run never overwrites another run's checkpoints; paths that cannot be used are errors
    before anything runs; an unknown command says so."""
    root, out, _ = trained
    common = [str(root), *TINY, "--epochs", "1"]
    assert cli_main(["train", *common, "--output", str(out)]) == 2
    assert f"{out} holds a run already: continue it with --resume {out / 'last.pth'}" in capsys.readouterr().err
    run = tmp_path / "run"
    train.main([*common, "--max-steps", "2", "--output", str(run)])
    config = (run / "config.yaml").read_text()
    assert cli_main(["train", *common, "--output", str(out), "--resume", str(run / "last.pth")]) == 2
    message = f"{out} holds another run than {run / 'last.pth'}: leave out --output to continue that run in its folder"
    assert message in capsys.readouterr().err
    # refused before anything is written: the run's folder keeps its config
    assert cli_main(["train", *common, "--resume", str(run / "last.pth"), "--max-steps", "2", "--lr", "9"]) == 2
    assert "nothing to train: " in capsys.readouterr().err and (run / "config.yaml").read_text() == config
    assert cli_main(["train", "--epochs", "1", "--output", str(tmp_path / "none")]) == 2
    assert not (tmp_path / "none").exists()
    # without --output a resumed run goes on in its own folder, with its own settings
    summary = train.main([str(root), "--resume", str(run / "last.pth"), "--max-steps", "3"])
    assert summary["step"] == 3 and torch.load(run / "last.pth")["step"] == 3
    resumed = yaml.safe_load((run / "config.yaml").read_text())
    assert resumed == dict(yaml.safe_load(config), max_steps=3, resume=str(run / "last.pth"))
    (tmp_path / "afile").touch()
    assert cli_main(["train", *common, "--output", str(tmp_path / "afile")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    val = ["validate", str(root), "--model", MODEL, "--checkpoint", str(out / "last.pth")]
    assert cli_main([*val, "--results-file", str(tmp_path / "afile" / "r.json")]) == 2
    assert "not a file path that can be written" in capsys.readouterr().err
    assert cli_main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err


def test_image_size_an_isotropic_model_cannot_take(trained, tmp_path, capsys):
    """Isotropic models take 14x14 tokens: another --img-size is an error before training starts."""
    root, _, _ = trained
    assert cli_main(["train", str(root), *TINY, "--model", "vitrpb_small", "--output", str(tmp_path)]) == 2
    message = "vitrpb_small: isotropic models take 14x14 tokens (224x224 images), got img_size 32"
    assert message in capsys.readouterr().err
    with torch.device("meta"):
        for size in (224, 210):  # 210 px pads to 224
            assert validate.create_model("vitrpb_small", 10, img_size=size).num_classes == 10


def test_deterministic_mode_sets_the_cublas_workspace(monkeypatch):
    """--deterministic on CUDA needs CUBLAS_WORKSPACE_CONFIG (else torch raises at the first matmul);
    a value the user set is kept."""
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.benchmark
    try:
        train.make_deterministic()
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")
        train.make_deterministic()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.benchmark = before[1]


def test_cudnn_picks_the_fastest_convolutions_unless_deterministic(monkeypatch, tmp_path):
    """As timm's train script: cuDNN's benchmark mode (it times its algorithms once per convolution
    shape and keeps the fastest), but not under --deterministic."""

    class DataReached(Exception):
        pass

    def no_data(cfg):
        raise DataReached

    monkeypatch.setattr(train, "build_datasets", no_data)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    before = torch.are_deterministic_algorithms_enabled()
    for flags, expected in (([], True), (["--deterministic"], False)):
        torch.backends.cudnn.benchmark = not expected
        try:
            with pytest.raises(DataReached):
                train.main([str(tmp_path), *TINY, "--output", str(tmp_path / f"run{len(flags)}"), *flags])
        finally:
            torch.use_deterministic_algorithms(before)
        assert torch.backends.cudnn.benchmark is expected


def test_classes_of_model_and_data_must_agree(trained, tmp_path, capsys):
    """validate refuses a checkpoint whose classifier is for another number of classes (a new, random
    head would report chance accuracy); train and validate refuse a head smaller than the labels."""
    root, out, _ = trained  # 2 classes
    three = write_pngs(tmp_path / "three", classes=3, per_class=2)
    validate_args = ["validate", str(three), "--model", MODEL, "--img-size", "32", "--workers", "0", "--device", "cpu"]
    assert cli_main([*validate_args, "--checkpoint", str(out / "last.pth")]) == 2
    assert "its classifier (head.weight, head.bias) is not for 3 classes" in capsys.readouterr().err
    assert cli_main([*validate_args, "--checkpoint", str(out / "last.pth"), "--num-classes", "2"]) == 2
    assert "the data has 3 classes but the model's head has 2" in capsys.readouterr().err
    assert cli_main(["train", str(three), *TINY, "--num-classes", "2", "--output", str(tmp_path / "run")]) == 2
    assert "the data has 3 classes but the model's head has 2" in capsys.readouterr().err
