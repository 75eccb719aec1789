"""The training recipe of SPEC section 4, piece by piece: loss and mixing, optimizer, schedule,
gradient clipping, augmentation, loaders, evaluation, resumed settings, FLOPs and checkpoint ranking."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torchvision.transforms import CenterCrop, ColorJitter, InterpolationMode, Resize

from _train_utils import MODEL, TINY, write_pngs
from dinat import train
from dinat.config import NOT_RESUMED, Config, make_config
from dinat.data import ResumableSampler, Transformed, eval_loader, eval_transform, train_loader, train_transform
from dinat.flops import count
from dinat.layers import NeighborhoodAttention2D
from dinat.validate import evaluate

CONFIGS = Path(__file__).parent.parent / "configs"
CPU = torch.device("cpu")


def test_default_loss_is_soft_targets_of_mixup_cutmix_with_smoothing_and_pixel_erasing():
    """Defaults: mixup 0.8, cutmix 1.0 (prob 1.0, switch 0.5, per batch) with label smoothing 0.1 in
    the soft targets; random erasing 0.25 of the mixed batch, per-pixel, one region."""
    criterion, mixup, erase = train.build_criterion(Config(), 1000, CPU)
    assert isinstance(criterion, SoftTargetCrossEntropy)
    settings = (mixup.mixup_alpha, mixup.cutmix_alpha, mixup.mix_prob, mixup.switch_prob, mixup.mode)
    assert settings == (0.8, 1.0, 1.0, 0.5, "batch")
    assert (mixup.label_smoothing, mixup.num_classes) == (0.1, 1000)
    assert isinstance(erase, RandomErasing)
    assert (erase.probability, erase.mode, erase.min_count, erase.max_count) == (0.25, "pixel", 1, 1)


def test_fine_tuning_without_mixing_smooths_the_labels_and_erases_in_the_transform():
    """dinat_large.yml (no mixup/cutmix): cross entropy with label smoothing 0.1; random erasing 0.25
    (pixel, one region) is the image transform's last step; plain cross entropy without smoothing."""
    cfg = make_config(config_file=CONFIGS / "dinat_large.yml")
    criterion, mixup, erase = train.build_criterion(cfg, 1000, CPU)
    assert isinstance(criterion, LabelSmoothingCrossEntropy) and criterion.smoothing == 0.1
    assert mixup is None and erase is None
    last = train_transform(cfg).transforms[-1]
    assert isinstance(last, RandomErasing)
    assert (last.probability, last.mode, last.max_count) == (0.25, "pixel", 1)
    plain, _, _ = train.build_criterion(Config(smoothing=0.0, mixup=0.0, cutmix=0.0), 10, CPU)
    assert type(plain) is torch.nn.CrossEntropyLoss


class Attention(nn.Module):
    """A module without ``no_weight_decay()``: its rpb is left undecayed by the name pattern alone."""

    def __init__(self):
        super().__init__()
        self.attn = NeighborhoodAttention2D(8, 2, 3)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 4)


@pytest.mark.parametrize("make_model", [lambda: timm.create_model(MODEL), Attention], ids=[MODEL, "attention"])
def test_optimizer_is_adamw_without_weight_decay_on_rpb_norms_and_biases(make_model):
    """AdamW, lr 1e-3, eps 1e-8, betas (0.9, 0.999), weight decay 0.05 on the weight matrices only:
    0 on every relative positional bias (rpb), norm weight and bias."""
    model = make_model()
    optimizer = train.build_optimizer(Config(), model, world=1)
    assert isinstance(optimizer, torch.optim.AdamW)
    decay_of = {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}
    names = dict(model.named_parameters())
    assert len(decay_of) == len(names)
    undecayed = {n for n, p in names.items() if n.endswith("rpb") or n.endswith(".bias") or p.ndim == 1}
    assert any(n.endswith("rpb") for n in undecayed) and len(undecayed) < len(names)
    for name, p in names.items():
        assert decay_of[id(p)] == (0.0 if name in undecayed else 0.05), name
    for group in optimizer.param_groups:
        assert (group["lr"], group["eps"], group["betas"]) == (1e-3, 1e-8, (0.9, 0.999))


