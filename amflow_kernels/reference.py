"""The literal formulas of the ops (docs/kernels.md derives the fused forms), materialising
every N×N map.

This module is the ground truth the fused backends are tested against: it is plain
PyTorch, runs on any device and in any floating dtype (float64 included), and is
differentiated by autograd. It computes in the dtype of its inputs, so a low-precision
call also measures "PyTorch's own error" for the tests' tolerance rule.

Notation: q, k are (B, T, H, N, D); S_t = scale · Q_t K_tᵀ is the N×N score map of
frame t for one (clip, head); softmax_j normalises each row over the keys j.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._layout import as_frames

__all__ = ["am_flow", "attention", "attention_colsum", "linear_attention"]


def am_flow(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    num_frames: int | None = None,
    offset: int = 1,
    scale: float | None = None,
) -> torch.Tensor:
    """flow[b, t, h, j] = Σ_i softmax_j(|S_t − S_{t+Δ}|)[i, j] for t = 0 … T−1−Δ.

    Returns (B, T−Δ, H, N) in the dtype of ``q``.
    """
    q, k = as_frames(q, num_frames), as_frames(k, num_frames)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = scale * (q @ k.transpose(-1, -2))  # (B, T, H, N, N)
    diff = (scores[:, :-offset] - scores[:, offset:]).abs()
    return diff.softmax(dim=-1).sum(dim=-2)


def attention_colsum(
    q: torch.Tensor, k: torch.Tensor, *, scale: float | None = None
) -> torch.Tensor:
    """colsum[..., j] = Σ_i softmax_j(S)[i, j] for q, k of shape (..., N, D)."""
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = scale * (q @ k.transpose(-1, -2))
    return scores.softmax(dim=-1).sum(dim=-2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    key_bias: torch.Tensor | None = None,
    colsum_rows: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """out = P V and colsum[..., j] = Σ_{i < R} P_ij with P = softmax_j(scale · Q Kᵀ + key_bias),
    R = ``colsum_rows`` (default: every query).

    q: (..., Nq, D), k: (..., Nk, D), v: (..., Nk, Dv), key_bias broadcastable to (..., Nk).
    Returns out (..., Nq, Dv) in q's dtype and colsum (..., Nk) in float32 (float64 for float64
    inputs).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scores = scale * (q @ k.transpose(-1, -2))  # (..., Nq, Nk)
    if key_bias is not None:
        scores = scores + key_bias.to(scores.dtype).unsqueeze(-2)
    probs = scores.softmax(dim=-1)
    rows = q.shape[-2] if colsum_rows is None else colsum_rows
    colsum_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    return probs @ v, probs[..., :rows, :].sum(dim=-2).to(colsum_dtype)


def linear_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, eps: float = 1e-6
) -> torch.Tensor:
    """out_i = φ(q_i)ᵀ (Σ_j φ(k_j) v_jᵀ) / (φ(q_i)ᵀ Σ_j φ(k_j) + eps), φ(x) = elu(x) + 1.

    q: (..., Nq, D), k: (..., Nk, D), v: (..., Nk, Dv) → (..., Nq, Dv). The einsum form of
    fast-transformers' non-causal ``LinearAttention``.
    """
    phi_q, phi_k = F.elu(q) + 1, F.elu(k) + 1
    kv = phi_k.transpose(-1, -2) @ v  # (..., D, Dv)
    normaliser = phi_q @ phi_k.sum(-2).unsqueeze(-1) + eps  # (..., Nq, 1)
    return (phi_q @ kv) / normaliser
