"""Every model of the release: the original's state_dict layout, its logits (golden), the timm
interface, and clear errors for bad inputs."""

from __future__ import annotations

import math
import threading

import pytest
import timm
import torch
from timm.models import group_parameters

import dinat
from conftest import cpu_backends
from dinat import NeighborhoodAttention2D
from dinat.models import MODEL_NAMES
from dinat.models.isotropic import relative_position_index
from dinat.ops import requested_backend, use_backend

GOLDEN_KEYS = sorted(torch.load("tests/data/models.pt")["results"])


def rebuild_weight(index: int, key: str, shape: tuple[int, ...]) -> torch.Tensor:
    """The golden README's weight rule for the index-th state_dict entry."""
    if key.endswith("relative_position_index"):
        return relative_position_index(int(math.isqrt(shape[0])))
    r = torch.randn(shape, generator=torch.Generator().manual_seed(index))
    if len(shape) == 1:
        last = key.rsplit(".", 1)[-1]
        base = 1.0 if ("norm" in key and key.endswith(".weight")) or last.startswith("gamma") else 0.0
        return base + 0.1 * r
    if key.endswith("rpb"):
        return r
    return r / math.sqrt(math.prod(shape[1:]))


@pytest.mark.parametrize("key", GOLDEN_KEYS)
def test_golden(key: str, golden_models: dict) -> None:
    result = golden_models["results"][key]
    manifest = result["manifest"]
    with torch.device("meta"):
        model = dinat.create_model(result["model"])
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == [(k, tuple(shape)) for k, shape, _ in manifest]
    state_dict = {}
    for i, (k, shape, checksum) in enumerate(manifest):
        state_dict[k] = rebuild_weight(i, k, tuple(shape))
        assert state_dict[k].double().sum().item() == pytest.approx(checksum, rel=1e-6, abs=1e-6), k
    model.load_state_dict(state_dict, strict=True, assign=True)
    model.eval()
    height, width = result["input_size"]
    x = torch.randn(2, 3, height, width, generator=torch.Generator().manual_seed(12345))
    assert x.sum().item() == pytest.approx(result["input_sum"], abs=1e-3)
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(logits, result["logits"], rtol=1e-4, atol=5e-4)


SIZES = {"nat_small": 50.74}  # layer scale: 0.02M over DiNAT-S (golden manifest)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_registered(name: str) -> None:
    assert name in timm.list_models("*nat*") + timm.list_models("vitrpb*")
    with torch.device("meta"):
        model = timm.create_model(name)
    cfg = model.pretrained_cfg
    num_classes = 21841 if name.endswith(("_21k", "_21k_11x11")) else 10 if name == "dinat_nano" else 1000
    assert model.num_classes == cfg["num_classes"] == num_classes
    assert model.get_classifier().out_features == num_classes
    assert cfg["interpolation"] == "bicubic" and cfg["classifier"] == "head"
    assert cfg["mean"] == timm.data.IMAGENET_DEFAULT_MEAN and cfg["std"] == timm.data.IMAGENET_DEFAULT_STD
    assert model.get_submodule(cfg["first_conv"]).in_channels == 3
    if name == "dinat_nano":
        assert not cfg["url"]
        return
    assert cfg["url"].startswith("https://shi-labs.com/projects/") and cfg["url"].endswith(".pth")
    if "384" in name:
        assert cfg["input_size"] == (3, 384, 384) and cfg["crop_pct"] == 1.0
    else:
        assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875


def test_pretrained_tags() -> None:
    tags = set(timm.list_pretrained("dinat_large*")) | set(timm.list_pretrained("dinat_s_large*"))
    assert {"dinat_large.in22k_ft_in1k", "dinat_large.in22k", "dinat_s_large.in22k"} <= tags
    with torch.device("meta"):
        model = timm.create_model("dinat_large.in22k")
    assert model.num_classes == 21841 and model.pretrained_cfg["url"].endswith("dinat_large_in22k_224.pth")


