"""Every configs/ file parses, names a registered model, and holds the values of SPEC section 4."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import timm
import torch
import yaml

import dinat  # noqa: F401
from dinat.config import Config, ConfigError, make_config
from dinat.train import build_scheduler

CONFIGS = Path(__file__).parent.parent / "configs"

RECIPE = dict(  # the original's defaults
    opt="adamw",
    opt_eps=1e-8,
    opt_betas=(0.9, 0.999),
    weight_decay=0.05,
    clip_grad=5.0,
    lr=1e-3,
    lr_base=None,
    batch_size=128,
    sched="cosine",
    sched_epochwise=False,
    min_lr=5e-6,
    warmup_lr=1e-6,
    epochs=300,
    warmup_epochs=20,
    cooldown_epochs=10,
    smoothing=0.1,
    mixup=0.8,
    cutmix=1.0,
    mixup_prob=1.0,
    mixup_switch_prob=0.5,
    mixup_mode="batch",
    aa="rand-m9-mstd0.5-inc1",
    reprob=0.25,
    remode="pixel",
    color_jitter=0.4,
    train_interpolation="random",
    scale=(0.08, 1.0),
    hflip=0.5,
    crop_pct=0.875,
    interpolation="bicubic",
    img_size=224,
    model_ema=False,
    model_ema_decay=0.9998,
    seed=42,
    amp=True,
    mean=(0.485, 0.456, 0.406),
    std=(0.229, 0.224, 0.225),
)
FINE_TUNE = dict(
    lr=5e-5,
    epochs=30,
    warmup_epochs=0,
    cooldown_epochs=0,
    amp=False,
    batch_size=64,
    sched="linear",
    mixup=0.0,
    cutmix=0.0,
    mixup_prob=0.0,
)
SMALL = [
    "nat_mini",
    "nat_tiny",
    "nat_small",
    "nat_base",
    "dinat_mini",
    "dinat_tiny",
    "dinat_small",
    "dinat_base",
    "dinat_s_tiny",
    "dinat_s_small",
    "dinat_s_base",
    "nat_isotropic_small",
    "dinat_isotropic_small",
]
EXPECTED = {
    **{name: {"model": name} for name in SMALL},
    "vit_rpb_small": {"model": "vitrpb_small"},
    "nat_isotropic_base": {"model": "nat_isotropic_base", "model_ema": True, "warmup_epochs": 50},
    "dinat_isotropic_base": {"model": "dinat_isotropic_base", "model_ema": True, "warmup_epochs": 50},
    "vit_rpb_base": {"model": "vitrpb_base", "model_ema": True, "warmup_epochs": 50},
    "dinat_large": {"model": "dinat_large", **FINE_TUNE, "weight_decay": 1e-4},
    "dinat_s_large": {"model": "dinat_s_large", **FINE_TUNE, "weight_decay": 1e-4},
    "dinat_large_384": {
        "model": "dinat_large_384",
        **FINE_TUNE,
        "weight_decay": 1e-10,
        "img_size": 384,
        "crop_pct": 1.0,
    },
    "dinat_s_large_384": {
        "model": "dinat_s_large_384",
        **FINE_TUNE,
        "weight_decay": 1e-5,
        "img_size": 384,
        "crop_pct": 1.0,
    },
}


def test_the_original_configs_are_all_there():
    originals = sorted(p.stem for p in CONFIGS.glob("*.yml") if p.stem != "demo_digits")
    assert originals == sorted(EXPECTED) and len(originals) == 21


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yml")), ids=lambda p: p.stem)
def test_every_config_parses_and_names_a_registered_model(path):
    cfg = make_config(config_file=path)
    assert timm.is_model(cfg.model)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_config_values_equal_the_recipe(name):
    cfg = make_config(config_file=CONFIGS / f"{name}.yml")
    for key, value in {**RECIPE, **EXPECTED[name]}.items():
        got = getattr(cfg, key)
        assert got == (pytest.approx(value) if isinstance(value, (float, tuple)) else value), (name, key)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    _, epochs = build_scheduler(cfg, optimizer, steps_per_epoch=10)
    assert epochs == cfg.epochs + cfg.cooldown_epochs  # the cooldown at min_lr comes after the schedule


def test_defaults_are_the_recipe():
    cfg = Config()
    for key, value in RECIPE.items():
        assert getattr(cfg, key) == (pytest.approx(value) if isinstance(value, (float, tuple)) else value), key


def test_unknown_key_is_a_clear_error_with_suggestions(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text("model: dinat_mini\nwarmup_epoch: 5\n")
    with pytest.raises(ConfigError, match=r"unknown config key 'warmup_epoch'.*'warmup_epochs'"):
        make_config(config_file=bad)
    with pytest.raises(ConfigError, match=r"'weight_decay'"):
        make_config({"wieght_decay": 0.1})


def test_unknown_model_is_a_clear_error_with_suggestions():
    with pytest.raises(ConfigError, match=r"unknown model 'dinat_minni'.*'dinat_mini'"):
        make_config({"model": "dinat_minni"})
    with pytest.raises(ConfigError, match=r"unknown pretrained weights 'dinat_large.in22'.*'dinat_large.in22k'"):
        make_config({"model": "dinat_large.in22"})
    make_config({"model": "dinat_large.in22k_ft_in1k"})


def test_pretrained_weights_that_do_not_exist_are_a_clear_error(capsys):
    from dinat.cli import main

    assert main(["validate", "--model", "dinat_nano", "--pretrained", "--dataset", "digits"]) == 2
    assert "dinat_nano has no pretrained weights" in capsys.readouterr().err


def test_ctrl_c_ends_a_command_without_a_traceback(monkeypatch, capsys):
    """Ctrl-C: one line and exit status 130 (a shell's for SIGINT), not a KeyboardInterrupt traceback."""
    from dinat import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setitem(cli.COMMANDS, "train", interrupted)
    assert cli.main(["train", "--dataset", "digits"]) == 130
    assert capsys.readouterr().err == "interrupted: train stopped\n"


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("sched", "cosin", r"sched: unknown value 'cosin'.*'cosine'"),
        ("attention", "trition", r"attention: unknown value 'trition'.*'triton'"),
        ("amp_dtype", "float8", r"amp_dtype: unknown value 'float8'.*'float16'"),
        ("interpolation", "bicubix", r"interpolation: unknown value 'bicubix'.*'bicubic'"),
        ("train_interpolation", "foo", r"train_interpolation: unknown value 'foo' \(one of .*'random'\)"),
        ("mixup_mode", "element", r"mixup_mode: unknown value 'element'.*'elem'"),  # timm: silently 'batch'
        ("remode", "pixels", r"remode: unknown value 'pixels'.*'pixel'"),
        ("eval_metric", "top-1", r"eval_metric: unknown value 'top-1'.*'top1'"),  # was a KeyError after epoch 1
        ("compile_mode", "reduce_overhead", r"compile_mode: unknown value 'reduce_overhead'.*'reduce-overhead'"),
        ("opt", "adamx", r"opt: unknown timm optimizer 'adamx'.*'adamax'"),
        ("opt", "slow_adamw", r"opt: unknown timm optimizer 'slow_adamw'"),
        ("aa", "rand-q9", r"aa 'rand-q9' is not a timm auto-augment policy"),
        ("aa", "autoaugment", r"aa 'autoaugment' is not a timm auto-augment policy"),
        # sections timm would skip silently
        ("aa", "rand-m9-mstd0.5-inc1-foo", r"aa 'rand-m9-mstd0.5-inc1-foo': section 'foo' is not a setting and a"),
        ("aa", "rand-mfoo", r"section 'mfoo' is not a setting and a number nor a transform set \(tweights, t3a"),
        ("aa", "rand-tfoo", r"section 'tfoo' is not a setting and a number nor a transform set"),
        ("aa", "v0-foo", r"aa 'v0-foo': section 'foo' is not a setting and a number \(timm would ignore it\)"),
        ("opt", "adahessian", r"opt 'adahessian' needs second-order gradients"),  # failed at the first step
        ("opt", "adan", r"opt 'adan' takes 3 betas \(--opt-betas\), got \(0.9, 0.999\); Adan's paper uses"),
    ],
)
def test_unknown_names_are_clear_errors_with_suggestions(key, value, message):
    with pytest.raises(ConfigError, match=message):
        make_config({key: value}, check_model=False)


