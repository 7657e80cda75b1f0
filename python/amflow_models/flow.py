"""Per-token AM flow of one ViT block, the extra input of its MHSA adapter (eq. 6).

Both modules map the block's q, k ``(B·T, H, N, D)`` (frames of a clip consecutive) to
features ``(B·T, N, F)`` for every frame t: the flow between frames t and t+Δ. The last Δ
frames of a clip have no successor; their flow is zero (documented, and what the adapter
learns to read as "no information").

``norm`` chooses what enters the adapter beside LN(X) (eq. 6):

- ``"none"``: the flow as the papers define it. A vanilla flow row sums to N, so its values sit
  around 1, and how far they stray depends on how sharp the backbone's attention is: on the
  demo's small image model their spread over tokens is 0.01–0.2, beside LN(X) channels of
  spread 1, so the adapter barely sees them.
- ``"clip"`` (not in the papers): each channel standardised over the clip's tokens and frame
  pairs, ``(f − mean) / (std + 1e-6)``: the same pattern of where the motion is, at the scale
  of LN(X), whatever the backbone. A clip's overall amount of motion is what it loses.
"""

from __future__ import annotations

import torch
from torch import nn

import amflow_kernels
from amflow_kernels.nn import AligningEncoder, FusedOpModule

FLOW_NORMS = ("none", "clip")


def _normalise(flow: torch.Tensor, norm: str) -> torch.Tensor:
    """``(B, T−Δ, N, F)`` flow, standardised per clip and channel for ``norm="clip"``."""
    if norm == "none":
        return flow
    std, mean = torch.std_mean(flow, dim=(1, 2), keepdim=True, correction=0)
    return (flow - mean) / (std + 1e-6)


def check_norm(norm: str) -> str:
    if norm not in FLOW_NORMS:
        raise ValueError(f"flow_norm must be one of {', '.join(FLOW_NORMS)}, got {norm!r}")
    return norm


def _pad_last_frames(flow: torch.Tensor, offset: int) -> torch.Tensor:
    """``(B, T−Δ, N, F) → (B·T, N, F)`` with zeros for the last Δ frames of every clip."""
    batch, pairs, tokens, features = flow.shape
    zeros = flow.new_zeros(batch, offset, tokens, features)
    return torch.cat([flow, zeros], dim=1).reshape(batch * (pairs + offset), tokens, features)


class VanillaFlow(FusedOpModule):
    """Vanilla AM flow (fixed camera): ``softmax(|S_t − S_{t+Δ}|)ᵀ·1`` per head, from
    ``amflow_kernels.am_flow``; F = H channels, one per head. No parameters."""

    def __init__(self, num_heads: int, *, offset: int = 1, norm: str = "none", backend: str = "auto"):
        super().__init__()
        self.features, self.offset, self.norm, self.backend = num_heads, offset, check_norm(norm), backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, num_frames: int, scale: float, colsums=None) -> torch.Tensor:
        """``colsums``: unused (vanilla AM flow needs the score maps of two frames)."""
        flow = amflow_kernels.am_flow(
            q, k, num_frames=num_frames, offset=self.offset, scale=scale, backend=self.backend
        )
        return _pad_last_frames(_normalise(flow.transpose(-1, -2), self.norm), self.offset)


class AlignedFlow(nn.Module):
    """Aligned AM flow (moving camera): ``|X_t − X_{t+Δ}|`` of the aligning encoder's outputs X on
    each frame's attention column sums; F = the encoder's width."""

    def __init__(
        self, num_heads: int, num_tokens: int, *, dim: int = 96, depth: int = 1, encoder_heads: int = 12,
        offset: int = 1, norm: str = "none", backend: str = "auto",
    ):
        super().__init__()
        self.features, self.offset, self.norm = dim, offset, check_norm(norm)
        self.encoder = AligningEncoder(
            num_heads, dim, depth, encoder_heads, num_tokens=num_tokens, backend=backend
        )

    @property
    def colsum_backend(self) -> str:
        """The backend the block's attention runs on (``amflow_kernels.attention``), to give the
        column sums this flow reads in the same pass as its output: the encoder's."""
        return self.encoder.backend

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, num_frames: int, scale: float, colsums: torch.Tensor | None = None
    ) -> torch.Tensor:
        """From ``colsums`` ``(B·T, H, N)`` where the block's attention gave them, else from q, k."""
        if colsums is not None:
            flow = self.encoder.flow_from_colsums(colsums.unflatten(0, (-1, num_frames)), offset=self.offset)
        else:
            flow = self.encoder.aligned_flow(q, k, num_frames=num_frames, offset=self.offset, scale=scale)
        return _pad_last_frames(_normalise(flow, self.norm), self.offset)
