"""Training configuration: the original recipe's defaults, YAML files and command-line overrides.

`Config` holds every setting of `dinat train`. Its defaults are the recipe of the original
release (SPEC section 4); a YAML file from `configs/` overrides some of them (with the original's
key names), and `--flags` on the command line override both. An unknown key or model name is an
error that names the close matches.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .ops import BACKENDS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Config:
    # model
    model: str = "dinat_mini"
    pretrained: bool = False
    initial_checkpoint: str = ""
    num_classes: int | None = None  # None: the number of classes of the dataset
    drop_path: float | None = None  # None: the model's own rate
    # data
    data_dir: str = ""
    dataset: str = ""  # "" (image folders), "digits", or a timm dataset name, e.g. "torch/cifar10"
    train_split: str = "train"
    val_split: str = ""  # "": val/ or validation/
    skip_bad_images: bool = False
    img_size: int = 224
    crop_pct: float = 0.875
    interpolation: str = "bicubic"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    workers: int = 4
    # optimisation
    epochs: int = 300
    batch_size: int = 128  # per process
    lr: float = 1e-3  # used as given (it was tuned for a total batch of 1024)
    lr_base: float | None = None  # if set: lr = lr_base * (total batch / lr_base_size), or its square root
    lr_base_size: int = 1024
    lr_base_scale: str = ""  # "": timm's rule, sqrt for adaptive optimizers (ada*, lamb), else linear
    opt: str = "adamw"
    opt_eps: float = 1e-8
    opt_betas: tuple[float, ...] = (0.9, 0.999)
    weight_decay: float = 0.05
    clip_grad: float | None = 5.0
    sched: str = "cosine"  # cosine | linear | constant
    sched_epochwise: bool = False  # False: the lr changes every iteration, as in the original
    warmup_lr: float = 1e-6
    min_lr: float = 5e-6
    warmup_epochs: int = 20
    cooldown_epochs: int = 10
    # regularisation and augmentation
    smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    aa: str = "rand-m9-mstd0.5-inc1"
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    color_jitter: float = 0.4
    train_interpolation: str = "random"
    scale: tuple[float, ...] = (0.08, 1.0)
    ratio: tuple[float, ...] = (3.0 / 4.0, 4.0 / 3.0)
    hflip: float = 0.5
    model_ema: bool = False
    model_ema_decay: float = 0.9998
    # run
    seed: int = 42
    amp: bool = True
    amp_dtype: str = "auto"  # auto: bfloat16 (float16 on GPUs without it); float16 gets a grad scaler
    device: str = "auto"
    threads: int = 0  # CPU threads per process (0: torch's default)
    compile: bool = False
    compile_mode: str = "default"
    channels_last: bool = False
    attention: str = "auto"  # neighborhood-attention backend: auto | cpu | flex | triton | reference
    deterministic: bool = False
    output: str = "output/train"  # with resume: the checkpoint's folder
    resume: str = ""  # a last.pth (or checkpoint-N.pth) of `dinat train` to continue
    checkpoint_interval: int = 0  # also save last.pth every N steps (0: only at epoch ends)
    checkpoint_hist: int = 4  # best checkpoints kept (the original's default)
    eval_metric: str = "top1"
    max_steps: int = 0  # stop after this many optimizer steps in total (0: train all epochs)
    log_interval: int = 10  # steps between progress-bar updates and checks that the loss is finite


CONFIG_KEYS = [f.name for f in fields(Config)]
AMP_DTYPES = ("auto", "float16", "bfloat16")
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")  # timm's names
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile's
# The settings that take one of a few names (timm accepts some wrong ones silently, or fails late).
CHOICES = {
    "sched": ("cosine", "linear", "constant"),
    "lr_base_scale": ("", "linear", "sqrt"),
    "attention": BACKENDS,
    "amp_dtype": AMP_DTYPES,
    "interpolation": INTERPOLATIONS,
    "train_interpolation": (*INTERPOLATIONS, "random"),
    "mixup_mode": ("batch", "pair", "elem"),
    "remode": ("const", "rand", "pixel"),
    "eval_metric": ("top1", "top5", "loss"),
    "compile_mode": COMPILE_MODES,
}


# What a setting's name and default do not say (shown by --help).
HELP = {
    "lr_base": "lr = lr_base * (total batch / lr_base_size), or its square root (see lr_base_scale)",
    "lr_base_scale": "'': the square root for adaptive optimizers (ada*, lamb), linear otherwise (timm's rule)",
    "compile_mode": "torch.compile's mode with --compile; on CUDA 'reduce-overhead' replays CUDA graphs "
    "(an H200 trained dinat_mini 2.3x as fast as eagerly: BENCHMARKS.md)",
}


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


def _suggest(word: str, choices, what: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=4, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return f"unknown {what} {word!r}{hint}"


def check_model_name(name: str, pretrained: bool = False) -> None:
    """Raise ConfigError, naming close matches, when timm has no model called `name` (with its
    `.tag`, if any), or, with ``pretrained``, no weights for it."""
    import timm

    import dinat  # noqa: F401  (registers the DiNAT family in timm)

    if not timm.is_model(name):
        raise ConfigError(_suggest(name, timm.list_models(), "model"))
    arch = name.partition(".")[0]
    weights = timm.list_pretrained(f"{arch}.*")
    if "." in name and name not in weights:
        raise ConfigError(
            _suggest(name, weights, "pretrained weights") + f" (those of {arch}: {', '.join(weights) or 'none'})"
        )
    if pretrained and not weights:
        raise ConfigError(f"{name} has no pretrained weights: train it, or start from --initial-checkpoint")


def _coerce(name: str, value: Any) -> Any:
    default = Config.__dataclass_fields__[name].default
    if isinstance(default, tuple) and isinstance(value, list):
        return tuple(value)
    numeric = isinstance(default, float) or name in ("lr_base", "drop_path", "clip_grad")
    if numeric and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)  # YAML reads 1e-3 as a string
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {value!r}") from None
    return value


# Ranges of the numeric settings (None where a setting may be None means: not set).
_POSITIVE = set(
    "img_size epochs batch_size lr lr_base lr_base_size opt_eps recount log_interval num_classes crop_pct".split()
)
_AT_MOST_ONE = set("crop_pct drop_path smoothing mixup_prob mixup_switch_prob reprob hflip model_ema_decay".split())
_NON_NEGATIVE = _AT_MOST_ONE | set(
    "workers weight_decay clip_grad warmup_lr min_lr warmup_epochs cooldown_epochs mixup cutmix color_jitter "
    "threads checkpoint_interval checkpoint_hist max_steps".split()
)
_RANGES = {"scale": (0.0, 1.0), "ratio": (0.0, None)}  # (low, high) of a range a, b: low < a <= b <= high


def _numbers(values: Any, count: int) -> bool:
    """Whether ``values`` is a tuple of ``count`` numbers."""
    is_number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    return isinstance(values, tuple) and len(values) == count and all(map(is_number, values))


def _check_values(cfg: Config) -> None:
    """Types of every setting, ranges of the numeric ones: a bad one is a ConfigError naming it and
    its value."""
    for f in fields(Config):
        value, kind = getattr(cfg, f.name), str(f.type)
        if (value is None and "None" in kind) or "tuple" in kind:
            continue
        if kind in ("bool", "str"):
            if type(value).__name__ != kind:  # YAML's "false" or "off" in quotes is a (true) string
                raise ConfigError(
                    f"{f.name} must be {'true or false' if kind == 'bool' else 'a string'}, got {value!r}"
                )
            continue
        whole = "int" in kind
        if isinstance(value, bool) or not isinstance(value, int if whole else (int, float)):
            raise ConfigError(f"{f.name} must be {'an integer' if whole else 'a number'}, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{f.name} must be finite, got {value!r}")
        if f.name in _POSITIVE and not value > 0:
            raise ConfigError(f"{f.name} must be > 0, got {value!r}")
        if f.name in _NON_NEGATIVE and not value >= 0:
            raise ConfigError(f"{f.name} must be >= 0, got {value!r}")
        if f.name in _AT_MOST_ONE and not value <= 1:
            raise ConfigError(f"{f.name} must be <= 1, got {value!r}")
    for name, (low, high) in _RANGES.items():
        pair = getattr(cfg, name)
        if not (_numbers(pair, 2) and low < pair[0] <= pair[1] and (high is None or pair[1] <= high)):
            bound = f"{low} < a <= b" + (f" <= {high}" if high is not None else "")
            raise ConfigError(f"{name} must be two numbers a, b with {bound}, got {pair!r}")
    if not (any(_numbers(cfg.opt_betas, n) for n in (2, 3)) and all(0 <= beta < 1 for beta in cfg.opt_betas)):
        raise ConfigError(f"opt_betas must be two numbers in [0, 1) (three for Adan), got {cfg.opt_betas!r}")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed must be in [0, 2**32), got {cfg.seed!r}")
    for name in ("mean", "std"):
        values = getattr(cfg, name)
        if not _numbers(values, 3):
            raise ConfigError(f"{name} must be three numbers (R, G, B), got {values!r}")
    if not all(v > 0 for v in cfg.std):
        raise ConfigError(f"std must be > 0, got {cfg.std!r}")
    if cfg.warmup_epochs and cfg.warmup_epochs >= cfg.epochs:  # e.g. --epochs 5 with the recipe's warmup 20
        raise ConfigError(
            f"warmup_epochs {cfg.warmup_epochs} is not below epochs {cfg.epochs}: the lr would never leave its "
            "warmup; lower --warmup-epochs"
        )


def uses_mixup(cfg: Config) -> bool:
    """Whether training mixes images (mixup or cutmix)."""
    return (cfg.mixup > 0 or cfg.cutmix > 0) and cfg.mixup_prob > 0


def optimizer_settings(cfg: Config) -> dict[str, Any]:
    """The optimizer settings the config sets, as create_optimizer_v2 takes them (and as the param
    groups hold them, weight decay per group)."""
    return dict(weight_decay=cfg.weight_decay, eps=cfg.opt_eps, betas=tuple(cfg.opt_betas))


def _check_optimizer(cfg: Config) -> None:
    """timm's optimizer names, optionally behind 'lookahead_' (as create_optimizer_v2 parses them),
    built once with the run's settings on a dummy parameter, so that one this machine cannot build
    (e.g. bitsandbytes' or apex's without them) is refused before the run starts."""
    import torch
    from timm.optim import create_optimizer_v2, list_optimizers

    parts = cfg.opt.lower().split("_")
    if len(parts) > 2 or (len(parts) == 2 and parts[0] != "lookahead") or parts[-1] not in list_optimizers():
        raise ConfigError("opt: " + _suggest(cfg.opt, list_optimizers(), "timm optimizer"))
    if parts[-1] == "adahessian":  # its step needs a backward(create_graph=True), which the loop does not take
        raise ConfigError("opt 'adahessian' needs second-order gradients, which the training loop does not compute")
    betas = 3 if "adan" in parts[-1] else 2
    if len(cfg.opt_betas) != betas:
        paper = "; Adan's paper uses 0.98 0.92 0.99" if betas == 3 else ""
        raise ConfigError(f"opt {cfg.opt!r} takes {betas} betas (--opt-betas), got {cfg.opt_betas!r}{paper}")
    try:
        create_optimizer_v2([torch.nn.Parameter(torch.zeros(1))], opt=cfg.opt, lr=1e-3, **optimizer_settings(cfg))
    except Exception as error:  # noqa: BLE001 - timm's optimizers fail in many ways (assert, import, type)
        raise ConfigError(f"opt {cfg.opt!r} cannot be built here: {type(error).__name__}: {error}") from None


def _check_auto_augment(aa: str) -> None:
    """timm's auto-augment strings ('' or 'none': off), parsed as the training transform will."""
    if aa in ("", "none"):
        return
    from timm.data import create_transform

    example = "e.g. 'rand-m9-mstd0.5-inc1', 'v0', 'augmix-m5'"
    # timm skips a section without a digit ('rand-m9-foo', 'rand-mfoo') and, for RandAugment, takes an
    # unknown transform set ('rand-tfoo') for the default one, silently
    policy, *sections = aa.split("-")
    transform_sets = ("tweights", "t3a", "t3aw") if policy == "rand" else ()
    ignored = [
        section
        for section in sections
        if not any(ch.isdigit() for ch in section)
        and section not in transform_sets
        or transform_sets
        and section.startswith("t")
        and section not in transform_sets
    ]
    if ignored:
        sets = f" nor a transform set ({', '.join(transform_sets)})" if transform_sets else ""
        raise ConfigError(
            f"aa {aa!r}: section {ignored[0]!r} is not a setting and a number{sets} (timm would ignore it); {example}"
        )
    try:
        create_transform(32, is_training=True, auto_augment=aa)
    except (AssertionError, ValueError, KeyError) as error:  # timm asserts on what it cannot parse
        raise ConfigError(f"aa {aa!r} is not a timm auto-augment policy ({error}); {example}") from None