@pytest.mark.parametrize(
    "key,value",
    [
        ("opt", "lookahead_adamw"),
        ("opt", "SGD"),
        ("aa", "augmix-m5-w4-d2"),
        ("aa", "v0"),
        ("aa", "3a"),
        ("aa", "rand-m9-n3-mstd0.5-inc1-mmax10"),
        ("aa", "rand-tweights-m9"),
        ("aa", "rand-m9-mstd1e2-inc1"),  # timm reads 1e2 as 100
    ],
)
def test_timm_names_are_accepted(key, value):
    assert getattr(make_config({key: value}, check_model=False), key) == value


def test_optimizers_are_built_before_the_run():
    """Adan takes three betas; an optimizer this machine cannot build (apex's without apex) is refused
    when the config is checked, not at the first step."""
    adan = make_config({"opt": "adan", "opt_betas": [0.98, 0.92, 0.99]}, check_model=False)
    assert adan.opt_betas == (0.98, 0.92, 0.99)
    with pytest.raises(ConfigError, match=r"opt 'adamw' takes 2 betas \(--opt-betas\), got \(0.98, 0.92, 0.99\)$"):
        make_config({"opt_betas": [0.98, 0.92, 0.99]}, check_model=False)
    if importlib.util.find_spec("apex") is None:
        with pytest.raises(ConfigError, match=r"opt 'fusedadamw' cannot be built here: AssertionError: .*APEX"):
            make_config({"opt": "fusedadamw"}, check_model=False)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("batch_size", 0, "batch_size must be > 0, got 0"),
        ("batch_size", 3.5, "batch_size must be an integer, got 3.5"),
        ("batch_size", "64", "batch_size must be an integer, got '64'"),
        ("epochs", -1, "epochs must be > 0, got -1"),
        ("epochs", 5, "warmup_epochs 20 is not below epochs 5: the lr would never leave its warmup"),
        ("log_interval", 0, "log_interval must be > 0, got 0"),
        ("checkpoint_interval", -5, "checkpoint_interval must be >= 0, got -5"),
        ("workers", -1, "workers must be >= 0, got -1"),
        ("lr", 0, "lr must be > 0, got 0.0"),
        ("lr", "fast", "lr must be a number, got 'fast'"),
        ("clip_grad", -1.0, "clip_grad must be >= 0, got -1.0"),
        ("reprob", 1.5, "reprob must be <= 1, got 1.5"),
        ("drop_path", -0.1, "drop_path must be >= 0, got -0.1"),
        ("scale", [1.0, 0.08], r"scale must be two numbers a, b with 0.0 < a <= b <= 1.0, got \(1.0, 0.08\)"),
        ("ratio", [0.75], r"ratio must be two numbers a, b with 0.0 < a <= b, got \(0.75,\)"),
        ("opt_betas", [0.9, 1.0], r"opt_betas must be two numbers in \[0, 1\) \(three for Adan\), got \(0.9, 1.0\)"),
        ("seed", -1, r"seed must be in \[0, 2\*\*32\), got -1"),
        ("seed", 2**32, r"seed must be in \[0, 2\*\*32\), got 4294967296"),
        ("mean", 0.5, r"mean must be three numbers \(R, G, B\), got 0.5"),
        ("std", [0.2, 0.0, 0.2], r"std must be > 0, got \(0.2, 0.0, 0.2\)"),
        ("batch_size", 5, r"batch_size must be even with mixup or cutmix \(timm mixes the batch in pairs\), got 5"),
        ("lr", float("inf"), "lr must be finite, got inf"),
        ("weight_decay", float("nan"), "weight_decay must be finite, got nan"),
        ("amp", "false", "amp must be true or false, got 'false'"),  # a string: it would switch AMP on
        ("model_ema", "off", "model_ema must be true or false, got 'off'"),
        ("pretrained", 1, "pretrained must be true or false, got 1"),
        ("sched", None, "sched must be a string, got None"),
        ("output", 5, "output must be a string, got 5"),
        ("model", 3, "model must be a string, got 3"),
    ],
)
def test_bad_values_are_clear_errors(tmp_path, key, value, message):
    """A value of the wrong type or out of range, from a file or the command line, names the key and value."""
    with pytest.raises(ConfigError, match=message):
        make_config({key: value})
    config = tmp_path / "bad.yml"
    config.write_text(yaml.safe_dump({key: value}))
    with pytest.raises(ConfigError, match=message):
        make_config(config_file=config)


