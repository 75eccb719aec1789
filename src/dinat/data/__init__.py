"""Datasets, transforms and loaders for `dinat train` and `dinat validate`.

Three sources: ImageNet-style folders (`DATA_DIR/train/`, `DATA_DIR/val/` or `validation/`),
the embedded scikit-learn `digits`, and any map-style timm dataset name (`torch/cifar10`, ...).
Every training sample is augmented under a seed derived from (seed, epoch, index), so the data of
a run do not depend on the number of loader workers or processes, and a run resumed in the middle
of an epoch sees exactly the batches it would have seen.
"""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from timm.data import auto_augment, create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from ..config import uses_mixup
from .digits import Digits
from .folder import DataError, ImageFolder, class_folders, find_split, load_rgb, to_rgb

__all__ = [
    "DataError",
    "Digits",
    "ImageFolder",
    "build_datasets",
    "build_eval_dataset",
    "load_rgb",
    "train_loader",
    "eval_loader",
    "train_transform",
    "eval_transform",
    "ResumableSampler",
]

VAL_NAMES = ("val", "validation")


def posterize(img: Image.Image, bits_to_keep: int, **kwargs) -> Image.Image:
    """timm's posterize with Pillow's old meaning of 0 bits: none kept, a black image.

    timm's increasing posterize (the recipe's ``rand-m9-mstd0.5-inc1``) asks for 0 bits at magnitude
    10, which m9 with a 0.5 std reaches for about 2% of the draws; Pillow 13 refuses 0 bits (a
    ValueError that stops training in the first batches on ImageNet), the Pillow of the original
    release returned black.
    """
    if bits_to_keep < 1:
        return Image.new(img.mode, img.size)
    return auto_augment.posterize(img, bits_to_keep, **kwargs)


def _augment_ops(transform) -> list:
    """Every timm AugmentOp inside ``transform`` (RandAugment, AutoAugment, AugMix, nested Composes)."""
    ops = list(getattr(transform, "ops", [])) + [op for sub in getattr(transform, "policy", []) for op in sub]
    for inner in getattr(transform, "transforms", []):
        ops += _augment_ops(inner)
    return ops


def train_transform(cfg):
    """timm's training transform. With mixup or cutmix, random erasing is left to the training loop,
    which erases the mixed batch: the original's loader (timm 0.5's prefetcher) mixed in its collate
    and erased after it, so that an erased patch is never mixed or cut away."""
    transform = create_transform(
        cfg.img_size,
        is_training=True,
        scale=tuple(cfg.scale),
        ratio=tuple(cfg.ratio),
        hflip=cfg.hflip,
        color_jitter=cfg.color_jitter,
        auto_augment=cfg.aa if cfg.aa not in ("", "none") else None,
        interpolation=cfg.train_interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        re_prob=0.0 if uses_mixup(cfg) else cfg.reprob,
        re_mode=cfg.remode,
        re_count=cfg.recount,
    )
    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform


def eval_transform(cfg):
    return create_transform(
        cfg.img_size,
        is_training=False,
        interpolation=cfg.interpolation,
        mean=tuple(cfg.mean),
        std=tuple(cfg.std),
        crop_pct=cfg.crop_pct,
    )


class Transformed(Dataset):
    """`base[i]` = (PIL image, target) in RGB through `transform`; with `seed`, under a per-sample seed."""

    def __init__(self, base, transform, seed: int | None = None):
        self.base, self.transform, self.seed, self.epoch = base, transform, seed, 0

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        img, target = self.base[i]
        if isinstance(img, Image.Image):  # a timm / torchvision dataset's image (folders give RGB already)
            img = to_rgb(img)
        if self.seed is None:
            return self.transform(img), target
        sample_seed = hash((self.seed, self.epoch, int(i))) & 0x7FFF_FFFF
        py_state, np_state = random.getstate(), np.random.get_state()
        with torch.random.fork_rng(devices=[]):
            random.seed(sample_seed)
            np.random.seed(sample_seed)
            torch.default_generator.manual_seed(sample_seed)
            x = self.transform(img)
        random.setstate(py_state)
        np.random.set_state(np_state)
        return x, target


def _timm_dataset(cfg, split: str, is_training: bool):
    if not cfg.data_dir:
        raise DataError(f"no data: give DATA_DIR, the folder that holds {cfg.dataset} (nothing is downloaded)")
    try:
        ds = create_dataset(
            cfg.dataset,
            root=cfg.data_dir or None,
            split=split,
            is_training=is_training,
            download=False,
            batch_size=cfg.batch_size,
        )
    except Exception as e:  # timm raises many kinds; say which dataset failed
        raise DataError(f"cannot open dataset {cfg.dataset!r} (split {split!r}) at {cfg.data_dir!r}: {e}") from e
    if isinstance(ds, torch.utils.data.IterableDataset):
        raise DataError(f"dataset {cfg.dataset!r} is iterable; only map-style datasets are supported")
    return ds


def _num_classes(ds) -> int | None:
    for owner in (ds, getattr(ds, "reader", None)):
        for attr in ("classes", "class_to_idx"):
            if owner is not None and getattr(owner, attr, None):
                return len(getattr(owner, attr))
    return None


