"""The compiled extension's ops (csrc/): their fake kernels and autograd, registered once.

``amflow::softmax_colsum_fwd(q, k, offset, paired, scale) -> (out, stats)`` and
``amflow::softmax_colsum_bwd(grad, q, k, stats, offset, paired, scale) -> (dq, dk)`` serve
both public ops on (B, T, H, N, D) q, k (see csrc/amflow.cpp): ``paired`` is AM flow, not
paired the attention colsum. The CPU and CUDA kernels register under the same schemas.
"""

from __future__ import annotations

from pathlib import Path

import torch


def _extension_error(error: ImportError) -> str:
    message = f"the compiled extension amflow_kernels._C is not available ({error})"
    package = Path(__file__).resolve().parents[1]
    if (package.parent / "setup.py").exists() and not any(package.glob("_C*")):
        # Python put the current directory first on sys.path: a checkout shadows the installed
        # package, whose extension lives in site-packages.
        message += (
            f"; amflow_kernels was imported from the source checkout {package.parent}, which has"
            " no built extension: run from another directory to use the installed package, or"
            " build in place with `python setup.py build_ext --inplace`"
        )
    return message


try:
    from .. import _C  # noqa: F401  (loading the library registers the amflow:: ops)

    EXTENSION_ERROR = None
except ImportError as error:
    EXTENSION_ERROR = _extension_error(error)


# Device types the extension has kernels for, read once: dispatch runs on every call and
# under torch.compile, where the dispatcher query cannot be traced.
KERNEL_DEVICES = frozenset(
    device
    for device in ("cpu", "cuda")
    if EXTENSION_ERROR is None
    and torch._C._dispatch_has_kernel_for_dispatch_key("amflow::softmax_colsum_fwd", device.upper())
)


def softmax_colsum(q: torch.Tensor, k: torch.Tensor, offset: int, paired: bool, scale: float) -> torch.Tensor:
    """out (B, P, H, N) of the extension's forward, differentiable in q and k."""
    return torch.ops.amflow.softmax_colsum_fwd(q, k, offset, paired, scale)[0]


if EXTENSION_ERROR is None:

    @torch.library.register_fake("amflow::softmax_colsum_fwd")
    def _(q, k, offset, paired, scale):
        b, t, h, n, _ = q.shape
        p = t - offset if paired else t
        return q.new_empty((b, p, h, n)), q.new_empty((b, p, h, n, 2), dtype=torch.float32)

    @torch.library.register_fake("amflow::softmax_colsum_bwd")
    def _(grad, q, k, stats, offset, paired, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape)

    def _setup_context(ctx, inputs, output):
        q, k, offset, paired, scale = inputs
        ctx.save_for_backward(q, k, output[1])
        ctx.offset, ctx.paired, ctx.scale = offset, paired, scale

    def _backward(ctx, grad, _grad_stats):
        if not any(ctx.needs_input_grad[:2]):
            return None, None, None, None, None
        q, k, stats = ctx.saved_tensors
        dq, dk = torch.ops.amflow.softmax_colsum_bwd(grad, q, k, stats, ctx.offset, ctx.paired, ctx.scale)
        return dq, dk, None, None, None

    torch.library.register_autograd("amflow::softmax_colsum_fwd", _backward, setup_context=_setup_context)
