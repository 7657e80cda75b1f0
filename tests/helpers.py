"""Inputs, tolerances and comparisons shared by the tests and the benchmarks."""

from __future__ import annotations

import os
from typing import NamedTuple

import pytest
import torch

# Relative RMS error ‖fused − ref‖ / ‖ref‖ against the float64 reference computed from the
# same (rounded) inputs. Low-precision outputs are also held to FlashAttention's rule: at
# most twice the error of the reference formula run by PyTorch in that dtype.
REL_RMS_TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

LAYOUTS = ("contiguous", "frames", "qkv", "strided")


def make_qk(layout: str, B: int, T: int, H: int, N: int, D: int, dtype, device):
    """q, k (leaf tensors, requires_grad) in one of the layouts users pass, and the kwargs.

    contiguous: (B, T, H, N, D). frames: (B·T, H, N, D) with num_frames=T. qkv: views of
    timm's fused projection, qkv.reshape(B·T, N, 3, H, D).permute(2, 0, 3, 1, 4). strided:
    (B, T, H, N, D) views of a (B, H, T, D, N) tensor (no stride equals 1 on D).
    """
    BT = B * T
    if layout == "contiguous":
        q, k = (torch.randn(B, T, H, N, D, device=device, dtype=dtype) for _ in range(2))
        kwargs = {}
    elif layout == "frames":
        q, k = (torch.randn(BT, H, N, D, device=device, dtype=dtype) for _ in range(2))
        kwargs = {"num_frames": T}
    elif layout == "qkv":
        qkv = torch.randn(BT, N, 3 * H * D, device=device, dtype=dtype)
        q, k, _ = qkv.reshape(BT, N, 3, H, D).permute(2, 0, 3, 1, 4)
        kwargs = {"num_frames": T}
    elif layout == "strided":
        q, k = (
            torch.randn(B, H, T, D, N, device=device, dtype=dtype).permute(0, 2, 1, 4, 3)
            for _ in range(2)
        )
        kwargs = {}
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return q.detach().requires_grad_(), k.detach().requires_grad_(), kwargs


def make_single_frame_qk(shape, layout: str, dtype, device):
    """q, k of ``shape`` (..., N, D) for attention_colsum (leaves, requires_grad). contiguous:
    fresh tensors; qkv: (B, H, N, D) views of timm's fused projection; transposed: views whose
    last stride is not 1."""
    *lead, N, D = shape
    if layout == "contiguous":
        q, k = (torch.randn(shape, device=device, dtype=dtype) for _ in range(2))
    elif layout == "qkv":
        B, H = lead
        qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype)
        q, k, _ = qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    elif layout == "transposed":
        q, k = (torch.randn(*lead, D, N, device=device, dtype=dtype).transpose(-1, -2) for _ in range(2))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return q.detach().requires_grad_(), k.detach().requires_grad_()


def make_qkv(layout, lead, nq, nk, d, dv, dtype, device, scale=1.0):
    """q (*lead, Nq, D), k (*lead, Nk, D), v (*lead, Nk, Dv) as leaf tensors in a layout users pass.

    contiguous: fresh tensors. projection: (B, H, N, ·) views of one fused projection
    (B, N, H·(2D + Dv)) as multi-head layers make them (Nq = Nk). transposed: views of
    (*lead, ·, N) tensors, no unit stride on the channel dim.
    """
    if layout == "contiguous":
        q = torch.randn(*lead, nq, d, device=device, dtype=dtype)
        k = torch.randn(*lead, nk, d, device=device, dtype=dtype)
        v = torch.randn(*lead, nk, dv, device=device, dtype=dtype)
    elif layout == "projection":
        assert nq == nk and len(lead) == 2
        b, h = lead
        x = torch.randn(b, nq, h * (2 * d + dv), device=device, dtype=dtype)
        q, k, v = (
            part.unflatten(-1, (h, -1)).transpose(1, 2) for part in x.split([h * d, h * d, h * dv], dim=-1)
        )
    elif layout == "transposed":
        q = torch.randn(*lead, d, nq, device=device, dtype=dtype).transpose(-1, -2)
        k = torch.randn(*lead, d, nk, device=device, dtype=dtype).transpose(-1, -2)
        v = torch.randn(*lead, dv, nk, device=device, dtype=dtype).transpose(-1, -2)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return [(t * scale).detach().requires_grad_() for t in (q, k, v)]