TIMM_DATASET_PREFIXES = ("torch", "hfds", "hfids", "tfds", "wds")  # timm.data.create_dataset's


def _check_dataset(name: str) -> None:
    """'' or 'folder' (image folders), 'digits', or a timm name with its source prefix: timm reads
    any other name as a plain folder, so a misspelt one would silently train on DATA_DIR."""
    prefix, sep, rest = name.partition("/")
    if name in ("", "folder", "digits") or (sep and rest and prefix.lower() in TIMM_DATASET_PREFIXES):
        return
    known = ["folder", "digits", *(f"{p}/" for p in TIMM_DATASET_PREFIXES)]
    raise ConfigError(
        "dataset: " + _suggest(name, known, "dataset") + " ('' or 'folder': image folders; 'digits'; "
        f"or a timm dataset behind one of the prefixes {', '.join(p + '/' for p in TIMM_DATASET_PREFIXES)})"
    )


def validate(cfg: Config, check_model: bool = True) -> Config:
    _check_values(cfg)
    for name in ("resume", "initial_checkpoint"):
        path = getattr(cfg, name)
        if path and not Path(path).is_file():
            raise ConfigError(f"{name}: no checkpoint file at {path}")
    for name, choices in CHOICES.items():
        if getattr(cfg, name) not in choices:
            raise ConfigError(f"{name}: " + _suggest(getattr(cfg, name), choices, "value") + f" (one of {choices})")
    if uses_mixup(cfg) and cfg.batch_size % 2:
        raise ConfigError(
            f"batch_size must be even with mixup or cutmix (timm mixes the batch in pairs), got {cfg.batch_size}"
        )
    _check_dataset(cfg.dataset)
    _check_optimizer(cfg)
    _check_auto_augment(cfg.aa)
    if check_model:
        check_model_name(cfg.model)
    return cfg


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a config file; every key must be a Config field."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:  # (a stream: the error's marks name the file, not "<unicode string>")
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as error:
        raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value")
    for key in data:
        if key not in CONFIG_KEYS:
            raise ConfigError(f"{path}: " + _suggest(key, CONFIG_KEYS, "config key"))
    return {k: _coerce(k, v) for k, v in data.items()}