def _data_root(cfg) -> Path:
    if not cfg.data_dir:
        raise DataError("no data: give DATA_DIR (with train/ and val/ folders) or --dataset digits")
    return Path(cfg.data_dir)


def _folder_splits(cfg):
    root = _data_root(cfg)
    train = ImageFolder(find_split(root, (cfg.train_split,)), skip_bad_images=cfg.skip_bad_images)
    val_dir = find_split(root, (cfg.val_split,) if cfg.val_split else VAL_NAMES)
    val = ImageFolder(val_dir, classes=train.classes, skip_bad_images=cfg.skip_bad_images)
    return train, val, len(train.classes)


def build_datasets(cfg):
    """(train set, val set, number of classes), transforms applied, train samples seeded."""
    if cfg.dataset == "digits":
        train, val, num_classes = Digits(cfg.train_split), Digits(cfg.val_split or "val"), 10
    elif cfg.dataset in ("", "folder"):
        train, val, num_classes = _folder_splits(cfg)
    else:
        train = _timm_dataset(cfg, cfg.train_split, True)
        val = _timm_dataset(cfg, cfg.val_split or "validation", False)
        num_classes = _num_classes(train)
    return (
        Transformed(train, train_transform(cfg), seed=cfg.seed),
        Transformed(val, eval_transform(cfg)),
        num_classes,
    )


def build_eval_dataset(cfg):
    """The validation set alone (for `dinat validate`): DATA_DIR/val, DATA_DIR/validation or DATA_DIR.
    Classes are numbered as `dinat train` numbers them: by the training folder's classes when it is
    there (a validation folder may lack some), else by the folder's own."""
    if cfg.dataset == "digits":
        return Transformed(Digits(cfg.val_split or "val"), eval_transform(cfg)), 10
    if cfg.dataset not in ("", "folder"):
        ds = _timm_dataset(cfg, cfg.val_split or "validation", False)
        return Transformed(ds, eval_transform(cfg)), _num_classes(ds)
    root = _data_root(cfg)
    if cfg.val_split:  # asked for: it must be there
        folder = find_split(root, (cfg.val_split,))
    else:  # val/, validation/, or the class folders themselves
        folder = next((root / n for n in VAL_NAMES if (root / n).is_dir()), root)
    train = root / cfg.train_split
    if cfg.train_split != "train" and not train.is_dir():  # asked for: it must be there
        raise DataError(f"train_split {cfg.train_split!r}: no folder {train}")
    classes = class_folders(train) if folder != root and train.is_dir() else None
    ds = ImageFolder(folder, classes=classes, skip_bad_images=cfg.skip_bad_images)
    if classes is None and cfg.num_classes and cfg.num_classes != len(ds.classes):
        where = (
            f"put the training folder beside it ({train})"
            if folder != root
            else (f"give the folder that holds it and the training folder ({cfg.train_split}/)")
        )
        raise DataError(
            f"{folder}: its labels are numbered by its {len(ds.classes)} class folders, so they cannot be "
            f"those of a model of {cfg.num_classes} classes; {where} to number the classes as in training"
        )
    return Transformed(ds, eval_transform(cfg)), len(ds.classes)


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that starts an epoch at a global sample offset.

    The epoch's order is DistributedSampler's (a seeded permutation, repeated to a multiple of the
    number of processes) and rank r takes every `num_replicas`-th sample from `start + r`. Whatever
    the number of processes and the batch size, the samples of the first steps are a prefix of that
    order, so a run resumed mid-epoch with other ones still sees each sample of the epoch once.
    """

    def __init__(self, dataset, num_replicas: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.start = 0

    def __iter__(self):
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        permutation = torch.randperm(len(self.dataset), generator=g).tolist()
        order = itertools.islice(itertools.cycle(permutation), self.total_size)
        mine = itertools.islice(order, self.start + self.rank, None, self.num_replicas)
        return itertools.islice(mine, len(self))  # the same number on every rank

    def __len__(self) -> int:
        return max(self.total_size - self.start, 0) // self.num_replicas


class ShardSampler(Sampler):
    """Every `world`-th sample from `rank`, in order, no padding: summed over ranks, each sample once."""

    def __init__(self, n: int, rank: int = 0, world: int = 1):
        self.indices = range(rank, n, world)

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def train_loader(dataset: Transformed, sampler: ResumableSampler, cfg, epoch: int, pin_memory: bool):
    """The loader of one epoch; its own generator keeps the global RNG untouched."""
    dataset.epoch = epoch
    sampler.set_epoch(epoch)
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=sampler,
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        drop_last=True,
        generator=torch.Generator().manual_seed(cfg.seed + epoch),
    )


def eval_loader(dataset, cfg, rank: int = 0, world: int = 1, pin_memory: bool = False):
    return DataLoader(
        dataset,
        batch_size=cfg.batch_size,
        sampler=ShardSampler(len(dataset), rank, world),
        num_workers=cfg.workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(cfg.seed),
    )