def test_dinat_nano() -> None:
    model = dinat.create_model("dinat_nano")
    blocks = [[(b.attn.kernel_size, b.attn.dilation) for b in level.blocks] for level in model.levels]
    assert blocks[0] == [((5, 5), (1, 1)), ((5, 5), (2, 2))]
    assert all(d == (1, 1) for level in blocks[1:] for _, d in level)
    assert model.num_features == 256 and [b.attn.num_heads for b in model.levels[3].blocks] == [8, 8]
    assert all(isinstance(b.drop_path, torch.nn.Identity) for level in model.levels for b in level.blocks)
    for size in (32, 48, 64):
        assert model(torch.randn(2, 3, size, size)).shape == (2, 10)


def test_timm_interface() -> None:
    model = timm.create_model("dinat_mini").eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        feats = model.forward_features(x)
        assert feats.shape == (1, 2, 3, 512)
        assert model.forward_head(feats, pre_logits=True).shape == (1, model.num_features)
        torch.testing.assert_close(model.forward_head(feats), model(x))
    assert model.no_weight_decay_keywords() == {"rpb"}
    assert all(n.endswith("attn.rpb") for n in model.no_weight_decay()) and len(model.no_weight_decay()) == 18
    groups = group_parameters(model, model.group_matcher())
    assert len(groups) > 18 and sum(len(g) for g in groups.values()) == len(list(model.parameters()))
    # a stage's downsample runs after its last block and takes that block's group (layer decay)
    group_of = group_parameters(model, model.group_matcher(), reverse=True)  # name -> group
    assert group_of["levels.0.downsample.reduction.weight"] == group_of["levels.0.blocks.2.mlp.fc2.weight"]
    assert group_of["levels.1.blocks.0.norm1.weight"] == group_of["levels.0.downsample.norm.weight"] + 1
    assert group_of["norm.weight"] == group_of["levels.3.blocks.4.mlp.fc2.weight"]
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model(x).shape == (1, 7)
    model.reset_classifier(0, "")
    assert model(x).shape == (1, 2, 3, 512)


@pytest.mark.parametrize("name", ["dinat_nano", "dinat_s_tiny", "vitrpb_small"])
def test_grad_checkpointing_same_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, drop_path_rate=0.0)
    size = 224 if name.startswith("vitrpb") else 48
    x = torch.randn(1, 3, size, size)
    model(x).sum().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[n], rtol=1e-4, atol=1e-5, msg=n)


def test_grad_checkpointing_recomputes_on_the_forward_backend() -> None:
    """The recomputation runs on the forward's backend even in another thread (CUDA's backward runs
    in autograd's device thread, where use_backend's thread-local choice is not seen)."""
    model = timm.create_model("dinat_nano")
    model.set_grad_checkpointing(True)
    backends = []
    model.levels[0].blocks[0].attn.register_forward_hook(lambda *a: backends.append(requested_backend()))
    with use_backend("reference"):
        loss = model(torch.randn(1, 3, 32, 32)).sum()
    backward = threading.Thread(target=loss.backward)
    backward.start()
    backward.join()
    assert backends == ["reference", "reference"]  # forward, then recomputed in backward


@pytest.mark.parametrize("name", ["nat_isotropic_small", "vitrpb_small"])
def test_isotropic_refuses_other_grids(name: str) -> None:
    model = timm.create_model(name).eval()
    with pytest.raises(ValueError, match="14x14 token grid.*256x240 input gives 16x15 tokens"):
        model(torch.randn(1, 3, 256, 240))
    assert model(torch.randn(1, 3, 220, 209)).shape == (1, 1000)  # pads to 224
    with pytest.raises(ValueError, match="img_size 384"):
        timm.create_model(name, img_size=384)
    with pytest.raises(ValueError, match="features_only"):
        timm.create_model(name, features_only=True)


