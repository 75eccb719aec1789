"""ImageNet-style image folders (one subfolder per class) that fail clearly on bad data."""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image
from timm.utils.misc import natural_key
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class DataError(ValueError):
    """A data directory or file that cannot be used; the message names it."""


def to_rgb(img: Image.Image) -> Image.Image:
    """``img`` in RGB (from grayscale of 8 or 16 bits, palette, RGBA, CMYK; RGB as it is)."""
    if img.mode == "RGB":
        return img
    if img.mode == "P":
        img = img.convert("RGBA")
    elif img.mode == "I" or img.mode.startswith("I;16"):  # 16-bit grayscale: Pillow would clip at 255
        levels = np.asarray(img, dtype=np.float64) / 257.0
        img = Image.fromarray(np.clip(levels.round(), 0, 255).astype(np.uint8))
    return img.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Read an image fully and convert it to RGB (:func:`to_rgb`)."""
    try:
        with Image.open(path) as img:
            img.load()  # decode now, so a truncated file fails here
            return to_rgb(img) if img.mode != "RGB" else img.copy()  # (the copy outlives the file)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image {path}: {e} (use --skip-bad-images to skip such files)") from e


def _is_readable(path: str) -> bool:
    try:
        load_rgb(path)
    except DataError:
        return False
    return True


def list_images(folder: Path) -> list[str]:
    """Image files under `folder` (recursively, sorted); other files are ignored."""
    found, seen = [], set()
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        seen.add(os.path.realpath(dirpath))  # a link back up (a loop) is walked once
        dirnames[:] = sorted(
            d for d in dirnames if not d.startswith(".") and os.path.realpath(os.path.join(dirpath, d)) not in seen
        )
        found += [
            os.path.join(dirpath, f)
            for f in sorted(filenames)
            if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith(".")
        ]
    return found


class ImageFolder(Dataset):
    """Samples (PIL RGB image, class index) from `root/CLASS/**/IMAGE`.

    `classes` fixes the class list (a validation folder uses the training folder's); a class
    folder without images is an error; with `skip_bad_images` every image is decoded once up front
    and the unreadable ones are dropped with a warning and a count.
    """

    def __init__(self, root: str | Path, classes: list[str] | None = None, skip_bad_images: bool = False):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"data directory not found: {self.root}")
        found = class_folders(self.root)
        self.classes = list(classes) if classes is not None else found
        index = {name: i for i, name in enumerate(self.classes)}
        unknown = [name for name in found if name not in index]
        if unknown:
            raise DataError(f"{self.root}: class folders {unknown} are not among the training classes")
        self.samples: list[tuple[str, int]] = []
        for name in found:
            files = list_images(self.root / name)
            if not files:
                raise DataError(f"class folder {self.root / name} has no images ({', '.join(IMAGE_EXTENSIONS)})")
            self.samples += [(f, index[name]) for f in files]
        self.skipped: list[str] = []
        if skip_bad_images:
            self._drop_unreadable()

    def _drop_unreadable(self) -> None:
        with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) * 2)) as pool:
            ok = list(pool.map(_is_readable, [f for f, _ in self.samples]))
        self.skipped = [f for (f, _), good in zip(self.samples, ok, strict=True) if not good]
        self.samples = [s for s, good in zip(self.samples, ok, strict=True) if good]
        if self.skipped:  # one warning, naming the files
            total = len(self.skipped) + len(self.samples)
            warnings.warn(
                f"{self.root}: skipped {len(self.skipped)} bad image(s) of {total}: " + ", ".join(self.skipped),
                stacklevel=2,
            )
        if not self.samples:
            raise DataError(f"{self.root}: none of its {len(self.skipped)} images can be read")

    @property
    def targets(self) -> list[int]:
        return [t for _, t in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        path, target = self.samples[i]
        return load_rgb(path), target


def class_folders(root: Path) -> list[str]:
    """The class names of an image folder: its subfolders in timm's natural order ('2' before '10',
    as the original's timm numbered them), hidden ones left out."""
    found = sorted((d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")), key=natural_key)
    if not found:
        raise DataError(f"{root} has no class folders (expected one subfolder of images per class)")
    return found


def find_split(root: str | Path, names: tuple[str, ...]) -> Path:
    """The first of `root/NAME` that exists, or a clear error."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"data directory not found: {root}")
    for name in names:
        if (root / name).is_dir():
            return root / name
    raise DataError(f"{root} has no {' or '.join(n + '/' for n in names)} folder")