def as_float64_leaves(*tensors):
    return [t.detach().double().requires_grad_() for t in tensors]


def rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-300)).item()


def score_gradient_scales(q: torch.Tensor, k: torch.Tensor, grad: torch.Tensor, scale: float) -> dict[str, float]:
    """The size of the terms a softmax-colsum op's dq and dk sum, for :func:`assert_close`'s
    structural zeros: each score's gradient is P_ij (g_j − c_i) with P ≤ 1 and |c_i| ≤ ‖g‖∞,
    two of them per frame in am_flow, so dq's terms are at most 4 · scale · ‖g‖∞ · ‖k‖∞."""
    g = grad.abs().max().item()
    return {"dq": 4 * scale * g * k.abs().max().item(), "dk": 4 * scale * g * q.abs().max().item()}


def assert_close(name: str, fused: torch.Tensor, ref64: torch.Tensor, ref_lowp=None, term_scale=None) -> None:
    """fused (any dtype) against the float64 reference; ref_lowp: the reference in fused's dtype.

    A reference that is exactly zero (with one token the softmax is 1 whatever the scores, so
    every score gradient P (g − c) cancels) has no relative error: there the fused result must
    be zero to the dtype's tolerance of ``term_scale``, the size of the terms that cancel. On
    the H200 (2026-12-04) the Triton backward's dq at N = 1 was not exactly zero: its fp32
    division compiles to div.full.f32 (within 2 ulp) and its exp2 to ex2.approx, so
    c = Σ P g / Σ P can miss g by ulps, where the interpreter's exact arithmetic leaves 0.

    The relative RMS error must stay within the dtype's tolerance; in float32 also within twice
    PyTorch's own float32 error where that is larger (16-bit dtypes have their own data-driven
    rule below, on the max error): AM flow's |z| has a kink at z = S_t − S_{t+Δ} = 0,
    and where some z is within rounding of 0 its sign, hence that score's gradient term, differs
    between float64 and any fp32 computation. Measured on a GPU smoke case (N 261, D 80, fp32,
    one of its 1.6 million scores): the fused dq's error 1.16e-4 was the fp32 reference's to
    three digits, one row's gradient, against 2.8e-7 elsewhere."""
    assert fused.shape == ref64.shape, f"{name}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(fused).any(), f"{name}: NaN in the fused result"
    tol = REL_RMS_TOL[fused.dtype]
    if not ref64.any():
        largest = fused.abs().max().item() if fused.numel() else 0.0
        bound = tol * term_scale if term_scale is not None else 0.0
        assert largest <= bound, (
            f"{name}: the reference is exactly zero and the fused result reaches {largest:.3g}, over "
            f"{tol:.3g} of the cancelling terms' size {term_scale} ({fused.dtype})"
        )
        return
    err = rel_rms(fused, ref64)
    if err > tol and ref_lowp is not None and fused.dtype == torch.float32:
        pytorch = rel_rms(ref_lowp, ref64)
        assert err <= 2 * pytorch, (
            f"{name}: relative RMS error {err:.3g} exceeds {tol:.3g} and twice PyTorch's {pytorch:.3g} ({fused.dtype})"
        )
    else:
        assert err <= tol, f"{name}: relative RMS error {err:.3g} exceeds {tol:.3g} ({fused.dtype})"
    if ref_lowp is not None and fused.dtype in (torch.float16, torch.bfloat16):
        fused_err = (fused.double() - ref64).abs().max().item()
        pytorch_err = (ref_lowp.double() - ref64).abs().max().item()
        rounding = (ref64.to(fused.dtype).double() - ref64).abs().max().item()
        assert fused_err <= 2 * pytorch_err + 2 * rounding, (
            f"{name}: max error {fused_err:.3g} exceeds twice PyTorch's {pytorch_err:.3g} "
            f"in {fused.dtype} (+ rounding {rounding:.3g})"
        )