def test_vitrpb_index() -> None:
    model = timm.create_model("vitrpb_small")
    index = model.layers[0].attn.relative_position_index
    assert index.shape == (196, 196) and index.dtype == torch.int64
    a, b = 3 * 14 + 5, 10 * 14 + 1  # query (3, 5), key (10, 1)
    assert index[a, b] == (10 - 3 + 13) * 27 + (1 - 5 + 13)
    assert "relative_position_index" in dict(model.layers[0].attn.named_buffers())


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.randn(1, 1, 64, 64), r"\(B, 3, H, W\), got \(1, 1, 64, 64\)"),
        (torch.randn(3, 64, 64), r"got \(3, 64, 64\)"),
        (torch.zeros(1, 3, 64, 64, dtype=torch.long), "floating-point.*torch.int64"),
    ],
)
@pytest.mark.parametrize("name", ["dinat_nano", "dinat_s_tiny", "vitrpb_small"])
def test_bad_inputs(name: str, x: torch.Tensor, match: str) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    with pytest.raises(ValueError, match=match):
        model(x)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="unknown model 'dinat_huge'"):
        dinat.create_model("dinat_huge")
    with pytest.raises(ValueError, match="dilations"):
        timm.create_model("dinat_nano", dilations=((1, 2, 1),) * 4)
    with pytest.raises(ValueError, match="global_pool"):
        timm.create_model("dinat_nano", global_pool="max")
    for name in ("dinat_nano", "vitrpb_small"):
        with pytest.raises(ValueError, match=r"drop_path_rate must be in \[0, 1\], got 1.5"):
            timm.create_model(name, drop_path_rate=1.5)
    with pytest.raises(ValueError, match="kernel_size"):
        timm.create_model("dinat_nano", kernel_size=4)


@pytest.mark.parametrize("backend", cpu_backends())
def test_attention_compiles_without_graph_breaks(backend: str) -> None:
    torch._dynamo.reset()
    attn = NeighborhoodAttention2D(32, 2, 7, dilation=2).eval()
    x = torch.randn(1, 15, 17, 32)
    with use_backend(backend), torch.no_grad():
        torch.testing.assert_close(torch.compile(attn, fullgraph=True)(x), attn(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", [b for b in cpu_backends() if b != "flex"])  # CPU flex: graph break in backward
def test_attention_trains_compiled_without_graph_breaks(backend: str) -> None:
    """A compiled training step (the custom op's and the layout conversion's backward traced by
    AOTAutograd) gives eager's output and gradients."""
    torch._dynamo.reset()
    attn = NeighborhoodAttention2D(32, 2, 7, dilation=2)
    x = torch.randn(2, 15, 17, 32, requires_grad=True)
    results = []
    with use_backend(backend):
        for module in (attn, torch.compile(attn, fullgraph=True)):
            out = module(x)
            grads = torch.autograd.grad(out.square().sum(), [x, *attn.parameters()])
            results.append((out, grads))
    (eager, eager_grads), (compiled, compiled_grads) = results
    torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-5)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_torch_compile_matches_eager() -> None:
    torch._dynamo.reset()
    model = timm.create_model("dinat_mini").eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=1e-4, atol=1e-4)


def test_export_with_a_dynamic_batch_and_image_size() -> None:
    """torch.export over a range of batch and image sizes (any size, not only multiples of 32, that
    needs no padding): the program agrees with eager at other sizes, its whole-window layers on the
    general kernels (they are exact there too)."""
    torch.manual_seed(0)
    model = dinat.create_model("dinat_mini").eval()
    batch, height, width = (torch.export.Dim(name, min=low) for name, low in (("b", 1), ("h", 224), ("w", 224)))
    x = torch.randn(2, 3, 224, 224)
    program = torch.export.export(model, (x,), dynamic_shapes=({0: batch, 2: height, 3: width},))
    for shape in ((3, 3, 224, 224), (1, 3, 250, 333)):
        x = torch.randn(shape)
        with torch.no_grad():
            torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)


def test_export_refuses_an_image_size_range_that_would_pad() -> None:
    """From 160 px, DiNAT-Mini's first dilated layer (kernel 7, dilation 8) would pad 40x40 maps to
    56x56: one exported program cannot take both paths, so the error says what the range must be."""
    model = dinat.create_model("dinat_mini").eval()
    size = torch.export.Dim("size", min=160, max=1024)
    with pytest.raises(ValueError, match=r"at least kernel_size \* dilation = 56 tokens at every size"):
        torch.export.export(model, (torch.randn(1, 3, 224, 224),), dynamic_shapes=({2: size, 3: size},))


def test_export_at_one_image_size_pads_as_eager() -> None:
    """At a fixed size the layers pad as in eager mode (here every map smaller than kernel * dilation)."""
    torch.manual_seed(0)
    model = dinat.create_model("dinat_mini").eval()
    x = torch.randn(1, 3, 96, 128)
    program = torch.export.export(model, (x,))
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=1e-5, atol=1e-5)