def test_malformed_yaml_is_a_clear_error(tmp_path):
    config = tmp_path / "bad.yml"
    config.write_text("{lr: 1e-3\n")
    with pytest.raises(ConfigError, match=f"{config} is not valid YAML: ") as info:
        make_config(config_file=config)
    assert f'in "{config}", line 2' in str(info.value)  # where, in the file's name


def test_odd_batch_without_mixing():
    assert make_config({"batch_size": 5, "mixup": 0.0, "cutmix": 0.0}).batch_size == 5


def test_command_line_overrides_the_file(tmp_path):
    from dinat.train import build_parser, config_from_args

    args = build_parser().parse_args(
        ["-c", str(CONFIGS / "dinat_mini.yml"), "data", "--lr", "3e-4", "--no-amp", "--scale", "0.5", "1.0"]
    )
    cfg = config_from_args(args)
    assert (cfg.model, cfg.lr, cfg.amp, cfg.scale, cfg.warmup_epochs) == ("dinat_mini", 3e-4, False, (0.5, 1.0), 20)


def test_cli_reports_config_errors(capsys):
    from dinat.cli import main

    assert main(["train", "--dataset", "digits", "--model", "dinat_nanoo"]) == 2
    assert "did you mean 'dinat_nano'" in capsys.readouterr().err


def test_cli_reports_checkpoint_errors(tmp_path, capsys):
    """A missing --resume / --initial-checkpoint is a config error before any work; an unreadable
    --checkpoint names the file (exit 2, no traceback)."""
    from dinat.cli import main

    missing = tmp_path / "none.pth"
    for flag, key in (("--resume", "resume"), ("--initial-checkpoint", "initial_checkpoint")):
        assert main(["train", "--dataset", "digits", "--model", "dinat_nano", flag, str(missing)]) == 2
        assert f"error: {key}: no checkpoint file at {missing}" in capsys.readouterr().err
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["validate", "--dataset", "digits", "--model", "dinat_nano", "--checkpoint", str(garbage)]) == 2
    assert f"error: {garbage} is not a readable checkpoint" in capsys.readouterr().err
