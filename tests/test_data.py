"""Data: folders, the embedded digits, bad data (missing, empty, corrupt, truncated, non-image,
grayscale / RGBA), and the per-sample seeding that makes runs resumable."""

from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from _train_utils import MODEL, TINY, write_pngs
from dinat import train
from dinat.cli import main
from dinat.config import make_config
from dinat.data import (
    DataError,
    Digits,
    ImageFolder,
    ResumableSampler,
    build_datasets,
    build_eval_dataset,
    class_folders,
)


def folder_config(root, **kw):
    return make_config({"data_dir": str(root), "img_size": 16, "crop_pct": 1.0, **kw}, check_model=False)


def test_folders_with_val_or_validation(tmp_path):
    write_pngs(tmp_path, classes=3, per_class=2, splits=("train", "validation"))
    train_set, val_set, classes = build_datasets(folder_config(tmp_path))
    assert (len(train_set), len(val_set), classes) == (6, 6, 3)
    x, y = train_set[0]
    assert x.shape == (3, 16, 16) and y == 0


def test_digits_split_is_deterministic_and_complete():
    train_set, val_set = Digits("train"), Digits("val")
    assert (len(train_set), len(val_set)) == (1437, 360)
    assert sorted(set(val_set.targets)) == list(range(10))
    img, _ = train_set[0]
    assert img.mode == "RGB" and img.size == (8, 8)
    assert np.array_equal(Digits("val").images, val_set.images)
    cfg = make_config({"dataset": "digits", "img_size": 32, "crop_pct": 1.0}, check_model=False)
    _, val, classes = build_datasets(cfg)
    assert classes == 10 and val[0][0].shape == (3, 32, 32)


def test_missing_directory_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="data directory not found: .*nowhere"):
        build_datasets(folder_config(tmp_path / "nowhere"))
    (tmp_path / "train" / "a").mkdir(parents=True)
    Image.new("RGB", (4, 4)).save(tmp_path / "train" / "a" / "x.png")
    with pytest.raises(DataError, match="has no val/ or validation/ folder"):
        build_datasets(folder_config(tmp_path))


def test_empty_class_folder_is_a_clear_error(tmp_path):
    write_pngs(tmp_path, per_class=2)
    (tmp_path / "train" / "class_9").mkdir()
    (tmp_path / "train" / "class_9" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match="class folder .*class_9 has no images"):
        build_datasets(folder_config(tmp_path))


def test_non_image_files_are_ignored_and_gray_rgba_converted(tmp_path):
    folder = tmp_path / "train" / "a"
    folder.mkdir(parents=True)
    (folder / "README.md").write_text("hello")
    (folder / "labels.csv").write_text("1,2")
    Image.new("L", (5, 5), 128).save(folder / "gray.png")
    Image.new("RGBA", (5, 5), (10, 20, 30, 0)).save(folder / "rgba.png")
    Image.new("P", (5, 5)).save(folder / "palette.gif")
    Image.new("CMYK", (5, 5)).save(folder / "cmyk.jpg")
    ds = ImageFolder(tmp_path / "train")
    assert len(ds) == 4
    for i in range(4):
        img, target = ds[i]
        assert img.mode == "RGB" and target == 0


def test_sixteen_bit_grayscale_keeps_its_levels(tmp_path):
    """A 16-bit PNG (0..65535) maps onto 0..255; Pillow's own conversion clips it to white."""
    folder = tmp_path / "a"
    folder.mkdir()
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    Image.fromarray(ramp).save(folder / "ramp16.png")
    img, _ = ImageFolder(tmp_path)[0]
    levels = np.asarray(img)
    assert img.mode == "RGB" and levels.min() == 0 and levels.max() == 255
    np.testing.assert_allclose(levels[..., 0], ramp / 257.0, atol=0.5)


