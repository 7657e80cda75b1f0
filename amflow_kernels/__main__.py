"""``python -m amflow_kernels``: what is installed, what runs here, and is it right and fast.

1. versions of amflow_kernels, Python, torch, CUDA and Triton;
2. every backend on every local device: available, or why not;
3. each available fused backend checked against the float64 reference on a small case
   (values and gradients of am_flow, attention, attention_colsum and linear_attention);
4. am_flow timed against the eager reference on the local device.

Exits with status 1 if a check fails, or if a backend named with ``--require`` is unavailable.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time

import torch

import amflow_kernels
from amflow_kernels import _dispatch, reference

CHECK_TOLERANCE = 1e-4  # relative RMS error, float32 against float64, on a small well-conditioned case


def _versions() -> None:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    print(f"amflow_kernels {amflow_kernels.__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
          f"triton {triton_version}")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()}")
    else:
        print("GPU: none (CUDA is not available)")


def _devices() -> list[str]:
    return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


def _backends() -> None:
    print("\nbackends:")
    for device in _devices():
        for name, why in _dispatch.backend_report(device).items():
            print(f"  {device:4} {name:9} {'available' if why is None else 'unavailable: ' + why}")
        print(f"  {device:4} auto    → {_auto_name(device)}")


def _auto_name(device: str) -> str:
    probe = torch.empty(1, 2, 1, 1, 8, device=device)
    return _dispatch.select("am_flow", "auto", probe)


def _rel_rms(x: torch.Tensor, ref: torch.Tensor) -> float:
    return ((x.double() - ref).norm() / ref.norm()).item()


def _check(backend: str, device: str) -> bool:
    """Each op of one backend against the float64 reference: every output and input gradient."""
    generator = torch.Generator().manual_seed(0)
    q, k = (torch.randn(2, 3, 2, 37, 40, generator=generator) for _ in range(2))
    v = torch.randn(2, 3, 2, 37, 24, generator=generator)
    cases = (
        ("am_flow", (q, k), (torch.randn(2, 2, 2, 37, generator=generator),)),
        ("attention", (q, k, v), (torch.randn(2, 3, 2, 37, 24, generator=generator),
                                  torch.randn(2, 3, 2, 37, generator=generator))),
        ("attention_colsum", (q, k), (torch.randn(2, 3, 2, 37, generator=generator),)),
        ("linear_attention", (q, k, v), (torch.randn(2, 3, 2, 37, 24, generator=generator),)),
    )
    ok = True
    for op, inputs, grads in cases:
        if (lacking := _dispatch.BACKENDS[backend].lacks(op)) is not None:
            print(f"  {device:4} {backend:9} {op:16} not checked: {lacking}")
            continue
        fused_inputs = [t.to(device).detach().requires_grad_() for t in inputs]
        ref_inputs = [t.double().detach().requires_grad_() for t in inputs]
        outputs = _as_tuple(getattr(amflow_kernels, op)(*fused_inputs, backend=backend))
        torch.autograd.backward(outputs, [g.to(device, x.dtype) for g, x in zip(grads, outputs)])
        expected = _as_tuple(getattr(reference, op)(*ref_inputs))
        torch.autograd.backward(expected, [g.double() for g in grads])
        errors = [_rel_rms(out.cpu(), ref) for out, ref in zip(outputs, expected)]
        errors += [_rel_rms(a.grad.cpu(), b.grad) for a, b in zip(fused_inputs, ref_inputs)]
        passed = max(errors) <= CHECK_TOLERANCE
        ok &= passed
        values = ", ".join(f"{e:.1e}" for e in errors[: len(outputs)])
        gradients = ", ".join(f"d{name} {e:.1e}" for name, e in zip("qkv", errors[len(outputs):]))
        print(
            f"  {device:4} {backend:9} {op:16} relative RMS error: value {values}, {gradients}  "
            f"{'ok' if passed else 'FAILED'}"
        )
    return ok


def _as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def _checks() -> bool:
    print("\nchecks against the float64 reference (float32 inputs):")
    ok = True
    for device in _devices():
        fused = [n for n, why in _dispatch.backend_report(device).items() if why is None and n != "reference"]
        if not fused:
            print(f"  {device:4} no fused backend available to check")
        for name in fused:
            ok &= _check(name, device)
    return ok


def _time(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn`` after a warm-up call (autotuning, compilation)."""
    fn()
    times = []
    for _ in range(repeats):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _timing() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = _auto_name(device)
    print(f"\ntiming am_flow on {device}:")
    if backend == "reference":
        print("  no fused backend runs here, so there is nothing to compare with the eager reference")
        return
    if backend == "triton" and device == "cpu":
        print("  the Triton interpreter is a correctness tool; its speed means nothing")
        return
    B, T, H, N, D = (8, 8, 12, 197, 64) if device == "cuda" else (1, 8, 12, 197, 64)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    qkv = torch.randn(B * T, N, 3 * H * D, device=device, dtype=dtype)
    q, k, _ = qkv.reshape(B * T, N, 3, H, D).permute(2, 0, 3, 1, 4)
    repeats = 20 if device == "cuda" else 5
    fused = _time(lambda: amflow_kernels.am_flow(q, k, num_frames=T, backend=backend), device, repeats)
    eager = _time(lambda: reference.am_flow(q, k, num_frames=T), device, repeats)
    print(
        f"  (B, T, H, N, D) = {(B, T, H, N, D)} {str(dtype).removeprefix('torch.')}, forward: "
        f"{backend} {fused * 1e3:.3f} ms, eager reference {eager * 1e3:.3f} ms ({eager / fused:.1f}x faster)"
    )


def _required(names: list[str]) -> bool:
    """Each named backend is available on at least one local device."""
    ok = True
    for name in names:
        reasons = [_dispatch.backend_report(device)[name] for device in _devices()]
        if all(why is not None for why in reasons):
            print(f"\nrequired backend {name!r} is unavailable: {'; '.join(reasons)}")
            ok = False
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m amflow_kernels", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--require", action="append", default=[], metavar="BACKEND",
        choices=list(_dispatch.BACKENDS),
        help="fail unless this backend is available here (repeatable), "
        "e.g. to check that an install built the extension",
    )
    args = parser.parse_args(argv)
    _versions()
    _backends()
    ok = _required(args.require)
    ok &= _checks()
    _timing()
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