# What a resumed run does not take from its saved config: where it writes (its checkpoint's folder),
# where its weights come from (the checkpoint), and where the interrupted invocation was told to stop.
NOT_RESUMED = ("output", "resume", "pretrained", "initial_checkpoint", "max_steps")


def make_config(
    overrides: dict[str, Any] | None = None,
    config_file: str | Path | None = None,
    check_model: bool = True,
    resumed: dict[str, Any] | None = None,
) -> Config:
    """Defaults, then ``resumed`` (the saved config of the run being resumed), then the YAML file,
    then `overrides` (keys as in Config)."""
    values = {k: _coerce(k, v) for k, v in (resumed or {}).items() if k in CONFIG_KEYS and k not in NOT_RESUMED}
    if resumed and "lr_base_scale" not in resumed:  # saved before the setting existed: lr_base scaled linearly
        values["lr_base_scale"] = "linear"
    values.update(load_yaml(config_file) if config_file else {})
    for key, value in (overrides or {}).items():
        if key not in CONFIG_KEYS:
            raise ConfigError(_suggest(key, CONFIG_KEYS, "config key"))
        values[key] = _coerce(key, value)
    if values.get("resume") and "output" not in values:  # a resumed run goes on in its own folder
        values["output"] = str(Path(values["resume"]).parent)
    return validate(Config(**values), check_model=check_model)


