"""`dinat train`: the original DiNAT / NAT ImageNet recipe, on one process or many (torchrun).

    dinat train -c configs/dinat_mini.yml /data/imagenet
    torchrun --nproc_per_node 8 -m dinat.cli train -c configs/dinat_mini.yml /data/imagenet
    dinat train --dataset digits -c configs/demo_digits.yml --output output/demo

The file reads top to bottom: setup, data, model, optimizer and schedule, resume, the loop,
the end. Everything comes from timm (transforms, mixup/cutmix, losses, optimizer, schedulers,
EMA) and torch (AMP, DDP). The learning rate is used as given (the original's 1e-3 is for a total
batch of 1024); `--lr-base` scales it by the total batch instead (as timm: by its square root for
AdamW, unless `--lr-base-scale linear`).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import yaml
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, unwrap_model
from tqdm import tqdm

from .checkpoints import (
    CheckpointError,
    check_trained_model,
    read_checkpoint,
    training_config,
    write_atomic,
    write_text_atomic,
)
from .checkpoints import save_checkpoint as save_atomic  # temp file + os.replace
from .config import (
    ArgumentParser,
    Config,
    ConfigError,
    add_config_arguments,
    as_dict,
    config_from_args,
    optimizer_settings,
    uses_mixup,
)
from .data import ResumableSampler, build_datasets, eval_loader, train_loader
from .factory import compile_model
from .ops import use_backend
from .validate import (
    attention_backend,
    autocast_and_scaler,
    check_classes,
    create_model,
    evaluate,
    load_weights,
    pick_device,
)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------------
# small helpers: processes, random states, checkpoints, history
# ------------------------------------------------------------------------------------------------


def init_distributed(device_name: str) -> tuple[int, int, torch.device]:
    """(rank, world size, device); under torchrun joins the group (nccl on CUDA, gloo on CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_name, local_rank)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return (dist.get_rank() if world > 1 else 0), world, device