def through_autograd(fn, *inputs):
    """``fn(*inputs)`` as the ``fused`` of :func:`check_against_reference`: given the output's
    gradient, its output and the inputs' gradients through autograd."""

    def run(grad):
        out = fn(*inputs)
        return (out, *torch.autograd.grad(out, inputs, grad))

    return run


def check_against_reference(fused, reference_fn, inputs, names, with_lowp: bool = True, term_scales=None) -> None:
    """The one comparison every fused path is held to: ``fused(grad)`` returns the output and
    the inputs' gradients for an output gradient ``grad`` (random, in the inputs' dtype);
    each is compared, under ``names``, with ``reference_fn`` run in float64 on the same inputs
    (:func:`assert_close`), and in 16-bit dtypes with that reference run in the inputs' dtype
    (unless not ``with_lowp``: where it overflows). ``term_scales(grad)``: name → the size of
    the terms that result sums, where the reference may be exactly zero."""
    inputs64 = as_float64_leaves(*inputs)
    ref = reference_fn(*inputs64)
    grad = torch.randn(ref.shape, dtype=inputs[0].dtype, device=inputs[0].device)
    ref.backward(grad.double())
    results = fused(grad)
    assert results[0].dtype == inputs[0].dtype, f"{names[0]}: dtype {results[0].dtype}, inputs {inputs[0].dtype}"
    lowp = [None] * len(results)
    if with_lowp:
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        ref_lowp = reference_fn(*leaves)
        ref_lowp.backward(grad)
        lowp = [ref_lowp, *(leaf.grad for leaf in leaves)]
    scales = term_scales(grad) if term_scales is not None else {}
    for name, result, expected, same_dtype in zip(names, results, [ref, *(x.grad for x in inputs64)], lowp):
        assert_close(name, result, expected, same_dtype, scales.get(name))


def large_scores_through_autograd(op):
    """A differentiable ``op(q, k)`` as the ``fused`` of :func:`check_large_scores`."""
    return lambda q, k, grad: through_autograd(op, q.requires_grad_(), k.requires_grad_())(grad)


def check_large_scores(fused, paired: bool, dtype: torch.dtype, device) -> None:
    """|S| in the thousands (the fp16 activations of real ViTs): ``fused(q, k, grad)`` returns
    (out, dq, dk) of AM flow (``paired``, offset 1) or the attention colsum of q, k
    (1, 3, 2, 40, 64) at scale D^-½, which must be finite and as accurate as PyTorch.

    Rows of the softmax are then nearly one-hot and the gradient g_j − c_i cancels, so the
    bound is the data-driven one of :func:`assert_as_accurate_as_pytorch`.
    """
    from amflow_kernels import reference

    scale = 64**-0.5
    q, k = ((20 * torch.randn(1, 3, 2, 40, 64, device=device)).to(dtype) for _ in range(2))
    if paired:
        op = lambda q, k: reference.am_flow(q, k, scale=scale)  # noqa: E731
    else:
        op = lambda q, k: reference.attention_colsum(q, k, scale=scale)  # noqa: E731
    q64, k64 = as_float64_leaves(q, k)
    assert (q64 @ k64.transpose(-1, -2)).abs().max() * scale > 1000, "scores must be large"
    ref = op(q64, k64)
    grad = torch.randn_like(ref)
    ref.backward(grad)
    lowp = list(zip(*pytorch_in_dtype(op, (q, k), grad.to(dtype))))
    qr, kr = as_float64_leaves(q, k)
    scores = round_scores(scale * qr @ kr.transpose(-1, -2), dtype)
    ref_rounded = ((scores[:, :-1] - scores[:, 1:]).abs() if paired else scores).softmax(-1).sum(-2)
    ref_rounded.backward(grad)
    out, dq, dk = fused(q, k, grad.to(dtype))
    assert_as_accurate_as_pytorch("out", out, ref, lowp[0], ref_rounded)
    assert_as_accurate_as_pytorch("dq", dq, q64.grad, lowp[1], qr.grad)
    assert_as_accurate_as_pytorch("dk", dk, k64.grad, lowp[2], kr.grad)


