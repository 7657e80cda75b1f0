"""What the interpreter-run tests of the Triton kernels see that a plain interpreter would not:
TF32 products as a GPU computes them (interpreter_tf32.py) and autotune picks other than the
first (AMFLOW_AUTOTUNE's random mode, from the session seed, on a covering subset of the colsum
grid), each shown catching a bug planted in a copy of the kernels."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from cases import AM_FLOW_CPU_CASES, am_flow_case_id
from helpers import Target, check_against_reference, make_qk, make_qkv, require_backend, through_autograd
from triton._C.libtriton import ir

import amflow_kernels
from amflow_kernels import reference
from amflow_kernels._layout import as_frames
from amflow_kernels.ops import autotune, registration, softmax_colsum_triton, triton_device

pytestmark = pytest.mark.skipif(not triton_device.INTERPRET, reason="checks of Triton's interpreter (CPU only)")


def test_tf32_products_truncate_fp32_operands():
    import interpreter_tf32

    a, b = np.float32([[1 + 2**-12]]), np.float32([[1 + 2**-11]])  # below TF32's 10 mantissa bits
    assert interpreter_tf32.tf32_matmul(a, b, ir.INPUT_PRECISION.TF32)[0, 0] == 1.0
    exact = a.astype(np.float64) @ b.astype(np.float64)
    three = interpreter_tf32.tf32_matmul(a, b, ir.INPUT_PRECISION.TF32x3)
    assert abs(three[0, 0] - exact[0, 0]) < 2**-20


def _am_flow_fp32():
    """am_flow in fp32 through the Triton op, against the float64 reference."""
    q, k, _ = make_qk("contiguous", 1, 3, 2, 40, 64, torch.float32, "cpu")
    check_against_reference(
        through_autograd(lambda q, k: amflow_kernels.am_flow(q, k, backend="triton"), q, k),
        reference.am_flow, (q, k), ("flow", "dq", "dk"),
    )


def test_tf32_on_an_fp32_path_fails(monkeypatch):
    """Planted: colsum's fp32 products as TF32. The interpreter alone computes them exactly."""
    require_backend("triton", "cpu")
    _am_flow_fp32()
    monkeypatch.setattr(softmax_colsum_triton, "input_precision", lambda dtype: "tf32")
    with pytest.raises(AssertionError, match=r"relative RMS error .* exceeds 1e-05.* \(torch.float32\)"):
        _am_flow_fp32()