def test_a_link_loop_in_a_class_folder_is_walked_once(tmp_path):
    write_pngs(tmp_path, per_class=2, splits=("train",))
    (tmp_path / "train" / "class_0" / "loop").symlink_to(tmp_path / "train" / "class_0")
    (tmp_path / "train" / "class_0" / "elsewhere").symlink_to(tmp_path / "train" / "class_1")
    ds = ImageFolder(tmp_path / "train")
    assert [t for _, t in ds.samples] == [0, 0, 0, 0, 1, 1]  # class_1's images linked into class_0 count there


def make_bad_images(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    buf = folder / "whole.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf)
    data = buf.read_bytes()
    buf.unlink()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])


def test_corrupt_and_truncated_images_name_the_file(tmp_path):
    write_pngs(tmp_path, per_class=2)
    make_bad_images(tmp_path / "train" / "class_0")
    ds = ImageFolder(tmp_path / "train")
    names = [p.split("/")[-1] for p, _ in ds.samples]
    for bad in ("corrupt.png", "truncated.jpg"):
        with pytest.raises(DataError, match=rf"cannot read image .*{bad}.*--skip-bad-images"):
            ds[names.index(bad)]


def test_skip_bad_images_warns_with_a_count(tmp_path):
    write_pngs(tmp_path, per_class=2)
    make_bad_images(tmp_path / "train" / "class_0")
    with pytest.warns(UserWarning) as record:
        ds = ImageFolder(tmp_path / "train", skip_bad_images=True)
    messages = [str(w.message) for w in record]
    assert any("skipped 2 bad image(s) of 6" in m for m in messages)
    assert any("corrupt.png" in m for m in messages) and any("truncated.jpg" in m for m in messages)
    assert len(ds) == 4 and all(ds[i][0].mode == "RGB" for i in range(4))
    for good in (tmp_path / "val").glob("class_*/*.png"):
        good.unlink()
    make_bad_images(tmp_path / "val" / "class_0")
    (tmp_path / "val" / "class_1" / "corrupt.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"val: none of its 3 images can be read"), pytest.warns(UserWarning):
        ImageFolder(tmp_path / "val", skip_bad_images=True)


@pytest.mark.slow
def test_training_on_a_bad_image_fails_naming_it_or_skips_it(tmp_path, capsys):
    write_pngs(tmp_path, per_class=4)
    make_bad_images(tmp_path / "train" / "class_1")
    args = [str(tmp_path), *TINY, "--epochs", "1", "--output", str(tmp_path / "out")]
    with pytest.raises(DataError, match=r"cannot read image .*(corrupt\.png|truncated\.jpg)"):
        train.main(args)
    with pytest.warns(UserWarning, match="skipped 2 bad image"):
        summary = train.main([*args, "--skip-bad-images"])
    assert summary["epoch"] == 1
    # read in a loader process, the error is still one line naming the file
    assert main(["train", *args, "--workers", "1", "--output", str(tmp_path / "out2")]) == 2
    err = capsys.readouterr().err
    assert re.search(r"error: cannot read image .*(corrupt\.png|truncated\.jpg).*--skip-bad-images[^\n]*\)\n$", err)
    assert "Traceback" not in err and "worker" not in err


def test_cli_reports_data_errors(tmp_path, capsys):
    assert main(["train", str(tmp_path / "missing"), "--model", MODEL]) == 2
    assert "data directory not found" in capsys.readouterr().err
    write_pngs(tmp_path, per_class=2)
    assert main(["train", str(tmp_path), *TINY, "--batch-size", "6"]) == 2
    assert "4 training images are fewer than one batch (6 x 1 processes); lower --batch-size" in capsys.readouterr().err


def test_a_split_asked_for_must_exist(tmp_path):
    """--split names a folder (or a digits split) that must be there: no silent fallback."""
    write_pngs(tmp_path, per_class=2)
    with pytest.raises(DataError, match="has no test/ folder"):
        build_eval_dataset(folder_config(tmp_path, val_split="test"))
    with pytest.raises(DataError, match="digits split must be 'train' or 'val', not 'test'"):
        build_eval_dataset(make_config({"dataset": "digits", "val_split": "test"}, check_model=False))
    with pytest.raises(DataError, match="digits split must be 'train' or 'val', not 'training'"):
        build_datasets(make_config({"dataset": "digits", "train_split": "training"}, check_model=False))
    assert len(build_eval_dataset(folder_config(tmp_path, val_split="train"))[0]) == 4


def test_augmentation_depends_on_seed_epoch_and_index_only(tmp_path):
    """The same sample gets the same augmentation whatever came before it (resume, workers, ranks)."""
    write_pngs(tmp_path, per_class=2, size=24)
    cfg = folder_config(tmp_path)
    train_set, _, _ = build_datasets(cfg)
    first = train_set[3][0]
    torch.rand(5), np.random.rand(3)  # other draws in between change nothing
    state = torch.get_rng_state()
    assert torch.equal(train_set[3][0], first)
    assert torch.equal(torch.get_rng_state(), state), "augmenting must not move the global RNG"
    train_set.epoch = 1
    assert not torch.equal(train_set[3][0], first)


def test_validate_numbers_classes_as_training_does(tmp_path, capsys):
    """A validation folder without some class keeps the training folder's numbering (dinat train's)."""
    write_pngs(tmp_path, classes=3, per_class=2)
    for image in (tmp_path / "val" / "class_0").iterdir():
        image.unlink()
    (tmp_path / "val" / "class_0").rmdir()
    ds, classes = build_eval_dataset(folder_config(tmp_path))
    assert classes == 3 and sorted({t for _, t in ds.base.samples}) == [1, 2]
    _, val_set, _ = build_datasets(folder_config(tmp_path))
    assert ds.base.samples == val_set.base.samples
    with pytest.raises(DataError, match="no data: give DATA_DIR"):
        build_eval_dataset(folder_config(""))
    assert main(["validate", "--model", MODEL, "--pretrained", "--dataset", "digts"]) == 2
    assert "unknown dataset 'digts'; did you mean 'digits'?" in capsys.readouterr().err


def test_classes_are_numbered_in_timms_natural_order(tmp_path):
    """'2' before '10', as timm (and so the original) numbered class folders."""
    for name in ("10", "2", "1", "b", "a10", "a9", ".hidden"):
        (tmp_path / name).mkdir()
    assert class_folders(tmp_path) == ["1", "2", "10", "a9", "a10", "b"]


def test_validate_without_split_folders(tmp_path):
    write_pngs(tmp_path, per_class=2, splits=("flat",))
    ds, classes = build_eval_dataset(folder_config(tmp_path / "flat"))
    assert (len(ds), classes) == (4, 2)
    # numbered by its own 2 folders, the labels cannot be a 3-class model's (one class is missing)
    with pytest.raises(DataError, match=r"numbered by its 2 class folders, so they cannot be those of a model of 3"):
        build_eval_dataset(folder_config(tmp_path / "flat", num_classes=3))
    with pytest.raises(DataError, match=r"train_split 'trian': no folder .*trian"):
        build_eval_dataset(folder_config(tmp_path, val_split="flat", train_split="trian"))


def test_pretrained_validation_of_self_numbered_folders_is_refused(tmp_path, monkeypatch, capsys):
    """--pretrained implies the released head's classes (1000 for ImageNet's): a folder numbered by its
    own 2 class folders (a subset of ImageNet's, say) is refused, as with --num-classes, before any
    weights are loaded."""
    write_pngs(tmp_path, per_class=1, splits=("flat",))
    monkeypatch.setattr("timm.models.load_pretrained", lambda *a, **k: pytest.fail("weights loaded"))
    assert main(["validate", str(tmp_path / "flat"), "--model", MODEL, "--pretrained", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    released = timm.models.get_pretrained_cfg(MODEL).num_classes
    assert f"numbered by its 2 class folders, so they cannot be those of a model of {released} classes" in err
    assert "give the folder that holds it and the training folder (train/)" in err


@pytest.mark.parametrize("aa", ["rand-m9-mstd0.5-inc1", "rand-m9-mstd0.5", "augmix-m5-w4-d2", "original", "v0"])
def test_every_augmentation_runs_at_every_magnitude(aa):
    """Each op of the recipe's RandAugment (and timm's other policies) at magnitudes 0 and 10 on an
    RGB image (the loaders convert every image to RGB): Pillow 13 refuses the 0-bit posterize that
    timm asks for at magnitude 10; it gives a black image, as the original's Pillow did."""
    from dinat.data import _augment_ops, train_transform

    ops = _augment_ops(train_transform(make_config({"aa": aa, "img_size": 32}, check_model=False)))
    assert ops
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    for op in ops:
        op.prob, op.magnitude_std = 1.0, 0
        for op.magnitude in (0, 10):
            out = op(image)
            assert out.size == image.size and out.mode == image.mode, (op.name, op.magnitude)
    posterize = next(op for op in ops if "Posterize" in op.name)
    if posterize.name == "PosterizeIncreasing":
        posterize.magnitude = 10
        assert not np.asarray(posterize(image)).any()


@pytest.mark.parametrize("n", [48, 50, 29])
def test_resumable_sampler_hands_each_sample_of_an_epoch_out_once_whatever_the_processes(n):
    """Its order is DistributedSampler's; the batches already taken by `before` processes are a prefix
    of it, so those that `after` processes take from there complete the epoch."""
    data = list(range(n))
    for world in (1, 2, 3):
        for rank in range(world):
            ours = ResumableSampler(data, world, rank, seed=5)
            theirs = torch.utils.data.DistributedSampler(data, world, rank, shuffle=True, seed=5)
            ours.set_epoch(3), theirs.set_epoch(3)
            assert list(ours) == list(theirs) and len(ours) == len(theirs)
    for before, batch_before, steps, after in [(2, 4, 3, 1), (1, 3, 2, 3), (3, 2, 1, 2), (2, 2, 0, 2)]:
        taken = []
        for rank in range(before):
            sampler = ResumableSampler(data, before, rank, seed=5)
            taken += list(sampler)[: steps * batch_before]
        rest = []
        for rank in range(after):
            sampler = ResumableSampler(data, after, rank, seed=5)
            sampler.start = before * batch_before * steps
            assert len(sampler) == len(list(sampler)) == (sampler.total_size - sampler.start) // after
            rest += list(sampler)
        epoch = taken + rest
        if n % 6 == 0:  # no padding, nothing left over
            assert sorted(epoch) == data
        assert len(set(data) - set(epoch)) < after, "only the last, uneven samples may be left out"
        assert len(epoch) - len(set(epoch)) < max(before, after), "only the padding repeats samples"


def _write_raw_mnist(root, train: int = 8, test: int = 4) -> None:
    """A local MNIST in torchvision's raw format (nothing is downloaded): 28 x 28 grayscale digits."""
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", train), ("t10k", test)):
        pixels = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8).tobytes()
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + pixels)
        labels = (np.arange(n) % 10).astype(np.uint8).tobytes()
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels)


def test_grayscale_timm_datasets_are_converted_to_rgb(tmp_path):
    """torchvision's MNIST gives grayscale ("L") images: they reach the model as RGB, as folders' do."""
    _write_raw_mnist(tmp_path)
    cfg = make_config({"data_dir": str(tmp_path), "dataset": "torch/mnist", "img_size": 16, "crop_pct": 1.0})
    train_set, val_set, classes = build_datasets(cfg)
    assert classes == 10 and train_set[0][0].shape == val_set[0][0].shape == (3, 16, 16)
    ds, _ = build_eval_dataset(cfg)
    x, target = ds[1]
    assert x.shape == (3, 16, 16) and target == 1
    pixels = x * torch.tensor(cfg.std)[:, None, None] + torch.tensor(cfg.mean)[:, None, None]
    assert torch.allclose(pixels[0], pixels[1], atol=1e-5) and torch.allclose(pixels[0], pixels[2], atol=1e-5)
    run = [str(tmp_path), "--dataset", "torch/mnist", *TINY, "--epochs", "1", "--output", str(tmp_path / "o")]
    summary = train.main(run)
    assert summary["epoch"] == 1
