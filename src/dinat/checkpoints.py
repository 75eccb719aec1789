"""Reading, checking, converting and writing checkpoints.

* :func:`load_state_dict` reads ``.pth`` (``torch.load(weights_only=True)``) or ``.safetensors``
  and unwraps it (:func:`unwrap_state_dict`): a bare state_dict, a timm/EMA-style wrapper
  (``state_dict_ema`` / ``model_ema`` preferred when ``use_ema``, then ``state_dict``, ``model``),
  DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes.
* :func:`load_checkpoint` loads one into a model strictly; a mismatch raises
  :class:`CheckpointMismatchError` listing missing, unexpected and wrong-shaped keys.
* :func:`checkpoint_filter_fn` is the timm ``pretrained_filter_fn`` of every model here, so
  ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=...))`` goes through
  the same unwrapping and checking; :func:`resolve_pretrained_file` checks that file (or downloads
  the official one) before timm reads it.
* :func:`resize_rpb` resizes every relative positional bias table to another kernel size
  (bicubic, as Swin does): how ``dinat_large_in22k_224_11x11interp.pth`` was made from the 7x7 one.
* :func:`save_checkpoint` writes atomically (temporary file in the same folder, then os.replace);
  :func:`write_text_atomic` does the same for the small text files of a run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import tempfile
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops import as_pair

WRAPPER_KEYS = ("state_dict", "model")
EMA_KEYS = ("state_dict_ema", "model_ema")  # timm's names, which `dinat train` uses too
PREFIXES = ("module.", "_orig_mod.")
# Plain-value classes a weights-only load may rebuild: the `args` of checkpoints written by timm's
# train.py (the original's training script).
SAFE_GLOBALS = [argparse.Namespace]
INDEX_SUFFIX = "relative_position_index"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read, or that does not hold what is asked of it."""


