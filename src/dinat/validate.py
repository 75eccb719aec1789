"""`dinat validate`: top-1, top-5, loss and images/s of a model on a validation set.

    dinat validate --model dinat_mini --pretrained /data/imagenet
    dinat validate --model dinat_nano --checkpoint output/demo/model_best.pth --dataset digits

Also home of the pieces `dinat train` shares: model creation, weight loading, AMP and evaluation.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from functools import partial
from pathlib import Path
from typing import Any

import timm
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .checkpoints import (
    EMA_KEYS,
    CheckpointError,
    CheckpointMismatchError,
    check_trained_model,
    read_checkpoint,
    training_config,
    unwrap_state_dict,
    write_text_atomic,
)
from .config import (
    AMP_DTYPES,
    COMPILE_MODES,
    INTERPOLATIONS,
    ArgumentParser,
    Config,
    ConfigError,
    check_model_name,
    make_config,
)
from .factory import compile_model
from .ops import BACKENDS, current_backend, use_backend


def pick_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """The device ``name`` names ('auto': this process's GPU if there is one, else the CPU); a bare
    'cuda' means this process's GPU (LOCAL_RANK under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"device must be auto, cpu, cuda, cuda:N or another torch device, got {name!r}") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r}: CUDA is not available here")
        if device.index is None:
            device = torch.device("cuda", local_rank)
        if device.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: there are {torch.cuda.device_count()} CUDA devices")
        torch.cuda.set_device(device)
    return device


def attention_backend(name: str, device: torch.device) -> str:
    """The backend the attention runs on under ``use_backend(name)`` on ``device``; a forced backend
    that cannot run there is a ConfigError."""
    with use_backend(name):
        try:
            return current_backend(torch.empty(0, device=device))
        except RuntimeError as error:
            raise ConfigError(f"attention {name!r}: {error}") from None


def autocast_and_scaler(enabled: bool, amp_dtype: str, device: torch.device):
    """(context factory, GradScaler or None). ``auto`` is bfloat16 (on CUDA when the GPU supports
    it, else float16); float16 comes with a GradScaler (on the CPU too)."""
    if not enabled:
        return contextlib.nullcontext, None
    if amp_dtype not in AMP_DTYPES:
        raise ConfigError(f"amp_dtype must be one of {AMP_DTYPES}, not {amp_dtype!r}")
    if amp_dtype == "auto":
        bf16 = device.type != "cuda" or torch.cuda.is_bf16_supported()
        amp_dtype = "bfloat16" if bf16 else "float16"
    dtype = getattr(torch, amp_dtype)
    scaler = torch.amp.GradScaler(device.type) if dtype == torch.float16 else None  # (float16 on the CPU too)
    return partial(torch.autocast, device_type=device.type, dtype=dtype), scaler


def create_model(
    name: str,
    num_classes: int | None,
    pretrained: bool = False,
    drop_path: float | None = None,
    img_size: int | None = None,
):
    """The timm model ``name``; a setting it refuses (e.g. an image size an isotropic model cannot
    take) is a ConfigError, weights that cannot be fetched a CheckpointError."""
    import dinat  # noqa: F401  (registers the models)

    check_model_name(name, pretrained)
    kwargs = {"pretrained": pretrained}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if img_size is not None and timm.models.get_pretrained_cfg_value(name, "fixed_input_size"):
        kwargs["img_size"] = img_size  # models of one input size check it when built
    try:
        return timm.create_model(name, **kwargs)
    except CheckpointError:
        raise
    except CheckpointMismatchError as error:  # released weights (a cached file) that do not fit
        raise CheckpointError(str(error)) from None
    except ValueError as error:  # the model's checks of its arguments
        raise ConfigError(f"{name}: {error}") from None


def check_classes(model_classes: int, data_classes: int | None) -> None:
    """The model's head must have a logit for every label of the data (else the loss fails at the
    first batch: an index error, or a device-side assert on CUDA)."""
    if data_classes and model_classes < data_classes:
        raise ConfigError(
            f"the data has {data_classes} classes but the model's head has {model_classes}; "
            "raise --num-classes or leave it out"
        )


def read_state_dict(path: str | Path, use_ema: bool = False, checkpoint: Any = None) -> dict[str, torch.Tensor]:
    """Weights from a state_dict file or a checkpoint wrapping one (`dinat train`'s: `model`, `state_dict_ema`);
    with ``use_ema`` the EMA weights, which must be there. ``checkpoint``: the file's contents, if already read."""
    obj = read_checkpoint(path) if checkpoint is None else checkpoint
    if use_ema and not (isinstance(obj, dict) and any(isinstance(obj.get(k), dict) for k in EMA_KEYS)):
        raise CheckpointError(f"{path} has no EMA weights")
    try:
        return unwrap_state_dict(obj, use_ema)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from None


def load_weights(model: torch.nn.Module, path: str | Path, use_ema: bool = False, checkpoint: Any = None) -> list[str]:
    """Load `path` (``checkpoint``: its contents, if already read) into `model`; a classifier of
    another shape is left new (fine-tuning). Returns it."""
    state = read_state_dict(path, use_ema, checkpoint)
    own = model.state_dict()
    new_head = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    for k in new_head:
        state.pop(k)
    missing, unexpected = model.load_state_dict(state, strict=False)
    heads = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
    heads = (heads,) if isinstance(heads, str) else tuple(heads)
    bad_missing = [k for k in missing if not k.startswith(heads) and k not in new_head]  # listed as shapes
    bad_shape = [k for k in new_head if not k.startswith(heads)]
    if bad_missing or unexpected or bad_shape:
        raise CheckpointError(
            f"{path} does not fit {getattr(model, 'pretrained_cfg', {}).get('architecture', type(model).__name__)}: "
            f"missing {bad_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}, other shapes {bad_shape[:5]}"
        )
    return new_head


@torch.no_grad()
def evaluate(
    model, loader, device, autocast=contextlib.nullcontext, distributed=False, channels_last=False
) -> dict[str, float]:
    """Loss, top-1, top-5 (in %) and images/s over the loader; sums are reduced over ranks."""
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss sum, top-1, top-5, count
    start = time.perf_counter()
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast():
            logits = model(x)
        logits = logits.float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.eq(y[:, None])
        totals += torch.stack(
            [
                F.cross_entropy(logits, y, reduction="sum"),
                top[:, :1].sum(),
                top.sum(),
                torch.tensor(len(y), device=device),
            ]
        ).double()
    if distributed:
        dist.all_reduce(totals)
    seconds = time.perf_counter() - start
    loss, top1, top5, n = totals.tolist()
    n = max(n, 1)
    return {
        "loss": loss / n,
        "top1": 100 * top1 / n,
        "top5": 100 * top5 / n,
        "images": int(n),
        "img_per_s": n / max(seconds, 1e-9),
    }


PREPROCESSING = {k: getattr(Config, k) for k in ("img_size", "crop_pct", "interpolation", "mean", "std")}  # defaults


def resolve_preprocessing(model: str, given: dict[str, Any], trained: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Image size, crop, interpolation and normalisation of the evaluation, and where they come from:
    as given, else the `dinat train` checkpoint's config (``trained``), else the model's pretrained cfg
    (as timm's validate.py resolves them: dinat_large_384 is evaluated at 384 px, crop 1.0)."""
    if all(given.get(k) is not None for k in PREPROCESSING):
        return {k: given[k] for k in PREPROCESSING}, "as given"
    if trained:
        source, defaults = "the training checkpoint's config", {k: trained.get(k, v) for k, v in PREPROCESSING.items()}
    else:
        cfg = timm.models.get_pretrained_cfg(model)
        source, defaults = f"{model}'s pretrained cfg", dict(PREPROCESSING)
        if cfg is not None:
            defaults = {
                "img_size": cfg.input_size[-1],
                "crop_pct": cfg.crop_pct,
                "interpolation": cfg.interpolation,
                "mean": cfg.mean,
                "std": cfg.std,
            }
    resolved = {k: defaults[k] if given.get(k) is None else given[k] for k in PREPROCESSING}
    named = [k for k in PREPROCESSING if given.get(k) is not None]
    if named:
        source += f"; {', '.join(named)} as given"
    return {k: tuple(v) if isinstance(v, list | tuple) else v for k, v in resolved.items()}, source


def _numbers(values: tuple[float, ...]) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def format_table(rows: dict[str, object]) -> str:
    width = max(len(k) for k in rows)
    return "\n".join(
        f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}" for k, v in rows.items()
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or ArgumentParser(prog="dinat validate", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", nargs="?", default="", help="folder with val/ or validation/ (or class folders)")
    p.add_argument("--model", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pretrained", action="store_true", help="the released weights of --model")
    src.add_argument("--checkpoint", help="a state_dict or a `dinat train` checkpoint")
    p.add_argument("--use-ema", action="store_true", help="the EMA weights of a training checkpoint")
    p.add_argument("--dataset", default="", help="'' (folders), digits, or a timm dataset name")
    p.add_argument("--split", default="", help="validation split name (default: val or validation)")
    p.add_argument("--train-split", default="train", help="the training folder, whose classes number the labels")
    p.add_argument("--skip-bad-images", action="store_true", help="leave out images that cannot be read")
    p.add_argument("--num-classes", type=int, default=None)
    resolved = "default: a `dinat train` checkpoint's, else the model's pretrained cfg"
    p.add_argument("--img-size", type=int, help=resolved)
    p.add_argument("--crop-pct", type=float, help=resolved)
    p.add_argument("--interpolation", choices=INTERPOLATIONS, help=resolved)
    p.add_argument("--mean", type=float, nargs=3, help=resolved)
    p.add_argument("--std", type=float, nargs=3, help=resolved)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--amp-dtype", default="auto", choices=AMP_DTYPES)
    p.add_argument("--device", default="auto")
    p.add_argument("--channels-last", action="store_true")
    p.add_argument(
        "--compile",
        nargs="?",
        const="default",
        choices=COMPILE_MODES,
        help="torch.compile the model, in this mode (default: 'default'; 'reduce-overhead' replays CUDA graphs)",
    )
    p.add_argument("--attention", default="auto", choices=BACKENDS, help="neighborhood-attention backend")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--results-file", help="write the results as JSON here")
    return p


def main(argv=None) -> dict:
    from .data import build_eval_dataset, eval_loader

    args = build_parser().parse_args(argv)
    results_file = Path(args.results_file) if args.results_file else None
    if results_file and (results_file.is_dir() or any(p.is_file() for p in results_file.parents)):
        raise ConfigError(f"--results-file {args.results_file}: not a file path that can be written")
    check_model_name(args.model)
    checkpoint = read_checkpoint(args.checkpoint) if args.checkpoint else None
    if checkpoint is not None:
        check_trained_model(args.checkpoint, checkpoint, args.model)
    preprocessing, source = resolve_preprocessing(
        args.model, {k: getattr(args, k) for k in PREPROCESSING}, training_config(checkpoint)
    )
    shared = ("model", "data_dir", "dataset", "batch_size", "workers")
    shared += ("threads", "train_split", "skip_bad_images")  # some not used through cfg: checked there
    num_classes = args.num_classes
    if args.pretrained and num_classes is None:  # the released head's classes number the labels
        num_classes = getattr(timm.models.get_pretrained_cfg(args.model), "num_classes", None)
    settings = {**{k: getattr(args, k) for k in shared}, **preprocessing, "num_classes": num_classes}
    cfg = make_config({**settings, "val_split": args.split, "mixup": 0.0, "cutmix": 0.0})  # (any batch size)
    dataset, data_classes = build_eval_dataset(cfg)
    device = pick_device(args.device)
    torch.backends.cudnn.benchmark = True  # as timm's validate.py: the fastest algorithm per convolution shape
    if args.threads:
        torch.set_num_threads(args.threads)
    model = create_model(
        args.model,
        args.num_classes or (None if args.pretrained else data_classes),
        pretrained=args.pretrained,
        img_size=cfg.img_size,
    )
    if args.checkpoint:
        new_head = load_weights(model, args.checkpoint, use_ema=args.use_ema, checkpoint=checkpoint)
        if new_head:  # a new, random classifier would report chance-level accuracy
            raise CheckpointError(
                f"{args.checkpoint}: its classifier ({', '.join(new_head)}) is not for {model.num_classes} "
                "classes; give its number of classes with --num-classes"
            )
    check_classes(model.num_classes, data_classes)
    model.to(device)
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.compile:
        model = compile_model(model, args.compile)
    autocast, _ = autocast_and_scaler(args.amp, args.amp_dtype, device)
    attention_backend(args.attention, device)
    print(
        f"images: {cfg.img_size} px, crop_pct {cfg.crop_pct}, {cfg.interpolation}, "
        f"mean {_numbers(cfg.mean)}, std {_numbers(cfg.std)} ({source})",
        flush=True,
    )
    with use_backend(args.attention):
        results = evaluate(
            model,
            eval_loader(dataset, cfg, pin_memory=device.type == "cuda"),
            device,
            autocast,
            channels_last=args.channels_last,
        )
    results = {"model": args.model, "weights": args.checkpoint or "pretrained", **preprocessing, **results}
    print(format_table(results))
    if results_file:
        write_text_atomic(results_file, json.dumps(results, indent=2) + "\n")
    return results
