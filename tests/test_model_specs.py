"""Every registered model against the release's facts (SPEC sections 2 and 3), table-driven:
architecture per block, stochastic depth, layer scale, qkv bias, the classifier reset, the
stems' and patch merging's bottom/right padding, and the checkpoint URLs."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.layers import DropPath
from torch import nn

from dinat.models import MODEL_NAMES, RelPosSelfAttention
from dinat.models._common import ALT_URLS, PatchEmbed
from dinat.models.dinat_s import PatchMerging

# SPEC section 2: dilation patterns per level, repeated to the level's depth
ONE = ((1,),) * 4
A = ((1, 8, 1), (1, 4, 1, 4), (1, 2), (1,))
B = ((1, 13, 1), (1, 6, 1, 6), (1, 3), (1,))
S224 = ((1, 8), (1, 4), (1, 2), (1, 1))
S384 = ((1, 13), (1, 6), (1, 3), (1, 1))

D_SHORT, D_LONG, D_SWIN, D_SWIN_LONG = (3, 4, 6, 5), (3, 4, 18, 5), (2, 2, 6, 2), (2, 2, 18, 2)
H2, H3, H4, H6 = (2, 4, 8, 16), (3, 6, 12, 24), (4, 8, 16, 32), (6, 12, 24, 48)

# name: (depths, heads, C, mlp ratio, drop_path, layer scale, kernel, dilations)
HIERARCHICAL = {
    "nat_mini": (D_SHORT, H2, 64, 3, 0.2, None, 7, ONE),
    "nat_tiny": (D_LONG, H2, 64, 3, 0.2, None, 7, ONE),
    "nat_small": (D_LONG, H3, 96, 2, 0.3, 1e-5, 7, ONE),
    "nat_base": (D_LONG, H4, 128, 2, 0.5, 1e-5, 7, ONE),
    "dinat_mini": (D_SHORT, H2, 64, 3, 0.2, None, 7, A),
    "dinat_tiny": (D_LONG, H2, 64, 3, 0.2, None, 7, A),
    "dinat_small": (D_LONG, H3, 96, 2, 0.3, None, 7, A),
    "dinat_base": (D_LONG, H4, 128, 2, 0.5, 1e-5, 7, A),
    "dinat_large": (D_LONG, H6, 192, 2, 0.35, None, 7, A),
    "dinat_large_384": (D_LONG, H6, 192, 2, 0.35, None, 7, B),
    "dinat_large_384_11x11": (D_LONG, H6, 192, 2, 0.35, None, 11, A),
    "dinat_large_21k": (D_LONG, H6, 192, 2, 0.2, None, 7, A),
    "dinat_large_21k_11x11": (D_LONG, H6, 192, 2, 0.2, None, 11, A),
    "dinat_s_tiny": (D_SWIN, H3, 96, 4, 0.2, None, 7, S224),
    "dinat_s_small": (D_SWIN_LONG, H3, 96, 4, 0.3, None, 7, S224),
    "dinat_s_base": (D_SWIN_LONG, H4, 128, 4, 0.5, None, 7, S224),
    "dinat_s_large": (D_SWIN_LONG, H6, 192, 4, 0.35, None, 7, S224),
    "dinat_s_large_384": (D_SWIN_LONG, H6, 192, 4, 0.35, None, 7, S384),
    "dinat_s_large_21k": (D_SWIN_LONG, H6, 192, 4, 0.2, None, 7, S224),
    # not in SPEC: the training demo's model, as its docstring gives it
    "dinat_nano": ((2, 2, 2, 2), (1, 2, 4, 8), 32, 2, 0.0, None, 5, ((1, 2), (1,), (1,), (1,))),
}

# name: (C, heads, drop_path, attention, dilation of odd blocks); 12 blocks, mlp 4, k 7
ISOTROPIC = {
    "nat_isotropic_small": (384, 12, 0.1, "na", 1),
    "dinat_isotropic_small": (384, 12, 0.1, "na", 2),
    "vitrpb_small": (384, 12, 0.1, "rpb", None),
    "nat_isotropic_base": (768, 24, 0.4, "na", 1),
    "dinat_isotropic_base": (768, 24, 0.4, "na", 2),
    "vitrpb_base": (768, 24, 0.4, "rpb", None),
}

# SPEC section 3: pretrained tag -> its URL (DiNAT_s ImageNet-1K: both names, the cfg's and its fallback)
_R = "https://shi-labs.com/projects/"
_NAT, _IN1K, _IN22K, _ISO = (
    _R + "nat/checkpoints/CLS/",
    _R + "dinat/checkpoints/imagenet1k/",
    _R + "dinat/checkpoints/imagenet22k/",
    _R + "dinat/checkpoints/isotropic/",
)
TAG_URLS = {
    "nat_mini.in1k": {_NAT + "nat_mini.pth"},
    "nat_tiny.in1k": {_NAT + "nat_tiny.pth"},
    "nat_small.in1k": {_NAT + "nat_small.pth"},
    "nat_base.in1k": {_NAT + "nat_base.pth"},
    "dinat_mini.in1k": {_IN1K + "dinat_mini_in1k_224.pth"},
    "dinat_tiny.in1k": {_IN1K + "dinat_tiny_in1k_224.pth"},
    "dinat_small.in1k": {_IN1K + "dinat_small_in1k_224.pth"},
    "dinat_base.in1k": {_IN1K + "dinat_base_in1k_224.pth"},
    "dinat_large.in22k_ft_in1k": {_IN1K + "dinat_large_in22k_in1k_224.pth"},
    "dinat_large.in22k": {_IN22K + "dinat_large_in22k_224.pth"},
    "dinat_large_384.in22k_ft_in1k": {_IN1K + "dinat_large_in22k_in1k_384.pth"},
    "dinat_large_384_11x11.in22k_ft_in1k": {_IN1K + "dinat_large_in22k_in1k_384_11x11.pth"},
    "dinat_large_21k.in22k": {_IN22K + "dinat_large_in22k_224.pth"},
    "dinat_large_21k_11x11.in22k": {_IN22K + "dinat_large_in22k_224_11x11interp.pth"},
    "dinat_s_tiny.in1k": {_IN1K + "dinat_s_tiny_in1k_224.pth", _IN1K + "dinat_s_tiny_1k_224.pth"},
    "dinat_s_small.in1k": {_IN1K + "dinat_s_small_in1k_224.pth", _IN1K + "dinat_s_small_1k_224.pth"},
    "dinat_s_base.in1k": {_IN1K + "dinat_s_base_in1k_224.pth", _IN1K + "dinat_s_base_1k_224.pth"},
    "dinat_s_large.in22k_ft_in1k": {_IN1K + "dinat_s_large_in1k_224.pth", _IN1K + "dinat_s_large_1k_224.pth"},
    "dinat_s_large.in22k": {_IN22K + "dinat_s_large_in22k_224.pth"},
    "dinat_s_large_384.in22k_ft_in1k": {_IN1K + "dinat_s_large_in1k_384.pth", _IN1K + "dinat_s_large_1k_384.pth"},
    "dinat_s_large_21k.in22k": {_IN22K + "dinat_s_large_in22k_224.pth"},
    **{
        f"{name}_{size}.in1k": {f"{_ISO}{name}_{size}_in1k_224.pth"}
        for name in ("nat_isotropic", "dinat_isotropic", "vitrpb")
        for size in ("small", "base")
    },
}


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return timm.create_model(name, **kwargs)


def drop_probs(blocks) -> list[float]:
    return [b.drop_path.drop_prob if isinstance(b.drop_path, DropPath) else 0.0 for b in blocks]


def linspace(rate: float, n: int) -> list[float]:
    return [rate * i / (n - 1) for i in range(n)]


def test_tables_cover_every_registered_model() -> None:
    registered = {n for module in ("nat", "dinat_s", "isotropic") for n in timm.list_models(module=module)}
    assert registered == set(MODEL_NAMES) == set(HIERARCHICAL) | set(ISOTROPIC)


@pytest.mark.parametrize("name", HIERARCHICAL)
def test_hierarchical_spec(name: str) -> None:
    """Per level and block: depth, heads, width, MLP width, kernel, dilation, layer scale; stochastic
    depth linspace(0, rate, all blocks)."""
    depths, heads, dim, mlp, drop_path, layer_scale, kernel, patterns = HIERARCHICAL[name]
    model = meta_model(name)
    expected, got = [], []
    for i, (stage, depth) in enumerate(zip(model.stages, depths, strict=True)):
        width = dim * 2**i
        dilations = [patterns[i][j % len(patterns[i])] for j in range(depth)]
        expected.append(
            [
                (heads[i], width, int(width * mlp), (kernel,) * 2, (d, d), (layer_scale is not None,) * 2)
                for d in dilations
            ]
        )
        got.append(
            [
                (
                    b.attn.num_heads,
                    b.norm1.normalized_shape[0],
                    b.mlp.fc1.out_features,
                    b.attn.kernel_size,
                    b.attn.dilation,
                    (b.gamma1 is not None, b.gamma2 is not None),
                )
                for b in stage.blocks
            ]
        )
    assert got == expected
    assert model.num_features == dim * 8
    blocks = [b for stage in model.stages for b in stage.blocks]
    assert drop_probs(blocks) == pytest.approx(linspace(drop_path, sum(depths)))


@pytest.mark.parametrize("name", ISOTROPIC)
def test_isotropic_spec(name: str) -> None:
    """12 blocks of the model's width and heads, MLP ratio 4, NA 7x7 with dilation 1 on even blocks
    (or ViT-rpb's (heads, 27, 27) bias table), 16x16 patches; stochastic depth linspace(0, rate, 12)."""
    dim, heads, drop_path, attention, dilation = ISOTROPIC[name]
    model = meta_model(name)
    assert len(model.layers) == 12 and model.patch_embed.patch_size == 16 and model.num_features == dim
    for i, block in enumerate(model.layers):
        widths = (block.norm1.normalized_shape[0], block.mlp.fc1.out_features)
        assert block.attn.num_heads == heads and widths == (dim, 4 * dim)
        assert block.gamma1 is None and block.gamma2 is None
        if attention == "rpb":
            assert isinstance(block.attn, RelPosSelfAttention) and block.attn.rpb.shape == (heads, 27, 27)
        else:
            d = 1 if i % 2 == 0 else dilation
            assert (block.attn.kernel_size, block.attn.dilation) == ((7, 7), (d, d))
    assert drop_probs(model.layers) == pytest.approx(linspace(drop_path, 12))


@pytest.mark.parametrize("name", [n for n, row in HIERARCHICAL.items() if row[5] is not None])
def test_layer_scale_value(name: str) -> None:
    """gamma1/gamma2 start at the layer-scale value (shallow levels keep it fast; the full models'
    gammas are checked on the meta device above)."""
    model = timm.create_model(name, depths=(3, 4, 2, 1), num_classes=0)
    gammas = [p for n, p in model.named_parameters() if n.endswith(("gamma1", "gamma2"))]
    assert len(gammas) == 20
    assert all(torch.equal(g, torch.full_like(g, HIERARCHICAL[name][5])) for g in gammas)


@pytest.mark.parametrize("name", ["dinat_nano", "dinat_s_tiny", "nat_isotropic_small", "vitrpb_small"])
def test_qkv_bias_false(name: str) -> None:
    with_bias = meta_model(name).state_dict()
    without = meta_model(name, qkv_bias=False).state_dict()
    blocks = sum(k.endswith("attn.proj.bias") for k in with_bias)
    assert blocks > 0 and sum(k.endswith("attn.qkv.bias") for k in with_bias) == blocks
    assert not [k for k in without if k.endswith("attn.qkv.bias")]
    assert sum(k.endswith("attn.proj.bias") for k in without) == blocks


@pytest.mark.parametrize("name", ["dinat_large", "dinat_s_large", "vitrpb_base"])
def test_reset_classifier_initialises_head(name: str) -> None:
    """The new head: trunc_normal(std .02) weight, zero bias (SPEC section 2's init)."""
    model = meta_model(name)
    torch.manual_seed(0)
    model.reset_classifier(7)  # outside the meta context: a real head
    head = model.get_classifier()
    assert head.weight.shape == (7, model.num_features)
    assert torch.equal(head.bias, torch.zeros(7))
    assert head.weight.std().item() == pytest.approx(0.02, abs=1e-3)
    assert abs(head.weight.mean().item()) < 1e-3


def test_patch_merging_pads_bottom_right() -> None:
    """Odd maps get a zero row/column at the bottom/right; each output token is norm then reduction
    of [x(2i, 2j), x(2i+1, 2j), x(2i, 2j+1), x(2i+1, 2j+1)]."""
    torch.manual_seed(0)
    channels = 3
    merge = PatchMerging(channels)
    nn.init.normal_(merge.norm.weight)
    nn.init.normal_(merge.norm.bias)
    x = torch.randn(1, 5, 7, channels)
    padded = torch.zeros(1, 6, 8, channels)
    padded[:, :5, :7] = x
    expected = torch.empty(1, 3, 4, 2 * channels)
    for i in range(3):
        for j in range(4):
            token = torch.cat(
                [
                    padded[0, 2 * i, 2 * j],
                    padded[0, 2 * i + 1, 2 * j],
                    padded[0, 2 * i, 2 * j + 1],
                    padded[0, 2 * i + 1, 2 * j + 1],
                ]
            )
            expected[0, i, j] = merge.reduction(merge.norm(token))
    with torch.no_grad():
        torch.testing.assert_close(merge(x), expected.detach())


def test_patch_embed_pads_bottom_right() -> None:
    """A 220x209 image is zero-padded to 224x224 at the bottom/right before the 16x16 patch conv."""
    torch.manual_seed(0)
    embed = PatchEmbed(16, 3, 8)
    image = torch.randn(1, 3, 220, 209)
    padded = torch.zeros(1, 3, 224, 224)
    padded[..., :220, :209] = image
    with torch.no_grad():
        expected = embed.norm(embed.proj(padded).permute(0, 2, 3, 1))
        torch.testing.assert_close(embed(image), expected)
    assert expected.shape == (1, 14, 14, 8)


def test_checkpoint_urls() -> None:
    """Every pretrained tag's URL (with its fallbacks) is SPEC section 3's, and every SPEC URL is used."""
    tags = [t for t in timm.list_pretrained() if t.split(".")[0] in MODEL_NAMES]
    assert sorted(tags) == sorted(TAG_URLS)
    for tag in tags:
        url = timm.models.get_pretrained_cfg(tag).url
        assert {url, *ALT_URLS.get(url, ())} == TAG_URLS[tag], tag
    assert set(ALT_URLS) <= {timm.models.get_pretrained_cfg(t).url for t in tags}
