"""The Triton kernels compiled ahead of time for GPUs, on machines without one: that they build
down to the cubin for A100 and H100 in every candidate configuration, and fit the shared memory
they ask of a device (what the interpreter, which runs the rest of the Triton tests here, cannot
check). On a machine with a GPU the kernels run instead, and these skip.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from _triton_utils import HAS_TRITON, INTERPRETED
from dinat.ops import triton_na

ahead_of_time = pytest.mark.skipif(
    INTERPRETED or not HAS_TRITON or torch.cuda.is_available(),
    reason="for machines without a GPU (Triton installed, not interpreting); with one, the kernels run",
)
FUSED = ("forward", "query", "key")
ALL_KERNELS = (*FUSED, "dot", "weighted_sum", "scatter")
# The candidates that ask for the most shared memory: the most pipeline stages (of those, the most
# warps: the one that compiles fastest; warps leave the pipelined buffers alone) at every size, and
# of several rows the largest tiles (the most places per program, then the widest: 16 places in 2
# rows hold key and query tiles at least as large as 8 in 4) at the sizes that launch several rows
# (wide float32 runs 1 row: test below). Kernel 13x13, the widest reach, bounds the smaller ones:
# its key and query tiles and rpb columns are the largest (at tile 16, 7x7's key tiles are as wide).
MOST_STAGES = max(triton_na.TILES, key=lambda c: (c.stages, c.warps))
MOST_ROWS = max((c for c in triton_na.TILES if c.rows > 1), key=lambda c: (c.rows * c.tile, c.tile, c.warps))
SIZES = [(torch.float32, 256), (torch.float32, 128), (torch.float16, 256)]
SHARED_MEMORY_CASES = [(MOST_STAGES, dtype, dim, (13, 13)) for dtype, dim in SIZES]
SHARED_MEMORY_CASES += [(MOST_ROWS, t, dim, (13, 13)) for t, dim in SIZES if not triton_na._is_wide_fp32(t, dim)]


@ahead_of_time
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize(
    "dtype,kernel,head_dim,with_rpb",
    [
        (torch.float32, (7, 7), 32, True),
        (torch.float16, (7, 7), 32, True),
        (torch.bfloat16, (7, 7), 32, True),
        (torch.bfloat16, (13, 11), 64, True),
        (torch.bfloat16, (3, 5), 24, False),
    ],
    ids=["f32-k7", "f16-k7", "bf16-k7", "bf16-k13x11-d64", "bf16-k3x5-d24-norpb"],
)
def test_kernels_compile_for_gpus(arch, dtype, kernel, head_dim, with_rpb) -> None:
    """Down to the cubin, for A100 and H100, without a GPU: what the interpreter cannot check."""
    _assert_compiles(arch, dtype, kernel, head_dim, with_rpb, triton_na.TILES[0])


@ahead_of_time
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tile", triton_na.TILES[1:], ids=str)
def test_kernels_compile_for_gpus_with_every_tile(tile, dtype) -> None:
    """Every configuration the autotuner may pick compiles for H100 (DiNAT's 7x7, head dim 32; the
    fused kernels, the ones a configuration changes)."""
    _assert_compiles(90, dtype, (7, 7), 32, True, tile, FUSED)


@ahead_of_time
@pytest.mark.parametrize("name", FUSED)
def test_programs_of_fewer_than_16_places_are_refused(name) -> None:
    """tl.dot needs 16 rows: a program of one row of 8 places fails to compile, and says why."""
    with pytest.raises(Exception, match=r"ROWS \* tile >= 16"):
        triton_na.compile_for_cuda(90, torch.bfloat16, (7, 7), 32, True, triton_na.TileConfig(8, 1, 2), (name,))
    assert all(c.tile * c.rows >= triton_na._DOT_ROWS for c in triton_na.TILES)


@ahead_of_time
@pytest.mark.parametrize(("tile", "dtype", "head_dim", "kernel"), SHARED_MEMORY_CASES, ids=str)
def test_the_widest_heads_fit_the_shared_memory_of_an_a100(tile, dtype, head_dim, kernel) -> None:
    """Triton checks shared memory only at launch. At tile 16 every fused kernel fits an A100's
    163 KB per block (float32 at head dim 256 did not with 3 pipeline stages: 170 KB), and float32
    over head dim 128 within what `unavailable_reason` asks of a device, for every kernel size (a
    dk/dv query tile sized for the widest kernels' reach needed 172 KB at 13x13)."""
    compiled = triton_na.compile_for_cuda(80, dtype, kernel, head_dim, True, tile, FUSED)
    limit = triton_na._WIDE_FP32_SHARED_BYTES if triton_na._is_wide_fp32(dtype, head_dim) else 166912
    for name in FUSED:
        assert compiled[name].metadata.shared <= limit, name


@ahead_of_time
@pytest.mark.parametrize("arch", [80, 90], ids=["sm80", "sm90"])
@pytest.mark.parametrize(
    "dtype,kernel,head_dim,with_rpb",
    [(torch.bfloat16, (8, 8), 128, True), (torch.float32, (8, 8), 64, True), (torch.float16, (3, 5), 24, False)],
    ids=["bf16-k8-d128", "f32-k8-d64", "f16-k3x5-d24-norpb"],
)
def test_whole_window_kernels_fit_any_gpu(arch, dtype, kernel, head_dim, with_rpb) -> None:
    """The whole-window kernels at the largest groups and head features they take (64 tokens, 256
    bytes; test below), and at the smallest tile, compile for A100 and H100 within the 99 KB of
    shared memory per block of any GPU since sm_80 (consumer ones included)."""
    names = ("whole_forward", "whole_backward")
    compiled = triton_na.compile_for_cuda(arch, dtype, kernel, head_dim, with_rpb, names=names)
    for name in names:
        assert compiled[name].metadata.shared <= 101376, name


def test_whole_window_kernels_take_groups_of_64_tokens_and_256_byte_heads() -> None:
    def applies(height, width, dtype, head_dim, kernel, dilation=(1, 1)) -> bool:
        return triton_na._whole_kernels_apply(torch.empty(1, height, width, 1, head_dim, dtype=dtype), kernel, dilation)

    assert applies(8, 8, torch.bfloat16, 128, (8, 8)) and applies(8, 8, torch.float32, 64, (8, 8))
    assert applies(56, 56, torch.bfloat16, 32, (7, 7), (8, 8)) and applies(6, 10, torch.float16, 24, (3, 5), (2, 2))
    assert not applies(8, 9, torch.bfloat16, 32, (8, 9))  # 72 tokens
    assert not applies(8, 8, torch.bfloat16, 136, (8, 8)) and not applies(8, 8, torch.float32, 72, (8, 8))
    assert not applies(9, 9, torch.bfloat16, 32, (7, 7))  # not a whole window


def test_wide_float32_launches_within_the_shared_memory_it_asks_for() -> None:
    """float32 over head dim 128 launches at most 2 stages of 1-row programs (2 rows: 106624 bytes
    for the forward, over the _WIDE_FP32_SHARED_BYTES a device must have), of tile 16 at least (one
    row of tile 8 is too few queries for tl.dot); other dtypes and head dims every candidate."""
    capped = triton_na._wide_fp32_capped(triton_na.TILES, True)
    assert capped and all(c.stages <= 2 and c.rows == 1 and c.tile >= 16 for c in capped)
    others = lambda configs: {(c.warps, c.max_registers) for c in configs}  # noqa: E731
    assert others(capped) == others(triton_na.TILES)
    assert len(set(capped)) == len(capped)
    assert triton_na._wide_fp32_capped(triton_na.TILES, False) == triton_na.TILES
    assert triton_na._is_wide_fp32(torch.float32, 129) and not triton_na._is_wide_fp32(torch.bfloat16, 256)


@pytest.mark.skipif(INTERPRETED or not HAS_TRITON, reason="device properties of a CUDA tensor")
def test_wide_float32_heads_go_elsewhere_on_gpus_with_less_shared_memory(monkeypatch) -> None:
    """An RTX 30xx/40xx has 99 KB of shared memory per block: float32 over head dim 128 is not for it."""
    gpu = lambda dtype, dim: SimpleNamespace(device=torch.device("cuda"), dtype=dtype, shape=(1, 9, 9, 2, dim))  # noqa: E731
    for name, shared, ok in (("NVIDIA A100", 166912, True), ("NVIDIA GeForce RTX 4090", 101376, False)):
        properties = SimpleNamespace(name=name, shared_memory_per_block_optin=shared)
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device, p=properties: p)
        reason = triton_na.unavailable_reason(gpu(torch.float32, 129))
        assert (reason == "") == ok and (ok or f"needs 102656 bytes of shared memory per block; {name} has" in reason)
        assert triton_na.unavailable_reason(gpu(torch.float32, 128)) == ""
        assert triton_na.unavailable_reason(gpu(torch.bfloat16, 256)) == ""


def _assert_compiles(arch, dtype, kernel, head_dim, with_rpb, tile, names=ALL_KERNELS) -> None:
    compiled = triton_na.compile_for_cuda(arch, dtype, kernel, head_dim, with_rpb, tile, names)
    assert sorted(compiled) == sorted(names)
    for kernel_binary in compiled.values():
        assert kernel_binary.asm["cubin"] and f"sm_{arch}" in kernel_binary.asm["ptx"]