def lrs_at(cfg: Config, steps: list[int], steps_per_epoch: int = 10) -> tuple[list[float], int]:
    """The lr of each step in ``steps`` under :func:`train.build_scheduler`, and the epochs it counts."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    scheduler, epochs = train.build_scheduler(cfg, optimizer, steps_per_epoch)
    lrs = []
    for step in steps:
        scheduler.step_update(step)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs, epochs


def test_cosine_schedule_warms_up_from_warmup_lr_then_decays_to_min_lr():
    """Defaults, 10 steps an epoch: a linear warmup from 1e-6 over 20 epochs, overlaid on a cosine from
    1e-3 at step 0 to 5e-6 at epoch 300 (timm's, as the original's), then 10 cooldown epochs at 5e-6."""
    lrs, epochs = lrs_at(Config(), [0, 100, 200, 1500, 3000, 3099])

    def cosine(step: int) -> float:
        return 5e-6 + (1e-3 - 5e-6) * (1 + math.cos(math.pi * step / 3000)) / 2

    warm = 1e-6 + (1e-3 - 1e-6) / 2  # halfway through the warmup, towards the lr
    assert lrs == pytest.approx([1e-6, warm, cosine(200), cosine(1500), 5e-6, 5e-6], rel=1e-6)
    assert epochs == 310


def test_linear_schedule_of_fine_tuning_decays_linearly_to_min_lr():
    """dinat_large.yml: `linear` is a linear decay from lr 5e-5 to min_lr 5e-6 over 30 epochs, no warmup."""
    cfg = make_config(config_file=CONFIGS / "dinat_large.yml")
    lrs, epochs = lrs_at(cfg, [0, 75, 150, 300])
    assert lrs == pytest.approx([5e-5 - (5e-5 - 5e-6) * f for f in (0, 0.25, 0.5, 1)], rel=1e-6)
    assert epochs == 30


def test_gradients_are_clipped_by_their_norm_at_5(tmp_path, monkeypatch):
    """Each step clips the gradients' total norm to 5.0 (clip_grad_norm_, not their values)."""
    max_norms = []
    clip = torch.nn.utils.clip_grad_norm_

    def recording(parameters, max_norm, *args, **kwargs):
        max_norms.append(max_norm)
        return clip(parameters, max_norm, *args, **kwargs)

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", recording)
    root = write_pngs(tmp_path / "data")
    summary = train.main([str(root), *TINY, "--epochs", "1", "--max-steps", "1", "--output", str(tmp_path / "run")])
    assert summary["step"] == 1 and max_norms == [5.0]


def test_train_transform_is_the_recipes_augmentation():
    """Random-resized crop (scale 0.08-1, ratio 3/4-4/3) at a random interpolation (bilinear or
    bicubic), hflip 0.5, RandAugment rand-m9-mstd0.5-inc1 (two ops), ImageNet mean and std; color
    jitter 0.4 where there is no auto-augment (timm leaves it out with one)."""
    crop, flip, augment, _, normalize = train_transform(Config()).transforms
    assert crop.interpolation == (InterpolationMode.BILINEAR, InterpolationMode.BICUBIC)
    assert (crop.size, crop.scale, crop.ratio) == ((224, 224), (0.08, 1.0), pytest.approx((3 / 4, 4 / 3)))
    assert flip.p == 0.5
    assert augment.num_layers == 2 and len(augment.ops) == 15
    assert {(op.magnitude, op.magnitude_std, op.prob) for op in augment.ops} == {(9, 0.5, 0.5)}
    assert {"PosterizeIncreasing", "SolarizeIncreasing", "ColorIncreasing"} <= {op.name for op in augment.ops}
    assert normalize.mean.tolist() == pytest.approx([0.485, 0.456, 0.406])
    assert normalize.std.tolist() == pytest.approx([0.229, 0.224, 0.225])
    jitter = next(t for t in train_transform(Config(aa="none")).transforms if isinstance(t, ColorJitter))
    assert jitter.brightness == jitter.contrast == jitter.saturation == pytest.approx((0.6, 1.4))


@pytest.mark.parametrize(("img_size", "crop_pct", "resized"), [(224, 0.875, 256), (32, 1.0, 32)])
def test_eval_transform_resizes_to_img_over_crop_pct_then_center_crops(img_size, crop_pct, resized):
    """Evaluation: bicubic resize of the short side to img_size / crop_pct, then a center crop of img_size."""
    resize, crop, *_ = eval_transform(Config(img_size=img_size, crop_pct=crop_pct)).transforms
    assert isinstance(resize, Resize) and isinstance(crop, CenterCrop)
    assert (resize.size, resize.interpolation, crop.size) == (resized, InterpolationMode.BICUBIC, (img_size,) * 2)


