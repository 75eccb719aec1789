"""Shared pieces of the Triton backend's tests (test_ops_triton*.py).

On CUDA the compiled kernels are tested. Without CUDA the same tests run in Triton's interpreter:
each file's ``test_in_triton_interpreter`` re-runs that file in a subprocess with TRITON_INTERPRET=1
(the interpreter has to be chosen before triton is imported); two files, so that the two pytest
workers share the (slow) interpreted runs, and a third, test_ops_triton_aot.py, that compiles the
kernels for GPUs ahead of time.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from conftest import DATA
from dinat.ops import na2d, triton_na, use_backend

# Triton caches compiled kernels under ~/.triton unless told otherwise; CI's home may not be
# writable, so the tests keep theirs in the temporary directory (as inductor does).
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(tempfile.gettempdir(), f"dinat_triton_{os.getuid()}"))
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = torch.device("cpu" if INTERPRETED or not torch.cuda.is_available() else "cuda")
RUNNABLE = HAS_TRITON and triton_na.available(torch.empty(0, device=DEVICE))
needs_kernels = pytest.mark.skipif(not RUNNABLE, reason="needs CUDA or TRITON_INTERPRET=1 (see _triton_utils)")
needs_interpreter_run = pytest.mark.skipif(
    INTERPRETED or torch.cuda.is_available() or not HAS_TRITON, reason="runs the file in the interpreter"
)
TOL = dict(rtol=1e-4, atol=1e-4)


def _head_zero(case: dict) -> dict:
    """The case restricted to head 0: heads are independent, and rpb's gradient is per head."""
    heads_axis = {"rpb": 0, "grad_rpb": 0}  # the heads axis of each tensor; dimension 1 for the rest
    return {n: t.narrow(heads_axis.get(n, 1), 0, 1) if isinstance(t, torch.Tensor) else t for n, t in case.items()}


GOLDEN = torch.load(DATA / "na2d_ops.pt")["cases"]
if DEVICE.type == "cpu":  # the interpreter is slow
    GOLDEN = [_head_zero(case) for case in GOLDEN]
GOLDEN_IDS = [f"k{c['kernel_size']}-d{c['dilation']}-{tuple(c['q'].shape)}" for c in GOLDEN]


def run_interpreted(test_file: str, deselect: str = "") -> None:
    """Run ``test_file`` in a subprocess with TRITON_INTERPRET=1; every test must pass, none skip."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    env.pop("PYTEST_XDIST_WORKER", None)
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x", test_file]
    command += ["-k", "not in_triton_interpreter" + (f" and not ({deselect})" if deselect else "")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, cwd=Path(test_file).parent.parent)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout, result.stdout[-2000:]


def recording_aot_eager(traced: list[str]):
    """A torch.compile backend: aot_autograd running its graphs as they are (as "aot_eager"), which
    appends the target of every call in the forward and backward graphs to ``traced``."""

    def record(graph_module, _inputs):
        traced.extend(str(node.target) for node in graph_module.graph.nodes if node.op == "call_function")
        return make_boxed_func(graph_module)

    return aot_autograd(fw_compiler=record, bw_compiler=record)


def assert_matches_golden(case: dict) -> None:
    """na2d on the triton backend (scale=1) equals the original's qk -> softmax -> av in golden
    ``case``, forward and every gradient."""
    q, k, v = (case[n].permute(0, 2, 3, 1, 4).to(DEVICE, copy=True).requires_grad_() for n in ("q", "k", "v"))
    rpb = None if case["rpb"] is None else case["rpb"].to(DEVICE, copy=True).requires_grad_()
    with use_backend("triton"):
        out = na2d(q, k, v, case["kernel_size"], case["dilation"], rpb, 1.0)
    torch.testing.assert_close(out.cpu(), case["out"].permute(0, 2, 3, 1, 4), **TOL)
    out.backward(case["grad_out"].permute(0, 2, 3, 1, 4).to(DEVICE))
    for name, tensor in (("q", q), ("k", k), ("v", v)):
        expected = case[f"grad_{name}"].permute(0, 2, 3, 1, 4)
        torch.testing.assert_close(tensor.grad.cpu(), expected, **TOL, msg=f"grad_{name}")
    if rpb is not None:
        torch.testing.assert_close(rpb.grad.cpu(), case["grad_rpb"], **TOL, msg="grad_rpb")
