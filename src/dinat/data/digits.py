"""The embedded demo dataset: scikit-learn's handwritten digits (1,797 8x8 images, no download)."""

from __future__ import annotations

import numpy as np
from PIL import Image
from torch.utils.data import Dataset

from .folder import DataError

VAL_FRACTION = 0.2
SPLIT_SEED = 0


class Digits(Dataset):
    """The 10-class digits as RGB PIL images (8x8; the transforms upsample them).

    The split is fixed: a stratified 80/20 split with a constant seed (1,437 train, 360 val).
    """

    classes = [str(d) for d in range(10)]

    def __init__(self, split: str = "train"):
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        if split not in ("train", "val"):
            raise DataError(f"digits split must be 'train' or 'val', not {split!r}")
        data = load_digits()
        pixels = np.round(data.images * (255.0 / 16.0)).astype(np.uint8)
        idx_train, idx_val = train_test_split(
            np.arange(len(pixels)), test_size=VAL_FRACTION, random_state=SPLIT_SEED, stratify=data.target
        )
        keep = idx_train if split == "train" else idx_val
        self.images = pixels[keep]
        self.targets = [int(t) for t in data.target[keep]]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return Image.fromarray(self.images[i], mode="L").convert("RGB"), self.targets[i]