def _launches(monkeypatch):
    """Every interpreted kernel launch from now on, as (kernel name, its BLOCK_M, BLOCK_N, warps)."""
    from triton.runtime.interpreter import InterpretedFunction

    launches = []
    run = InterpretedFunction.run

    def recording(self, *args, **kwargs):
        tiles = tuple(kwargs.get(name) for name in ("BLOCK_M", "BLOCK_N", "num_warps"))
        launches.append((self.fn.__name__, tiles))
        return run(self, *args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", recording)
    return launches


AUTOTUNED = [softmax_colsum_triton.colsum_fwd_resident_kernel, softmax_colsum_triton.colsum_fwd_stats_kernel,
             softmax_colsum_triton.colsum_bwd_rowdot_kernel]
PARTNERS = {"colsum_fwd_cols_kernel": "colsum_fwd_stats_kernel", "colsum_bwd_dqk_kernel": "colsum_bwd_rowdot_kernel"}


def _partner_mismatches(monkeypatch, module) -> list[str]:
    """Launch the blocked kernels of ``module`` (softmax_colsum_triton or a copy) at several token counts,
    each its own autotune key, and list every partner launched with tiles its partner was not."""
    _random_picks(monkeypatch)
    launches = _launches(monkeypatch)
    for n in (5, 17, 20, 33, 40, 64, 65, 80):
        q, k = (torch.randn(1, 2, 1, n, 16) for _ in range(2))
        out, stats = module.colsum_fwd(q, k, offset=1, paired=True, scale=0.25)
        module.colsum_bwd(torch.randn_like(out), q, k, stats, offset=1, paired=True, scale=0.25)
    tuned = {}
    mismatches = []
    for name, tiles in launches:
        if name in PARTNERS.values():
            tuned = {**tuned, name: tiles}
        elif tiles != tuned[PARTNERS[name]]:
            mismatches.append(f"{name} ran with {tiles}, its partner {PARTNERS[name]} with {tuned[PARTNERS[name]]}")
    return mismatches


def _random_picks(monkeypatch):
    """Autotuners drawing a config per key from the session seed, with empty caches."""
    monkeypatch.setattr(autotune, "MODE", "random")
    monkeypatch.setattr(autotune, "SEED", int(os.environ["AMFLOW_TEST_SEED"]))
    for kernel in AUTOTUNED:
        monkeypatch.setattr(kernel, "cache", {})


# Every other case of the colsum grid, blocked (three autotuned candidates under the interpreter).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["float32", "float16"])
@pytest.mark.parametrize("paired", [True, False], ids=["am_flow", "attention_colsum"])
@pytest.mark.parametrize("case", AM_FLOW_CPU_CASES[::2], ids=am_flow_case_id)
def test_random_tiles_match_reference(case, paired, dtype, monkeypatch):
    """The blocked kernels at tiles drawn at random per key: partners keep each other's tiles
    and every tile size masks its edges."""
    _random_picks(monkeypatch)
    Target("triton", "cpu", "blocked").activate(monkeypatch)
    B, T, H, N, D, offset, layout = case
    q, k, kw = make_qk(layout, B, T, H, N, D, dtype, "cpu")
    if paired:
        op = lambda q, k: amflow_kernels.am_flow(q, k, offset=offset, backend="triton", **kw)  # noqa: E731
        ref = lambda q, k: reference.am_flow(q, k, offset=offset, **kw)  # noqa: E731
    else:
        q, k = (as_frames(x, kw.get("num_frames")).detach().requires_grad_() for x in (q, k))
        op = lambda q, k: amflow_kernels.attention_colsum(q, k, backend="triton")  # noqa: E731
        ref = reference.attention_colsum
    check_against_reference(through_autograd(op, q, k), ref, (q, k), ("out", "dq", "dk"))


def test_partner_kernels_run_with_their_partners_tiles(monkeypatch):
    monkeypatch.setattr(softmax_colsum_triton, "_prefer_resident", lambda q, programs: False)
    assert _partner_mismatches(monkeypatch, softmax_colsum_triton) == []


def test_partner_given_other_tiles_fails(monkeypatch, tmp_path):
    """Planted in a copy of softmax_colsum_triton: the cols kernel launched with the first candidate,
    not the stats kernel's pick. With every pick the first, as a plain interpreter makes it,
    the two always agree; with random picks they do not."""
    source = Path(softmax_colsum_triton.__file__).read_text()
    original = "tuned = colsum_fwd_stats_kernel.best_config"
    assert source.count(original) == 1, f"the planted bug's site is gone from softmax_colsum_triton.py: {original!r}"
    path = tmp_path / "colsum_triton_planted.py"
    path.write_text(source.replace(original, "tuned = colsum_fwd_stats_kernel.configs[0]"))
    spec = importlib.util.spec_from_file_location("amflow_kernels.ops.colsum_triton_planted", path)
    planted = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, planted)
    spec.loader.exec_module(planted)
    monkeypatch.setattr(planted, "_prefer_resident", lambda q, programs: False)
    assert any("colsum_fwd_cols_kernel ran with" in m for m in _partner_mismatches(monkeypatch, planted))


def test_autotune_setting_rejects_unknown_modes():
    assert autotune.parse("random:7") == ("random", 7)
    assert autotune.parse("first") == ("first", 0)
    for bad in ("fastest", "first:3", "random:x"):
        with pytest.raises(ValueError, match=rf"AMFLOW_AUTOTUNE must be one of .* got '{bad}'"):
            autotune.parse(bad)


def test_triton_ops_launch_on_the_inputs_device(monkeypatch):
    """The Triton ops run their launches under the inputs' device (Triton launches on the
    current GPU): tested here through the guard's calls; on a machine with two GPUs,
    test_am_flow.py::test_second_gpu runs them on cuda:1."""
    entered = []
    def guard(x):
        entered.append(x.device)
        return triton_device.device_guard(x)

    monkeypatch.setattr(registration, "device_guard", guard)
    q, k, _ = make_qk("contiguous", 1, 3, 1, 9, 8, torch.float32, "cpu")
    amflow_kernels.am_flow(q, k, backend="triton").sum().backward()
    amflow_kernels.linear_attention(*make_qkv("contiguous", (1, 1), 9, 9, 8, 8, torch.float32, "cpu"),
                                    backend="triton").sum().backward()
    assert entered == [torch.device("cpu")] * 4
