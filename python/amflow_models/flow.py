"""Per-token AM flow of one ViT block, the extra input of its MHSA adapter (eq. 6).

Both modules map the block's q, k ``(B·T, H, N, D)`` (frames of a clip consecutive) to
features ``(B·T, N, F)`` for every frame t: the flow between frames t and t+Δ. The last Δ
frames of a clip have no successor; their flow is zero (documented, and what the adapter
learns to read as "no information").
"""

from __future__ import annotations

import torch
from torch import nn

import amflow_kernels
from amflow_kernels.nn import AligningEncoder, FusedOpModule


def _pad_last_frames(flow: torch.Tensor, offset: int) -> torch.Tensor:
    """``(B, T−Δ, N, F) → (B·T, N, F)`` with zeros for the last Δ frames of every clip."""
    batch, pairs, tokens, features = flow.shape
    zeros = flow.new_zeros(batch, offset, tokens, features)
    return torch.cat([flow, zeros], dim=1).reshape(batch * (pairs + offset), tokens, features)


class VanillaFlow(FusedOpModule):
    """Vanilla AM flow (fixed camera): ``softmax(|S_t − S_{t+Δ}|)ᵀ·1`` per head, from
    ``amflow_kernels.am_flow``; F = H channels, one per head. No parameters."""

    def __init__(self, num_heads: int, *, offset: int = 1, backend: str = "auto"):
        super().__init__()
        self.features, self.offset, self.backend = num_heads, offset, backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, num_frames: int, scale: float) -> torch.Tensor:
        flow = amflow_kernels.am_flow(
            q, k, num_frames=num_frames, offset=self.offset, scale=scale, backend=self.backend
        )
        return _pad_last_frames(flow.transpose(-1, -2), self.offset)


class AlignedFlow(nn.Module):
    """Aligned AM flow (moving camera): ``|X_t − X_{t+Δ}|`` of the aligning encoder's outputs X on
    each frame's attention column sums; F = the encoder's width."""

    def __init__(
        self, num_heads: int, num_tokens: int, *, dim: int = 96, depth: int = 1, encoder_heads: int = 12,
        offset: int = 1, backend: str = "auto",
    ):
        super().__init__()
        self.features, self.offset = dim, offset
        self.encoder = AligningEncoder(
            num_heads, dim, depth, encoder_heads, num_tokens=num_tokens, backend=backend
        )

    def forward(self, q: torch.Tensor, k: torch.Tensor, num_frames: int, scale: float) -> torch.Tensor:
        flow = self.encoder.aligned_flow(q, k, num_frames=num_frames, offset=self.offset, scale=scale)
        return _pad_last_frames(flow, self.offset)
