"""The one place where the public ops check their inputs.

Every message reads "<op>: <argument> must …, got …", naming the value received and what
is accepted. Backend-specific limits (dtypes, head dims, devices) are the dispatcher's.
"""

from __future__ import annotations

import math

import torch

from ._layout import as_frames

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_float_dtype(op: str, name: str, x: torch.Tensor) -> None:
    if x.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name}.dtype must be one of float16, bfloat16, float32, float64, got {x.dtype}"
        )


def _check_tensors(op: str, q, **others) -> None:
    """q and ``others`` (name → value) are tensors, q of a float dtype, the others of q's dtype
    and device."""
    for name, x in (("q", q), *others.items()):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    _check_float_dtype(op, "q", q)
    for name, x in others.items():
        if x.dtype != q.dtype:
            raise TypeError(f"{op}: {name}.dtype must equal q.dtype ({q.dtype}), got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: {name}.device must equal q.device ({q.device}), got {x.device}")


def _check_pair(op: str, q, k) -> None:
    _check_tensors(op, q, k=k)
    if k.shape != q.shape:
        raise ValueError(
            f"{op}: k.shape must equal q.shape {tuple(q.shape)}, got {tuple(k.shape)}"
        )


def _check_tokens(op: str, q: torch.Tensor) -> None:
    n, d = q.shape[-2:]
    if n < 1 or d < 1:
        raise ValueError(
            f"{op}: q must have at least one token and one channel (N ≥ 1, D ≥ 1), "
            f"got shape {tuple(q.shape)}"
        )


def check_scale(op: str, scale, head_dim: int) -> float:
    """The softmax scale as a finite float; ``None`` means head_dim ** -0.5."""
    if scale is None:
        return head_dim**-0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"{op}: scale must be a finite float or None, got {scale!r}")
    return float(scale)


def check_frames(op: str, q, k, num_frames, scale) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validate per-frame q, k (``(B, T, H, N, D)``, or ``(B·T, H, N, D)`` with ``num_frames``);
    return (B, T, H, N, D) views of q, k and the scale."""
    _check_pair(op, q, k)
    if num_frames is None:
        if q.dim() != 5:
            raise ValueError(
                f"{op}: q must have shape (B, T, H, N, D), or (B·T, H, N, D) with num_frames=T; "
                f"got {q.dim()} dims, shape {tuple(q.shape)}"
            )
    else:
        if not _is_int(num_frames) or num_frames < 1:
            raise ValueError(f"{op}: num_frames must be an int ≥ 1 or None, got {num_frames!r}")
        if q.dim() != 4:
            raise ValueError(
                f"{op}: with num_frames, q must have shape (B·T, H, N, D); "
                f"got {q.dim()} dims, shape {tuple(q.shape)}"
            )
        if q.shape[0] % num_frames:
            raise ValueError(
                f"{op}: q.shape[0] (B·T) must be divisible by num_frames, "
                f"got {q.shape[0]} and num_frames={num_frames}"
            )
        q, k = as_frames(q, num_frames), as_frames(k, num_frames)
    _check_tokens(op, q)
    return q, k, check_scale(op, scale, q.shape[-1])


def check_am_flow(q, k, num_frames, offset, scale) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Validate ``am_flow``'s inputs; return (B, T, H, N, D) views of q, k and the scale."""
    op = "am_flow"
    q, k, scale = check_frames(op, q, k, num_frames, scale)
    if not _is_int(offset) or offset < 1:
        raise ValueError(f"{op}: offset must be an int ≥ 1, got {offset!r}")
    frames = q.shape[1]
    if frames <= offset:
        raise ValueError(
            f"{op}: the number of frames T must exceed offset (T > {offset}), got T={frames}"
        )
    return q, k, scale


def check_attention_colsum(q, k, scale) -> float:
    """Validate ``attention_colsum``'s inputs; return the scale."""
    op = "attention_colsum"
    _check_pair(op, q, k)
    if q.dim() < 2:
        raise ValueError(
            f"{op}: q must have shape (..., N, D) with at least 2 dims, got shape {tuple(q.shape)}"
        )
    _check_tokens(op, q)
    return check_scale(op, scale, q.shape[-1])


def _check_qkv(op: str, q, k, v) -> None:
    """q (..., Nq, D), k (..., Nk, D), v (..., Nk, Dv): tensors of one float dtype and device,
    the same leading dims, at least one token and one channel."""
    _check_tensors(op, q, k=k, v=v)
    if q.dim() < 2 or k.dim() != q.dim() or v.dim() != q.dim():
        raise ValueError(
            f"{op}: q, k, v must have shapes (..., Nq, D), (..., Nk, D), (..., Nk, Dv) with the "
            f"same leading dims, got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )
    if k.shape[:-2] != q.shape[:-2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"{op}: k.shape must be (..., Nk, D) = ({', '.join(map(str, q.shape[:-2]))}, Nk, "
            f"{q.shape[-1]}) to match q {tuple(q.shape)}, got {tuple(k.shape)}"
        )
    if v.shape[:-1] != k.shape[:-1]:
        raise ValueError(
            f"{op}: v.shape must be (..., Nk, Dv) with the leading dims and Nk of k "
            f"{tuple(k.shape)}, got {tuple(v.shape)}"
        )
    if min(q.shape[-2:]) < 1 or k.shape[-2] < 1 or v.shape[-1] < 1:
        raise ValueError(
            f"{op}: q, k, v need at least one token and one channel (Nq, Nk, D, Dv ≥ 1), got "
            f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}"
        )


def check_linear_attention(q, k, v, eps) -> float:
    """Validate ``linear_attention``'s inputs; return eps as a float."""
    op = "linear_attention"
    _check_qkv(op, q, k, v)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"{op}: eps must be a finite float ≥ 0, got {eps!r}")
    return float(eps)


def check_attention(q, k, v, scale, key_bias, colsum_rows) -> tuple[float, int]:
    """Validate ``attention``'s inputs; return the scale and the number of colsum rows."""
    op = "attention"
    _check_qkv(op, q, k, v)
    nq, nk = q.shape[-2], k.shape[-2]
    if key_bias is not None:
        if not isinstance(key_bias, torch.Tensor):
            raise TypeError(f"{op}: key_bias must be a torch.Tensor or None, got {type(key_bias).__name__}")
        _check_float_dtype(op, "key_bias", key_bias)
        if key_bias.device != q.device:
            raise ValueError(f"{op}: key_bias.device must equal q.device ({q.device}), got {key_bias.device}")
        lead = tuple(q.shape[:-2])
        try:
            broadcasts = torch.broadcast_shapes(key_bias.shape, (*lead, nk)) == (*lead, nk)
        except RuntimeError:
            broadcasts = False
        if key_bias.dim() < 1 or key_bias.shape[-1] != nk or not broadcasts:
            raise ValueError(
                f"{op}: key_bias.shape must be (..., Nk) with Nk = {nk}, broadcastable to q's leading dims "
                f"{lead}, got {tuple(key_bias.shape)}"
            )
    if colsum_rows is None:
        colsum_rows = nq
    elif not _is_int(colsum_rows) or not 1 <= colsum_rows <= nq:
        raise ValueError(f"{op}: colsum_rows must be an int in [1, Nq = {nq}] or None, got {colsum_rows!r}")
    return check_scale(op, scale, q.shape[-1]), colsum_rows