def round_scores(scores: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float64 scores rounded to ``dtype`` in value, with float64 gradients (straight through)."""
    return scores + (scores.to(dtype).double() - scores).detach()


def pytorch_in_dtype(fn, tensors, grad, orders: int = 4):
    """``fn`` run by PyTorch in the inputs' dtype, with the head dim summed in ``orders`` orders
    (as given, then random permutations of D: the same math, other roundings). Returns one list
    per order: [out, grad of each input]. On ill-conditioned inputs PyTorch's own error depends
    on that order (at |S| ~ 400: 1.2e-7 to 1.5e-6 relative in fp32 over six orders), so a
    single order is a lucky or unlucky yardstick; the largest is the fair one."""
    generator = torch.Generator().manual_seed(0)
    size = tensors[0].shape[-1]
    runs = []
    for order in range(orders):
        perm = torch.arange(size) if order == 0 else torch.randperm(size, generator=generator)
        leaves = [t.detach().requires_grad_() for t in tensors]
        out = fn(*(x[..., perm.to(x.device)] for x in leaves))
        out.backward(grad)
        runs.append([out.detach(), *(leaf.grad for leaf in leaves)])
    return runs


def assert_as_accurate_as_pytorch(name: str, fused, ref64, ref_same_dtype, ref_rounded_scores) -> None:
    """For ill-conditioned inputs (large scores, near one-hot softmax rows).

    FlashAttention's data-driven bound: relative RMS error at most twice the error of the
    formula run by PyTorch in fused's dtype (``ref_same_dtype``, or a list of such runs in
    several summation orders, of which the largest error counts; see ``pytorch_in_dtype``),
    where that error is floored by the error that
    rounding the scores alone to fused's dtype causes (``ref_rounded_scores``: the float64
    formula on rounded scores). No kernel that forms scores in that precision can beat it,
    and PyTorch's own error is sometimes far below it by luck.
    """
    assert torch.isfinite(fused).all(), f"{name}: non-finite values in the fused result"
    err = rel_rms(fused, ref64)
    same_dtype = ref_same_dtype if isinstance(ref_same_dtype, (list, tuple)) else [ref_same_dtype]
    floor = max(*(rel_rms(r, ref64) for r in same_dtype), rel_rms(ref_rounded_scores, ref64))
    rounding = rel_rms(ref64.to(fused.dtype), ref64)
    assert err <= 2 * floor + 2 * rounding, (
        f"{name}: relative RMS error {err:.3g} exceeds twice {floor:.3g}, the larger of "
        f"PyTorch's error in {fused.dtype} and that of scores rounded to it (+ {rounding:.3g})"
    )


def require_backend(backend: str, device: str) -> None:
    """Skip, with the dispatcher's reason, where ``backend`` cannot run on ``device``: CUDA
    without a GPU, Triton on CPU when a GPU is present (the interpreter is then off), the
    compiled backends when the extension was not built."""
    from amflow_kernels._dispatch import backend_report

    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip(reason="needs a CUDA device; none is present on this machine")
    why = backend_report(device)[backend]
    if why is not None:
        pytest.skip(reason=f"the {backend} backend cannot run on {device}: {why}")


class Target(NamedTuple):
    """A fused backend on a device; for Triton, which forward kernels run (resident/blocked)."""

    backend: str
    device: str
    path: str | None = None

    @property
    def id(self) -> str:
        return "-".join(filter(None, (self.backend, self.path, self.device)))

    @property
    def dtypes(self) -> list[torch.dtype]:
        """What the backend declares it takes (the dispatcher's limits; float32 where an
        unbuilt extension declares nothing, so that its cases still show as skipped), less
        bfloat16 under Triton's interpreter, whose bfloat16 tl.dot is wrong."""
        from amflow_kernels._dispatch import BACKENDS

        declared = list(BACKENDS[self.backend].dtypes("am_flow")) or [torch.float32]
        if self.backend == "triton" and self.device == "cpu":
            declared.remove(torch.bfloat16)
        return declared

    def activate(self, monkeypatch) -> torch.device:
        """Skip where unavailable; pin the Triton forward path; return the device."""
        require_backend(self.backend, self.device)
        if self.path is not None:
            from amflow_kernels.ops import softmax_colsum_tiles, softmax_colsum_triton

            resident = self.path == "resident"
            monkeypatch.setattr(
                softmax_colsum_triton, "_prefer_resident",
                lambda q, programs: resident and softmax_colsum_tiles.resident_fits(q.shape[-2], q.shape[-1], q.dtype),
            )
        return torch.device(self.device)