class CheckpointMismatchError(RuntimeError):
    """A state_dict does not fit a model; ``missing``, ``unexpected`` and ``mismatched``
    ((key, checkpoint shape, model shape) triples) say how."""

    def __init__(
        self,
        missing: list[str],
        unexpected: list[str],
        mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]],
        context: str = "",
    ) -> None:
        self.missing, self.unexpected, self.mismatched = missing, unexpected, mismatched
        lines = [f"checkpoint does not match the model{' (' + context + ')' if context else ''}:"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        if mismatched:
            lines.append(f"  wrong-shaped keys ({len(mismatched)}):")
            lines += [f"    {k}: checkpoint {tuple(a)}, model {tuple(b)}" for k, a, b in mismatched]
        super().__init__("\n".join(lines))


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and all(isinstance(v, Tensor) for v in obj.values())


def unwrap_state_dict(obj: Any, use_ema: bool = True) -> dict[str, Tensor]:
    """The model state_dict inside ``obj`` (see the module doc), prefixes stripped."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"a checkpoint must be a dict, got {type(obj).__name__}")
    if not _is_state_dict(obj):
        keys = (EMA_KEYS if use_ema else ()) + WRAPPER_KEYS
        found = next((k for k in keys if isinstance(obj.get(k), Mapping)), None)
        if found is None:
            raise CheckpointError(
                "checkpoint is neither a state_dict nor a wrapper with one of "
                f"{', '.join(EMA_KEYS + WRAPPER_KEYS)}; its top-level keys: {', '.join(map(str, obj))}"
            )
        obj = obj[found]
    state_dict = dict(obj)
    # until none is left, in any order (torch.compile of a DDP model saves "_orig_mod.module.")
    while state_dict and (prefix := next((p for p in PREFIXES if all(k.startswith(p) for k in state_dict)), None)):
        state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def training_config(checkpoint: Any) -> dict[str, Any]:
    """The settings a `dinat train` checkpoint (its contents) was trained with; {} for anything else."""
    config = checkpoint.get("config") if isinstance(checkpoint, Mapping) else None
    return config if isinstance(config, dict) else {}


def check_trained_model(path: str | os.PathLike, checkpoint: Any, model_name: str) -> None:
    """A :class:`CheckpointError` when ``checkpoint`` (read from ``path``) is a `dinat train`
    checkpoint of another architecture than ``model_name`` (pretrained tags aside): its weights may
    fit another model's shapes (nat_mini and dinat_mini differ only in dilation) and run silently."""
    trained = training_config(checkpoint).get("model")
    if trained and trained.split(".")[0] != model_name.split(".")[0]:
        raise CheckpointError(f"{path} is a checkpoint of {trained}, not {model_name}: give --model {trained}")


def read_checkpoint(path: str | os.PathLike, mmap: bool = False) -> Any:
    """The object in a ``.pth`` (``torch.load``, weights only) or ``.safetensors`` file, on the CPU.
    A missing file is a FileNotFoundError, an unreadable one (truncated, not a checkpoint) a
    :class:`CheckpointError`; both name the file. ``mmap``: a zip archive's tensors are mapped
    from the file, not read (torch's pickle format before 1.6 and safetensors files are read)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
        with safe_globals(SAFE_GLOBALS) if safe_globals else contextlib.nullcontext():
            mmap = mmap and zipfile.is_zipfile(path)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as error:  # torch.load raises many kinds (pickle, zip, EOF, RuntimeError)
        raise CheckpointError(f"{path} is not a readable checkpoint: {_load_failure(path, error)}") from error


def _is_archive_or_pickle(path: Path) -> bool:
    """Whether ``path`` can be a torch.save file: a whole zip archive (a truncated one has no central
    directory), or a pickle (torch's format before 1.6)."""
    with open(path, "rb") as f:
        is_pickle = f.read(1) == b"\x80"  # a pickle's protocol opcode
    return is_pickle or zipfile.is_zipfile(path)


def _load_failure(path: Path, error: Exception) -> str:
    """Why torch.load failed on ``path``, in one line."""
    if path.suffix != ".safetensors" and not _is_archive_or_pickle(path):
        return "neither a zip archive nor a pickle (another kind of file, or a truncated one)"
    unsupported = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
    if unsupported:
        return (
            f"it holds a {unsupported.group(1)} object, which a weights-only load does not build; "
            "save its state_dict alone (torch.load(..., weights_only=False) runs the file's code: "
            "only for files you trust)"
        )
    return f"{type(error).__name__}: {str(error).strip().splitlines()[0]}"


def load_state_dict(path: str | os.PathLike, use_ema: bool = True, mmap: bool = False) -> dict[str, Tensor]:
    """Read a ``.pth`` (weights only) or ``.safetensors`` checkpoint (``mmap``: as
    :func:`read_checkpoint`'s) and unwrap it; every error names the file."""
    checkpoint = read_checkpoint(path, mmap)
    try:
        return unwrap_state_dict(checkpoint, use_ema)
    except CheckpointError as error:
        raise CheckpointError(f"{path}: {error}") from error


def check_state_dict(
    model: nn.Module, state_dict: Mapping[str, Tensor], ignore: Iterable[str] = (), context: str = ""
) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state_dict`` has exactly the model's keys
    with the model's shapes (keys in ``ignore`` are not compared)."""
    ignore = set(ignore)
    own = {k: v for k, v in model.state_dict().items() if k not in ignore}
    theirs = {k: v for k, v in state_dict.items() if k not in ignore}
    missing = [k for k in own if k not in theirs]
    unexpected = [k for k in theirs if k not in own]
    mismatched = [
        (k, tuple(v.shape), tuple(own[k].shape))
        for k, v in theirs.items()
        if k in own and tuple(v.shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        raise CheckpointMismatchError(missing, unexpected, mismatched, context)


def _with_own_index(model: nn.Module, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Computed ``relative_position_index`` buffers are the model's own, whatever the file says."""
    own = model.state_dict()
    for key in state_dict:
        if key.endswith(INDEX_SUFFIX) and key in own and own[key].shape == state_dict[key].shape:
            state_dict[key] = own[key]
    return state_dict


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any],
    strict: bool = True,
    use_ema: bool = True,
) -> dict[str, list]:
    """Load a checkpoint file (or an in-memory checkpoint) into ``model``.

    strict: every key present with the right shape, else :class:`CheckpointMismatchError`.
    Non-strict: loads what fits and returns ``dict(missing=..., unexpected=..., mismatched=...)``.
    """
    if isinstance(checkpoint, Mapping):
        state_dict, context = unwrap_state_dict(checkpoint, use_ema), ""
    else:
        state_dict, context = load_state_dict(checkpoint, use_ema), str(checkpoint)
    state_dict = _with_own_index(model, state_dict)
    try:
        check_state_dict(model, state_dict, context=context)
        report: dict[str, list] = dict(missing=[], unexpected=[], mismatched=[])
    except CheckpointMismatchError as err:
        if strict:
            raise
        report = dict(missing=err.missing, unexpected=err.unexpected, mismatched=err.mismatched)
        bad = {k for k, _, _ in err.mismatched} | set(err.unexpected)
        state_dict = {k: v for k, v in state_dict.items() if k not in bad}
    model.load_state_dict(state_dict, strict=strict)
    return report


def checkpoint_filter_fn(
    state_dict: Mapping[str, Any], model: nn.Module, features_only: bool = False
) -> dict[str, Tensor]:
    """timm ``pretrained_filter_fn``: unwrap, keep computed index buffers, and check the keys and
    shapes strictly. The classifier is exempt when the model's class count differs from the
    pretrained cfg's, or for a ``features_only`` model (timm then drops it), and the first conv when
    ``in_chans`` differs (timm adapts it)."""
    state_dict = _with_own_index(model, unwrap_state_dict(state_dict))
    cfg = getattr(model, "pretrained_cfg", None) or {}
    ignore = []
    if cfg.get("classifier") and (features_only or getattr(model, "num_classes", None) != cfg.get("num_classes")):
        ignore += [f"{cfg['classifier']}.weight", f"{cfg['classifier']}.bias"]
    first_conv = cfg.get("first_conv")
    if first_conv:
        own = model.state_dict().get(f"{first_conv}.weight")
        theirs = state_dict.get(f"{first_conv}.weight")
        if own is not None and theirs is not None and own.shape[1] != theirs.shape[1]:
            ignore.append(f"{first_conv}.weight")
    context = f"pretrained weights of {cfg.get('architecture')}" + (f" in {cfg['file']}" if cfg.get("file") else "")
    check_state_dict(model, state_dict, ignore, context=context)
    return state_dict


def resize_rpb(state_dict: Mapping[str, Tensor], kernel_size: int | tuple[int, int]) -> dict[str, Tensor]:
    """A copy of ``state_dict`` with every ``*rpb`` table (heads, 2k-1, 2k-1) resized to
    ``kernel_size`` (int or (h, w)): bicubic, align_corners=False, on (1, heads, h, w), as Swin
    resizes its bias tables."""
    kh, kw = as_pair(kernel_size, "kernel_size")
    if kh < 3 or kw < 3 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel_size must be odd and >= 3, got {kernel_size!r}")
    size = (2 * kh - 1, 2 * kw - 1)
    out = dict(state_dict)
    for key, table in state_dict.items():
        if not key.endswith("rpb"):
            continue
        if table.dim() != 3 or any((side + 1) % 4 != 2 for side in table.shape[1:]):  # 2k-1 for an odd k
            raise ValueError(
                f"{key} must be a neighborhood-attention table (heads, 2k-1, 2k-1) with k odd, got shape "
                f"{tuple(table.shape)} (ViT-rpb's full-attention tables are not resized)"
            )
        if tuple(table.shape[1:]) != size:
            resized = F.interpolate(table[None].float(), size=size, mode="bicubic", align_corners=False)
            out[key] = resized[0].to(table.dtype)
    return out


def write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Make ``path`` what ``write(file)`` writes, atomically: a temporary file in the same folder,
    fsync, then os.replace. A reader never sees a half-written file, and a failure (disk full, a
    crash) leaves the previous file in place; an OSError is a CheckpointError saying so."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    umask = os.umask(0)
    os.umask(umask)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~umask)  # as open() would create it (mkstemp makes it private)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        cause = error if isinstance(error, OSError) else error.__cause__ or error.__context__
        if isinstance(cause, OSError):  # disk full, permissions (torch.save wraps them in RuntimeError)
            kept = "the previous file is kept" if path.exists() else "nothing was written"
            raise CheckpointError(f"could not write {path}: {cause}; {kept}") from error
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """:func:`write_atomic` for a text file (config.yaml, summary.json, metrics.csv, results)."""
    return write_atomic(path, lambda f: f.write(text.encode()))


def save_checkpoint(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` atomically (:func:`write_atomic`). ``.safetensors`` paths take a flat
    {name: tensor} dict; anything else goes through torch.save."""

    def write(f: BinaryIO) -> None:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import save

            if not _is_state_dict(obj):
                raise ValueError(".safetensors files take a flat {name: tensor} dict")
            f.write(save({k: v.contiguous() for k, v in obj.items()}))
        else:
            torch.save(obj, f)

    return write_atomic(path, write)


DOWNLOAD_HINT = "\ndownload the file and pass it with --checkpoint (validate) or --initial-checkpoint (train)"


def resolve_pretrained_file(variant: str, kwargs: dict[str, Any]) -> None:
    """The pretrained weights of ``variant``, checked before timm reads them (its reader fails on a
    bad file with a bare KeyError or EOFError; the check maps the weights, it does not copy them).
    A file the cfg names (``pretrained_cfg_overlay=dict(file=...)``) is checked; without one, the
    cfg's URL, then its fallbacks in :data:`dinat.models._common.ALT_URLS`, are downloaded and
    checked, and ``kwargs['pretrained_cfg_overlay']`` points at the first good cached file; none is
    a :class:`CheckpointError` naming every URL tried and the way out. Nothing to do for a
    state_dict in the cfg, or a cfg without URL."""
    from timm.models._builder import resolve_pretrained_cfg
    from timm.models._hub import download_cached_file

    from .models._common import ALT_URLS

    overlay = kwargs.get("pretrained_cfg_overlay") or {}
    cfg = resolve_pretrained_cfg(variant, kwargs.get("pretrained_cfg"), overlay).to_dict()
    url = cfg.get("url")
    if cfg.get("state_dict"):
        return
    if cfg.get("file"):
        load_state_dict(cfg["file"], mmap=True)
        return
    if not url:
        return
    cache = {"cache_dir": kwargs["cache_dir"]} if kwargs.get("cache_dir") else {}  # as timm.create_model's
    errors = []
    for candidate in (url, *ALT_URLS.get(url, ())):
        try:
            path = download_cached_file(candidate, check_hash=False, progress=True, **cache)
        except OSError as err:  # urllib's HTTPError / URLError are OSErrors
            errors.append(f"{candidate}: {err}")
            continue
        try:
            load_state_dict(path, mmap=True)  # not an HTML page, nor a truncated download
        except CheckpointError as err:
            errors.append(f"{candidate}: its cached download {err}; delete it to download it again")
            continue
        kwargs["pretrained_cfg_overlay"] = dict(overlay, file=path)
        return
    raise CheckpointError(f"could not download the weights of {variant}:\n  " + "\n  ".join(errors) + DOWNLOAD_HINT)