def indices(n: int) -> Transformed:
    """n samples whose image and label are their index."""
    return Transformed([(torch.tensor(i), i) for i in range(n)], lambda x: x)


def test_train_loader_drops_the_last_partial_batch_and_reshuffles_each_epoch():
    """18 samples, batch 4: 4 full batches an epoch; the sampler's epoch is the loader's, so each
    epoch has another order."""
    dataset, cfg = indices(18), Config(batch_size=4, workers=0)
    sampler = ResumableSampler(dataset, num_replicas=1, rank=0, seed=cfg.seed)
    orders = []
    for epoch in (0, 1):
        loader = train_loader(dataset, sampler, cfg, epoch, pin_memory=False)
        assert sampler.epoch == epoch and len(loader) == 4
        batches = [y.tolist() for _, y in loader]
        assert [len(b) for b in batches] == [4] * 4
        orders.append(sum(batches, []))
    assert orders[0] != orders[1] and all(len(set(order)) == 16 for order in orders)


def test_eval_loader_gives_each_rank_every_world_th_sample():
    """Rank 1 of 2 evaluates samples 1, 3, 5, ... in order, without padding."""
    loader = eval_loader(indices(7), Config(batch_size=2, workers=0), rank=1, world=2)
    assert list(loader.sampler) == [1, 3, 5]
    assert [y.tolist() for _, y in loader] == [[1, 3], [5]]


class FixedLogits(nn.Module):
    """Returns row x of a fixed table for input index x."""

    def __init__(self, logits: torch.Tensor):
        super().__init__()
        self.register_buffer("logits", logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits[x]


def test_evaluate_counts_top1_top5_and_mean_loss():
    """7 classes, labels at ranks 0, 0, 3, 6 of their logits: top-1 50%, top-5 75%, loss the mean
    cross entropy, 4 images (in two batches)."""
    logits = torch.randn(4, 7, generator=torch.Generator().manual_seed(0))
    labels = torch.stack([row.argsort(descending=True)[rank] for row, rank in zip(logits, (0, 0, 3, 6))])
    batches = [(torch.tensor([0, 1]), labels[:2]), (torch.tensor([2, 3]), labels[2:])]
    metrics = evaluate(FixedLogits(logits), batches, CPU)
    assert (metrics["top1"], metrics["top5"], metrics["images"]) == (50.0, 75.0, 4)
    assert metrics["loss"] == pytest.approx(F.cross_entropy(logits, labels).item())


def test_resumed_run_keeps_settings_but_not_where_it_writes_or_starts(tmp_path):
    """A resumed run takes its saved config except output, resume, pretrained, initial_checkpoint
    and max_steps (those of the interrupted invocation)."""
    saved = tmp_path / "old" / "last.pth"
    saved.parent.mkdir()
    saved.write_bytes(b"")
    resumed = dict(
        output=str(saved.parent),
        resume=str(saved),
        pretrained=True,
        initial_checkpoint=str(saved),
        max_steps=7,
        lr=2e-4,
    )
    assert set(resumed) - {"lr"} == set(NOT_RESUMED)
    cfg = make_config(resumed=resumed)
    assert cfg.lr == 2e-4
    for key in NOT_RESUMED:
        assert getattr(cfg, key) == getattr(Config(), key), key


def test_flops_of_a_map_smaller_than_the_neighborhood_count_the_padded_map():
    """A 3x3 map under kernel 3, dilation 2 is padded to 6x6 (36 tokens) before qkv: qkv 36*8*24,
    q.k and attn.v 2*36*9*8, proj on the 9 cropped tokens 9*8*8 multiply-adds; the same for the
    module counted by itself as inside a model."""
    attention = NeighborhoodAttention2D(8, 2, 3, dilation=2)
    for model in (attention, nn.Sequential(attention)):
        _, flops = count(model, (3, 3, 8))  # a (1, 3, 3, 8) channels-last map
        assert flops == 36 * 8 * 24 + 2 * 36 * 9 * 8 + 9 * 8 * 8


def test_checkpoint_ranking_keeps_the_earlier_epoch_on_a_tie():
    """Of two epochs with the same score, the earlier one stays the best checkpoint."""
    assert train.rank_best([(50.0, 1)], 50.0, 2, hist=1) == [(50.0, 1)]
    assert train.rank_best([(50.0, 1)], 50.0, 2, hist=2) == [(50.0, 1), (50.0, 2)]
    assert train.rank_best([(50.0, 1)], 60.0, 2, hist=1) == [(60.0, 2)]