def _arg_type(default: Any, annotation: str):
    if "float" in annotation:
        return float
    if "int" in annotation:
        return int
    return type(default) if default is not None else str


class ArgumentParser(argparse.ArgumentParser):
    """The commands' parser: no abbreviations (``--epoch`` is not taken for ``--epochs``), an
    unknown flag is an error that suggests the close ones, and an error is one line that names the
    wrong value and points to ``--help`` (argparse prints its whole usage block first)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def parse_args(self, args=None, namespace=None):  # noqa: ANN001, ANN201 - argparse's signature
        parsed, unknown = self.parse_known_args(args, namespace)
        if unknown:
            flags = [flag for action in self._actions for flag in action.option_strings]
            words = []
            for word in unknown:
                close = difflib.get_close_matches(word.partition("=")[0], flags, n=3)
                words.append(f"{word} (did you mean {', '.join(close)}?)" if close else word)
            self.error("unrecognized arguments: " + " ".join(words))
        return parsed

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """One `--flag` per Config field; unset flags stay None so they do not override the file (the
    help shows the built-in default, which a config file or a resumed run's settings replace)."""
    for f in fields(Config):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        shown = " ".join(map(str, default)) if isinstance(default, tuple) else default
        notes = [f"default: {shown!s}"] if shown != "" else ["default: ''"]
        if f.name in HELP:
            notes.append(HELP[f.name])
        if f.name in CHOICES:
            notes.append("one of " + ", ".join(repr(choice) for choice in CHOICES[f.name]))
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": "; ".join(notes) or None}
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        elif isinstance(default, tuple):  # a fixed number of values (opt_betas: 2, or 3 for Adan)
            nargs = "+" if f.name == "opt_betas" else len(default)
            parser.add_argument(flag, type=float, nargs=nargs, **kwargs)
        else:
            parser.add_argument(flag, type=_arg_type(default, str(f.type)), **kwargs)


def config_from_args(args: argparse.Namespace, resumed: dict[str, Any] | None = None) -> Config:
    overrides = {k: v for k, v in vars(args).items() if k in CONFIG_KEYS and v is not None}
    return make_config(overrides, getattr(args, "config", None), resumed=resumed)


def as_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)
