"""The compiled extension (csrc/), loaded once: why it cannot be used, if it cannot, the
device types it has kernels for, and what those kernels accept. Loading it registers its
``amflow::`` ops (schemas in :mod:`amflow_kernels.ops.registration`, which registers their
fakes and autograd)."""

from __future__ import annotations

import json
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
    from .. import _C  # loading the library registers the amflow:: ops

    EXTENSION_ERROR = None
except ImportError as error:
    EXTENSION_ERROR = _extension_error(error)


def _limits() -> dict[str, dict]:
    """device type → {"dtypes": (torch dtypes), "max_head_dim": {op family: limit}}, as the
    extension reports them from the constants its kernels check (csrc/*/kernel_limits.h)."""
    if EXTENSION_ERROR is not None:
        return {}
    reported = json.loads(_C.kernel_limits())
    return {
        device: {**limits, "dtypes": tuple(getattr(torch, name) for name in limits["dtypes"])}
        for device, limits in reported.items()
    }


LIMITS = _limits()


# The op families the extension may declare (csrc/amflow.cpp), and, read once, the ones each
# device type has kernels for: dispatch runs on every call and under torch.compile, where the
# dispatcher query cannot be traced.
FAMILIES = ("softmax_colsum", "linear_attention", "attention")


def has_family(family: str) -> bool:
    """Whether the extension declares ``family``'s ops."""
    return EXTENSION_ERROR is None and bool(torch._C._jit_get_schemas_for_operator(f"amflow::{family}_fwd"))


KERNEL_FAMILIES = {
    device: frozenset(
        family for family in FAMILIES
        if has_family(family)
        and torch._C._dispatch_has_kernel_for_dispatch_key(f"amflow::{family}_fwd", device.upper())
    )
    for device in ("cpu", "cuda")
}
KERNEL_DEVICES = frozenset(device for device, families in KERNEL_FAMILIES.items() if families)
