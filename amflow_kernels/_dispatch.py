"""Backend choice: what each backend supports, and why one cannot run.

Each backend answers ``unavailable(device)`` (why it cannot run on a device at all, or None)
and ``not_supported_reasons(op, q, head_dims)`` (why it cannot take these inputs). ``select`` resolves a
``backend=`` argument; a forced backend that cannot run raises with its reasons, and
``"auto"`` takes the first fused backend for the device that accepts the inputs. ``auto``
uses the reference only where no fused backend exists for the device; where one exists but
rejects the inputs it raises rather than silently running the slow formulas.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from .ops.triton_device import INTERPRET as _INTERPRET

try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the installation
    _TRITON_ERROR = f"triton is not importable ({error})"


# The head-dim limits of the GPU kernels, Triton's and CUDA's alike.
GPU_KERNEL_MAX_HEAD_DIM = {"am_flow": 256, "attention_colsum": 256, "linear_attention": 128}


class Backend:
    name = ""
    fused = True
    dtypes: tuple[torch.dtype, ...] = ()
    # op → the largest head dim (each of D and Dv) its kernels take; an op not listed: any.
    max_head_dim: ClassVar[dict[str, int]] = {}

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def not_supported_reasons(self, op: str, q: torch.Tensor, head_dims: dict[str, int]) -> list[str]:
        reasons = []
        if (why := self.unavailable(q.device)) is not None:
            reasons.append(why)
        if q.dtype not in self.dtypes:
            accepted = ", ".join(str(d).removeprefix("torch.") for d in self.dtypes)
            reasons.append(f"dtype {q.dtype} is not supported (accepted: {accepted})")
        limit = self.max_head_dim.get(op)
        for name, size in head_dims.items():
            if limit is not None and size > limit:
                reasons.append(f"{name} {size} exceeds its maximum {limit} for {op}")
        return reasons


class ReferenceBackend(Backend):
    """The literal PyTorch formulas (amflow_kernels.reference): any device, any float dtype."""

    name = "reference"
    fused = False
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ExtensionBackend(Backend):
    """Kernels of the compiled extension (csrc/) for one device type."""

    device_type = ""

    def unavailable(self, device: torch.device) -> str | None:
        from .ops import extension

        if extension.EXTENSION_ERROR is not None:
            return extension.EXTENSION_ERROR
        if device.type != self.device_type:
            return f"the {self.name} backend runs {self.device_type.upper()} tensors, not {device.type}"
        if self.device_type not in extension.KERNEL_DEVICES:
            return f"amflow_kernels._C was built without {self.device_type.upper()} kernels"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None


class CpuBackend(ExtensionBackend):
    """The compiled extension's fused CPU kernels (csrc/cpu)."""

    name = device_type = "cpu"
    dtypes = (torch.float32, torch.float64)


class CudaBackend(ExtensionBackend):
    """The compiled extension's fused CUDA kernels (csrc/cuda)."""

    name = device_type = "cuda"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = GPU_KERNEL_MAX_HEAD_DIM


class TritonBackend(Backend):
    """Fused Triton kernels (amflow_kernels.ops.softmax_colsum_triton)."""

    name = "triton"
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    max_head_dim = GPU_KERNEL_MAX_HEAD_DIM

    def unavailable(self, device: torch.device) -> str | None:
        if _TRITON_ERROR is not None:
            return _TRITON_ERROR
        if device.type == "cuda":
            return None if torch.cuda.is_available() else "CUDA is not available"
        if device.type == "cpu":
            if _INTERPRET:
                return None
            return (
                "Triton runs CPU tensors only through its interpreter "
                "(set TRITON_INTERPRET=1 before importing amflow_kernels)"
            )
        return f"Triton kernels run on CUDA devices, not {device.type}"


BACKENDS: dict[str, Backend] = {
    b.name: b for b in (ReferenceBackend(), TritonBackend(), CudaBackend(), CpuBackend())
}
# Fused backends in order of preference, per device type. On CPU the interpreted Triton
# kernels are a correctness tool, so the compiled kernels come first.
AUTO_ORDER: dict[str, tuple[str, ...]] = {"cuda": ("triton", "cuda"), "cpu": ("cpu", "triton")}
ACCEPTED = ("auto", *BACKENDS)


def _describe(q: torch.Tensor) -> str:
    return f"q of shape {tuple(q.shape)}, dtype {q.dtype}, device {q.device}"


def select(op: str, backend: str, q: torch.Tensor, head_dims: dict[str, int] | None = None) -> str:
    """The backend that runs ``op`` on ``q``, or an error that says why none can.

    ``head_dims`` names the sizes a backend's head-dim limit applies to (default: q's D)."""
    if head_dims is None:
        head_dims = {"head dim": q.shape[-1]}
    if backend not in ACCEPTED:
        raise ValueError(f"{op}: backend must be one of {ACCEPTED}, got {backend!r}")
    if backend != "auto":
        reasons = BACKENDS[backend].not_supported_reasons(op, q, head_dims)
        if reasons:
            raise RuntimeError(
                f"{op}: backend {backend!r} cannot run {_describe(q)}: " + "; ".join(reasons)
            )
        return backend
    fused = [
        BACKENDS[name]
        for name in AUTO_ORDER.get(q.device.type, ())
        if BACKENDS[name].unavailable(q.device) is None
    ]
    if not fused:
        return "reference"
    for candidate in fused:
        if not candidate.not_supported_reasons(op, q, head_dims):
            return candidate.name
    details = "; ".join(f"{b.name}: " + ", ".join(b.not_supported_reasons(op, q, head_dims)) for b in fused)
    raise ValueError(
        f"{op}: no fused backend on {q.device.type} accepts {_describe(q)} ({details}); "
        "pass backend='reference' to run the unfused formulas"
    )


def _as_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def backend_report(device=None) -> dict[str, str | None]:
    """Every backend's name → None if it can run on ``device``, else why it cannot."""
    device = _as_device(device)
    return {name: b.unavailable(device) for name, b in BACKENDS.items()}


def available_backends(device=None) -> list[str]:
    """Names of the backends that can run on ``device`` (default: CUDA if present, else CPU)."""
    return [name for name, why in backend_report(device).items() if why is None]
