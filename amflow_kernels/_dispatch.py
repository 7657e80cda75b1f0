"""Backend choice: what each backend supports, and why one cannot run.

Each backend answers ``unavailable(device)`` (why it cannot run on a device at all, or None)
and ``not_supported_reasons(op, q, head_dims)`` (why it cannot take these inputs). ``select`` resolves a
``backend=`` argument; a forced backend that cannot run raises with its reasons, and
``"auto"`` takes the first fused backend for the device that accepts the inputs. ``auto``
uses the reference only where no fused backend exists for the device; where one exists but
rejects the inputs it raises rather than silently running the slow formulas.
"""

from __future__ import annotations

import torch

from .ops.triton_device import INTERPRET as _INTERPRET

try:
    import triton  # noqa: F401

    _TRITON_ERROR = None
except ImportError as error:  # pragma: no cover - depends on the installation
    _TRITON_ERROR = f"triton is not importable ({error})"


# The kernel family that serves each op, as torch.ops.amflow and csrc/ name them.
OP_FAMILY = {"am_flow": "softmax_colsum", "attention_colsum": "softmax_colsum", "linear_attention": "linear_attention",
             "attention": "attention"}


class Backend:
    name = ""
    fused = True

    def unavailable(self, device: torch.device) -> str | None:
        return None

    def dtypes(self, op: str) -> tuple[torch.dtype, ...]:
        """The dtypes this backend's kernels for ``op`` take."""
        raise NotImplementedError

    def max_head_dim(self, op: str) -> int | None:
        """The largest head dim (each of D and Dv) its kernels for ``op`` take; None: any."""
        return None

    def lacks(self, op: str) -> str | None:
        """Why this backend has no kernels for ``op``, if it has none."""
        return None

    def not_supported_reasons(self, op: str, q: torch.Tensor, head_dims: dict[str, int]) -> list[str]:
        if (why := self.unavailable(q.device) or self.lacks(op)) is not None:
            return [why]
        reasons = []
        dtypes = self.dtypes(op)
        if q.dtype not in dtypes:
            accepted = ", ".join(str(d).removeprefix("torch.") for d in dtypes)
            reasons.append(f"dtype {q.dtype} is not supported (accepted: {accepted})")
        limit = self.max_head_dim(op)
        for name, size in head_dims.items():
            if limit is not None and size > limit:
                reasons.append(f"{name} {size} exceeds its maximum {limit} for {op}")
        return reasons


class ReferenceBackend(Backend):
    """The literal PyTorch formulas (amflow_kernels.reference): any device, any float dtype."""

    name = "reference"
    fused = False

    def dtypes(self, op: str) -> tuple[torch.dtype, ...]:
        return (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class ExtensionBackend(Backend):
    """Kernels of the compiled extension (csrc/) for one device type; their limits are what
    the extension reports (csrc/*/kernel_limits.h)."""

    device_type = ""

    def unavailable(self, device: torch.device) -> str | None:
        from .ops import extension

        if extension.EXTENSION_ERROR is not None:
            return extension.EXTENSION_ERROR
        if device.type != self.device_type:
            return f"the {self.name} backend runs {self.device_type.upper()} tensors, not {device.type}"
        if not extension.KERNEL_FAMILIES[self.device_type]:
            return f"amflow_kernels._C was built without {self.device_type.upper()} kernels"
        if self.device_type == "cuda" and not torch.cuda.is_available():
            return "CUDA is not available"
        return None

    def lacks(self, op: str) -> str | None:
        from .ops import extension

        if OP_FAMILY[op] not in extension.KERNEL_FAMILIES[self.device_type]:
            return f"amflow_kernels._C has no {self.device_type.upper()} kernels for {op}"
        return None

    def _limits(self) -> dict:
        from .ops import extension

        return extension.LIMITS.get(self.device_type, {"dtypes": (), "max_head_dim": {}})

    def dtypes(self, op: str) -> tuple[torch.dtype, ...]:
        return self._limits()["dtypes"]

    def max_head_dim(self, op: str) -> int | None:
        return self._limits()["max_head_dim"].get(OP_FAMILY[op])


class CpuBackend(ExtensionBackend):
    """The compiled extension's fused CPU kernels (csrc/cpu)."""

    name = device_type = "cpu"


class CudaBackend(ExtensionBackend):
    """The compiled extension's fused CUDA kernels (csrc/cuda)."""

    name = device_type = "cuda"


class TritonBackend(Backend):
    """Fused Triton kernels (amflow_kernels.ops.*_triton), whose modules declare their limits."""

    name = "triton"

    @staticmethod
    def _kernels(op: str):
        from .ops import attention_triton, linear_attention_triton, softmax_colsum_triton

        modules = {"softmax_colsum": softmax_colsum_triton, "linear_attention": linear_attention_triton,
                   "attention": attention_triton}
        return modules[OP_FAMILY[op]]

    def dtypes(self, op: str) -> tuple[torch.dtype, ...]:
        return self._kernels(op).DTYPES

    def max_head_dim(self, op: str) -> int | None:
        return self._kernels(op).MAX_HEAD_DIM

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