def make_deterministic() -> None:
    """Deterministic kernels only, from here on. On CUDA, cuBLAS is deterministic only with a fixed
    workspace (without one, torch raises at the first matmul); it reads the setting when its first
    handle is made, i.e. at the first matmul."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


def all_finite(value: torch.Tensor, world: int) -> bool:
    """Whether ``value`` is finite on every rank (a collective: all ranks call it at the same step)."""
    finite = torch.isfinite(value).float()
    if world > 1:
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item())


def global_sums(loss_sum: torch.Tensor, seen: int, world: int) -> torch.Tensor:
    """(summed loss, samples) over all ranks (a collective when world > 1)."""
    sums = torch.stack([loss_sum, loss_sum.new_tensor(seen)])
    if world > 1:
        dist.all_reduce(sums)
    return sums


def rng_state() -> dict:
    """This process's random states, as tensors and plain values (loadable with weights_only)."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "torch": torch.get_rng_state(),
        "numpy": (torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def all_rng_states(world: int) -> list[dict]:
    """The random states of every rank (rank 0 writes them all into the checkpoint)."""
    if world == 1:
        return [rng_state()]
    states = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def write_history(history: list[dict], out: Path) -> None:
    """metrics.csv and metrics.png (loss and accuracy per epoch), both replaced atomically."""
    if not history:
        return
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(history[-1]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(history)
    write_text_atomic(out / "metrics.csv", table.getvalue())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], "o-", label="train")
    ax_loss.plot(epochs, [h["val_loss"] for h in history], "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, [h["val_top1"] for h in history], "o-", label="top-1")
    ax_acc.plot(epochs, [h["val_top5"] for h in history], "o-", label="top-5")
    ax_acc.set(xlabel="epoch", ylabel="val accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    write_atomic(out / "metrics.png", lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)


TRAINING_KEYS = (
    "model",
    "optimizer",
    "epoch",
    "samples",
    "step",
    "history",
    "best",
    "partial",
    "rng",
    "world",
    "config",
)


def peek_checkpoint(path: str | os.PathLike | None) -> object:
    """A checkpoint's contents, memory-mapped (its tensors are not read); {} for a missing or
    unreadable file (the resume itself then says what is wrong)."""
    if not path or not os.path.isfile(path):
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - any unreadable file: read_training_checkpoint names the problem
        return {}


def saved_config(path: str | None) -> dict:
    """The config a `dinat train` checkpoint was trained with ({} for anything else)."""
    return training_config(peek_checkpoint(path))


def _position(path: str | os.PathLike) -> tuple[int, int] | None:
    """(epoch, samples) of a `dinat train` checkpoint, None for any other file."""
    ckpt = peek_checkpoint(path)
    return (ckpt["epoch"], ckpt["samples"]) if isinstance(ckpt, dict) and {"epoch", "samples"} <= ckpt.keys() else None


def check_no_later_checkpoint(out: Path, resume: str) -> None:
    """Resuming an earlier checkpoint of the run in ``out`` (checkpoint-N.pth, model_best.pth) would
    replace the run's later ones: refused (the new branch needs its own --output)."""
    last = out / "last.pth"
    if not last.is_file() or not os.path.isfile(resume) or os.path.samefile(last, resume):
        return
    ahead, resumed = _position(last), _position(resume)
    if ahead is not None and resumed is not None and ahead > resumed:
        raise ConfigError(
            f"{out} holds this run further on than {resume} ({last}: epoch {ahead[0]}, sample {ahead[1]}); "
            "resuming there would replace its later checkpoints: give the new branch another --output"
        )


def read_training_checkpoint(path: str, model_name: str) -> dict:
    """A `dinat train` checkpoint of ``model_name`` to resume from; anything else is a CheckpointError
    saying what it is."""
    ckpt = read_checkpoint(path)
    missing = [k for k in TRAINING_KEYS if not isinstance(ckpt, dict) or k not in ckpt]
    if missing:
        raise CheckpointError(
            f"{path} is not a `dinat train` checkpoint (it has no {', '.join(missing)}); "
            "to start from its weights, use --initial-checkpoint"
        )
    check_trained_model(path, ckpt, model_name)
    return ckpt


def checkpoint_score(row: dict, eval_metric: str) -> float:
    """How good an epoch's checkpoint is by ``eval_metric`` (the higher the better: loss is negated)."""
    value = row[f"val_{eval_metric}"]
    return -value if eval_metric == "loss" else value


def rank_best(best: list[tuple[float, int]], score: float, epoch: int, hist: int) -> list[tuple[float, int]]:
    """The `hist` highest (score, epoch) pairs once ``epoch`` scored ``score`` (earlier epochs win ties)."""
    return sorted([*best, (score, epoch)], key=lambda t: (-t[0], t[1]))[:hist]


def keep_best(out: Path, before: list[tuple[float, int]], best: list[tuple[float, int]], epoch: int) -> None:
    """Files for the ranking ``best`` (from :func:`rank_best`, ``before`` was the last one): last.pth
    linked as checkpoint-EPOCH.pth if ``epoch`` is in it, model_best.pth = the first; checkpoints
    that dropped out are deleted."""
    for _, old in set(before) - set(best):
        (out / f"checkpoint-{old}.pth").unlink(missing_ok=True)
    if any(e == epoch for _, e in best):
        for name in (f"checkpoint-{epoch}.pth", "model_best.pth" if best[0][1] == epoch else None):
            if name:
                tmp = out / f".{name}.tmp"
                tmp.unlink(missing_ok=True)
                try:
                    os.link(out / "last.pth", tmp)
                except OSError:  # a file system without hard links
                    shutil.copyfile(out / "last.pth", tmp)
                os.replace(tmp, out / name)


def max_rank_divergence(model: torch.nn.Module) -> float:
    """Largest difference between this rank's weights and rank 0's (0.0 when in sync)."""
    flat = torch.nn.utils.parameters_to_vector([p.detach().float() for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, 0)
    diff = (flat - reference).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return diff.item()


def effective_lr(cfg: Config, world: int) -> float:
    """The lr as given (the original's way), or --lr-base scaled by the total batch as timm scales it:
    by its square root for adaptive optimizers (ada*, lamb), linearly otherwise, unless
    --lr-base-scale says which."""
    if cfg.lr_base is None:
        return cfg.lr
    ratio = cfg.batch_size * world / cfg.lr_base_size
    scale = cfg.lr_base_scale or ("sqrt" if any(name in cfg.opt.lower() for name in ("ada", "lamb")) else "linear")
    return cfg.lr_base * (ratio**0.5 if scale == "sqrt" else ratio)


def build_criterion(
    cfg: Config, num_classes: int, device: torch.device
) -> tuple[torch.nn.Module, Mixup | None, RandomErasing | None]:
    """(loss, Mixup or None, RandomErasing or None): with mixup or cutmix, soft targets (smoothed by
    Mixup) and random erasing of the mixed batch; otherwise cross entropy, label-smoothed if asked."""
    mixup, erase = None, None
    if uses_mixup(cfg):
        if cfg.reprob > 0:
            erase = RandomErasing(cfg.reprob, mode=cfg.remode, max_count=cfg.recount, device=device)
        mixup = Mixup(
            mixup_alpha=cfg.mixup,
            cutmix_alpha=cfg.cutmix,
            prob=cfg.mixup_prob,
            switch_prob=cfg.mixup_switch_prob,
            mode=cfg.mixup_mode,
            label_smoothing=cfg.smoothing,
            num_classes=num_classes,
        )
        criterion = SoftTargetCrossEntropy()
    elif cfg.smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(smoothing=cfg.smoothing)
    else:
        criterion = torch.nn.CrossEntropyLoss()
    return criterion, mixup, erase


def build_optimizer(cfg: Config, model: torch.nn.Module, world: int) -> torch.optim.Optimizer:
    """timm's optimizer for ``cfg`` on ``model`` (unwrapped), at the lr of :func:`effective_lr`: no
    weight decay on the relative positional biases (rpb), norms and biases."""
    lr = effective_lr(cfg, world)
    no_decay = {"*rpb", *getattr(model, "no_weight_decay", set)()}
    groups = param_groups_weight_decay(model, cfg.weight_decay, no_weight_decay_list=no_decay)
    return create_optimizer_v2(groups, opt=cfg.opt, lr=lr, **optimizer_settings(cfg))


def build_scheduler(cfg: Config, optimizer: torch.optim.Optimizer, steps_per_epoch: int):
    """timm's scheduler for ``cfg`` (per iteration unless ``sched_epochwise``; ``linear`` is timm's
    poly of power 1) and the epochs the run lasts, as timm counts them: ``epochs`` plus the cooldown
    at min_lr, none for ``constant``."""
    return create_scheduler_v2(
        optimizer,
        sched={"linear": "poly"}.get(cfg.sched, cfg.sched),
        decay_rate=1.0,  # poly power 1
        num_epochs=cfg.epochs,
        warmup_epochs=cfg.warmup_epochs,
        cooldown_epochs=cfg.cooldown_epochs,
        warmup_lr=cfg.warmup_lr,
        min_lr=cfg.min_lr,
        step_on_epochs=cfg.sched_epochwise,
        updates_per_epoch=steps_per_epoch,
    )


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or ArgumentParser(prog="dinat train", description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir_pos", nargs="?", metavar="DATA_DIR", help="folder with train/ and val/")
    p.add_argument("-c", "--config", help="a YAML file of configs/ (values as in the original release)")
    add_config_arguments(p)
    return p


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------


def train(cfg: Config) -> dict:
    """Run the training `cfg` describes; returns the summary (also in the output folder)."""
    with use_backend(cfg.attention):
        return _train(cfg)


def _train(cfg: Config) -> dict:
    # -- setup: processes, device, seeds ---------------------------------------------------------
    rank, world, device = init_distributed(cfg.device)
    main_process = rank == 0
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file, not a folder")
    # never overwrite another run's checkpoints: only a resumed run writes into its own folder
    if (out / "last.pth").exists() and not cfg.resume:
        raise ConfigError(
            f"{out} holds a run already: continue it with --resume {out / 'last.pth'}, or pick another --output"
        )
    if (out / "last.pth").exists() and out.resolve() != Path(cfg.resume).resolve().parent:
        raise ConfigError(
            f"{out} holds another run than {cfg.resume}: leave out --output to continue that run in its "
            f"folder ({Path(cfg.resume).parent}), or pick an empty --output"
        )
    if cfg.resume:
        check_no_later_checkpoint(out, cfg.resume)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    if cfg.deterministic:
        make_deterministic()
    else:  # as timm's scripts: cuDNN times its algorithms once per convolution shape, keeps the fastest
        torch.backends.cudnn.benchmark = True
    log = tqdm.write if main_process else (lambda *a, **k: None)

    # -- data ------------------------------------------------------------------------------------
    train_set, val_set, data_classes = build_datasets(cfg)
    num_classes = cfg.num_classes or data_classes
    sampler = ResumableSampler(train_set, num_replicas=world, rank=rank, seed=cfg.seed)
    steps_per_epoch = sampler.num_samples // cfg.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"{len(train_set)} training images are fewer than one batch "
            f"({cfg.batch_size} x {world} processes); lower --batch-size"
        )
    pin = device.type == "cuda"
    val_loader = eval_loader(val_set, cfg, rank, world, pin)

    # -- model -----------------------------------------------------------------------------------
    model = create_model(cfg.model, num_classes, cfg.pretrained, cfg.drop_path, cfg.img_size)
    if cfg.initial_checkpoint:
        new_head = load_weights(model, cfg.initial_checkpoint)
        log(f"loaded {cfg.initial_checkpoint}" + (f"; new head {new_head}" if new_head else ""))
    check_classes(num_classes, data_classes)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    ema = ModelEmaV3(model, decay=cfg.model_ema_decay) if cfg.model_ema else None
    if cfg.compile:
        model = compile_model(model, cfg.compile_mode)
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if pin else None)
    bare = unwrap_model(model)
    attention = attention_backend(cfg.attention, device)
    log(
        f"{cfg.model}: {sum(p.numel() for p in bare.parameters()) / 1e6:.2f}M params, {num_classes} classes, "
        f"{len(train_set)} train / {len(val_set)} val images, {world} process(es) on {device}, "
        f"attention backend {attention}"
    )

    # -- loss, optimizer (no weight decay on rpb, norms, biases), per-iteration schedule, AMP ------
    criterion, mixup, erase = build_criterion(cfg, num_classes, device)
    optimizer = build_optimizer(cfg, bare, world)
    scheduler, num_epochs = build_scheduler(cfg, optimizer, steps_per_epoch)
    autocast, scaler = autocast_and_scaler(cfg.amp, cfg.amp_dtype, device)

    # -- resume: weights, optimizer, scaler, EMA, position, history, random states ------------------
    # The position is (epoch, samples of it taken by all ranks): it maps onto any number of processes
    # and batch size. The schedule is a function of the config and the step, as in timm's train.py.
    total_batch = cfg.batch_size * world
    start_epoch, start_sample, history, best, partial = 0, 0, [], [], (0.0, 0)
    rng_to_restore = None
    if cfg.resume:
        ckpt = read_training_checkpoint(cfg.resume, cfg.model)
        try:
            bare.load_state_dict(ckpt["model"])
        except RuntimeError as error:  # same model name, other settings (e.g. num_classes)
            raise CheckpointError(f"{cfg.resume} does not fit the model: {error}") from None
        trained_opt = ckpt["config"].get("opt", cfg.opt)
        if trained_opt.lower() != cfg.opt.lower():
            raise ConfigError(
                f"opt {cfg.opt!r}: {cfg.resume} was trained with {trained_opt!r}, whose state does not carry "
                "over; to start from its weights with another optimizer, use --initial-checkpoint"
            )
        # the moments and counters (e.g. Lookahead's step) are the checkpoint's; the settings the flags
        # set are this run's (the lr is the scheduler's)
        settings = [{k: g[k] for k in optimizer_settings(cfg) if k in g} for g in optimizer.param_groups]
        optimizer.load_state_dict(ckpt["optimizer"])
        for group, own in zip(optimizer.param_groups, settings):
            group.update(own)
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        if ema is not None and ckpt.get("state_dict_ema") is not None:
            ema.module.load_state_dict(ckpt["state_dict_ema"])
        elif ema is not None:  # --model-ema from here on: it starts from the resumed weights
            ema.set(bare)
        start_epoch, start_sample = ckpt["epoch"], ckpt["samples"]
        history, best, partial = ckpt["history"], [tuple(b) for b in ckpt["best"]], tuple(ckpt["partial"])
        if ckpt["world"] == world:
            rng_to_restore = ckpt["rng"][rank]
        else:
            log(f"resuming with {world} processes instead of {ckpt['world']}: random states reseeded")
        saved_batch = ckpt["config"]["batch_size"] * ckpt["world"]
        if saved_batch != total_batch:
            log(f"resuming with a total batch of {total_batch} instead of {saved_batch}: steps recounted")
    if start_epoch >= num_epochs:
        raise ConfigError(
            f"nothing to train: {cfg.resume} is at the end of its {start_epoch} epochs; "
            f"raise --epochs (now {cfg.epochs}, plus {num_epochs - cfg.epochs} of cooldown) to train longer"
        )
    step = start_epoch * steps_per_epoch + start_sample // total_batch
    if cfg.max_steps and step >= cfg.max_steps:
        raise ConfigError(f"nothing to train: {cfg.resume} is at step {step}; raise --max-steps (now {cfg.max_steps})")
    if main_process:  # every check passed: the run is on, and its folder says how it was made
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "config.yaml", yaml.safe_dump(as_dict(cfg), sort_keys=False))
    if cfg.resume:
        log(f"resumed {cfg.resume}: epoch {start_epoch + 1}, sample {start_sample}, step {step}")
    if cfg.sched_epochwise:
        scheduler.step(start_epoch)
    else:
        scheduler.step_update(step)
    if rng_to_restore is not None:
        set_rng_state(rng_to_restore)
    else:
        rank_seed = (cfg.seed + rank) % 2**32  # numpy's range
        random.seed(rank_seed)
        np.random.seed(rank_seed)
        torch.manual_seed(rank_seed)
    last_saved = cfg.resume or None

    def save(epoch: int, samples: int, loss_sum: torch.Tensor, seen: int) -> None:
        """last.pth at ``samples`` into ``epoch`` with the epoch's loss so far (all ranks take part:
        the loss sums and random states are gathered)."""
        nonlocal last_saved
        partial_sums = global_sums(loss_sum, seen, world).tolist()
        states = all_rng_states(world)
        if main_process:
            save_atomic(
                {
                    "model": bare.state_dict(),
                    "optimizer": optimizer.state_dict(),
                    "scaler": scaler.state_dict() if scaler else None,
                    "state_dict_ema": ema.module.state_dict() if ema else None,  # timm's name
                    "epoch": epoch,
                    "samples": samples,
                    "step": step,
                    "history": history,
                    "best": best,
                    "partial": (partial_sums[0], int(partial_sums[1])),
                    "rng": states,
                    "world": world,
                    "config": as_dict(cfg),
                },
                out / "last.pth",
            )
        last_saved = str(out / "last.pth")

    # -- the loop ---------------------------------------------------------------------------------
    finished, mid_epoch = False, False
    for epoch in range(start_epoch, num_epochs):
        sampler.start = start_sample
        loader = train_loader(train_set, sampler, cfg, epoch, pin)
        first_batch = start_sample // total_batch
        end_batch = first_batch + len(loader)
        loss_sum, seen = partial if main_process else (0.0, 0)  # the epoch's loss so far, over all ranks
        loss_sum = torch.tensor(loss_sum, dtype=torch.float64, device=device)  # summed where it is: no sync per step
        model.train()
        bar = tqdm(
            total=end_batch,
            initial=first_batch,
            desc=f"epoch {epoch + 1}/{num_epochs}",
            disable=not main_process,
            dynamic_ncols=True,
            leave=False,
        )
        tick = time.perf_counter()
        lr_used = optimizer.param_groups[0]["lr"]  # (a resumed epoch's rest may be less than a batch)
        for batch_idx, (x, y) in enumerate(loader, start=first_batch):
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if mixup is not None:
                x, y = mixup(x, y)
                if erase is not None:  # after mixing, as the original's loader did (see train_transform)
                    x = erase(x)
            with autocast():
                loss = criterion(model(x), y)

            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if cfg.clip_grad:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
            lr_used = optimizer.param_groups[0]["lr"]  # (the scheduler sets the next step's below)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            step += 1
            if ema is not None:
                ema.update(bare)  # the decay from the first update on, as the original's ModelEmaV2
            if not cfg.sched_epochwise:
                scheduler.step_update(step)

            loss_sum += loss.detach() * len(x)  # a NaN or inf stays in the sum until it is checked
            seen += len(x)
            bar.update()
            finished = bool(cfg.max_steps) and step >= cfg.max_steps
            mid_epoch = batch_idx + 1 < end_batch
            save_now = mid_epoch and (finished or (cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0))
            # every log_interval steps and before any save: the one host sync (all ranks at the same steps)
            if save_now or not mid_epoch or step % cfg.log_interval == 0:
                if not all_finite(loss_sum, world):
                    bar.close()
                    kept = f"the last good checkpoint is {last_saved}" if last_saved else "no checkpoint was saved"
                    raise TrainingDiverged(f"loss is not finite by epoch {epoch + 1}, step {step}; stopping ({kept})")
                speed = total_batch * (batch_idx + 1 - first_batch) / max(time.perf_counter() - tick, 1e-9)
                bar.set_postfix_str(
                    f"loss {loss.item():.4f}  lr {lr_used:.2e}  {speed:.0f} img/s",
                    refresh=False,
                )
            if save_now:
                save(epoch, start_sample + (batch_idx + 1 - first_batch) * total_batch, loss_sum, seen)
                log(f"saved {out / 'last.pth'} at step {step} (epoch {epoch + 1}, batch {batch_idx + 1})")
            if finished:
                break
        bar.close()
        start_sample, partial = 0, (0.0, 0)

        # -- end of epoch: metrics over all ranks, eval, checkpoints, history ---------------------
        sums = global_sums(loss_sum, seen, world)
        metrics = evaluate(bare, val_loader, device, autocast, world > 1, cfg.channels_last)
        if ema is not None:
            metrics = evaluate(ema.module, val_loader, device, autocast, world > 1, cfg.channels_last)
        row = {
            "epoch": epoch + 1,
            "step": step,
            "lr": lr_used,  # of the epoch's last step
            "train_loss": (sums[0] / sums[1].clamp(min=1)).item(),
            "val_loss": metrics["loss"],
            "val_top1": metrics["top1"],
            "val_top5": metrics["top5"],
        }
        if finished and mid_epoch:
            # stopped by --max-steps in the middle of an epoch: last.pth is already saved; the summary
            # says that its train loss and metrics are of a part of the epoch
            log(f"stopped by --max-steps at step {step}, batch {batch_idx + 1} of {end_batch} in epoch {epoch + 1}")
            break
        history.append(row)
        if cfg.sched_epochwise:
            scheduler.step(epoch + 1)
        before, best = best, rank_best(best, checkpoint_score(row, cfg.eval_metric), epoch + 1, cfg.checkpoint_hist)
        save(epoch + 1, 0, loss_sum.new_zeros(()), 0)  # with the ranking that includes this epoch
        if main_process:
            keep_best(out, before, best, epoch + 1)
            write_history(history, out)
        log(
            f"epoch {epoch + 1}/{num_epochs}  train loss {row['train_loss']:.4f}  "
            f"val loss {row['val_loss']:.4f}  "
            f"top-1 {row['val_top1']:.2f}%  top-5 {row['val_top5']:.2f}%  lr {row['lr']:.2e}"
        )
        if finished:
            break

    # -- the end ---------------------------------------------------------------------------------
    summary = {
        **row,
        "epoch_complete": not (finished and mid_epoch),  # False: row is of a part of that epoch
        "best_top1": max([h["val_top1"] for h in history], default=row["val_top1"]),
        "world_size": world,
        "output": str(out),
    }
    if world > 1:
        summary["rank_weight_max_diff"] = max_rank_divergence(bare)
        dist.destroy_process_group()
    if main_process:
        write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")
        print(
            f"done: val top-1 {row['val_top1']:.2f}% (best {summary['best_top1']:.2f}%), "
            f"top-5 {row['val_top5']:.2f}%, outputs in {out}",
            flush=True,
        )
    return summary


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.data_dir_pos:
        args.data_dir = args.data_dir_pos
    cfg = config_from_args(args, resumed=saved_config(args.resume))  # a resumed run keeps its settings
    try:
        return train(cfg)
    except TrainingDiverged as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(1) from None