TARGETS = [
    Target("triton", "cpu", "resident"),
    Target("triton", "cpu", "blocked"),
    Target("cpu", "cpu"),
    Target("triton", "cuda", "resident"),
    Target("triton", "cuda", "blocked"),
    Target("cuda", "cuda"),
]


# Each fused backend once per device, for ops with a single forward path.
BACKEND_TARGETS = [Target("triton", "cpu"), Target("cpu", "cpu"), Target("triton", "cuda"), Target("cuda", "cuda")]
# The backends with attention kernels: the CUDA extension has none yet (its dispatch says so).
ATTENTION_TARGETS = [t for t in BACKEND_TARGETS if t.backend != "cuda"]


# AMFLOW_GPU_GRIDS_ON_CPU=1 (bench/gpu_session.sh --dry-run): the tests of device "cuda" run
# their grids through the Triton interpreter instead, to see on a CPU machine that the GPU
# grids pass and what they would compile.
GPU_GRIDS_ON_CPU = os.environ.get("AMFLOW_GPU_GRIDS_ON_CPU") == "1" and not torch.cuda.is_available()


def gpu_grid_lead(*lead: int) -> tuple[int, ...]:
    """The batch and head dims of a GPU grid's cases: as given on a GPU; one of each where the grid
    runs on CPU (GPU_GRIDS_ON_CPU). N, D, frames, offset, layout and dtype, which decide the tiles,
    masks and configs a GPU compiles, stay; the interpreter's time grows with the programs, one per
    (clip, head), and the CPU grids cover batch and head indexing."""
    return (1,) * len(lead) if GPU_GRIDS_ON_CPU else lead


def target_params(device: str | None = None, with_dtypes: bool = False, targets=TARGETS):
    """pytest params over ``targets`` (on ``device``), each alone or with each of its dtypes."""
    marks = lambda t: [pytest.mark.gpu] if t.device == "cuda" else []  # noqa: E731
    if device == "cuda" and GPU_GRIDS_ON_CPU:
        device = "cpu"
        targets = [t for t in targets if t.backend == "triton"]
    targets = [t for t in targets if device in (None, t.device)]
    if not with_dtypes:
        return [pytest.param(t, id=t.id, marks=marks(t)) for t in targets]
    return [
        pytest.param(t, dt, id=f"{t.id}-{str(dt).removeprefix('torch.')}", marks=marks(t))
        for t in targets
        for dt in t.dtypes
    ]
