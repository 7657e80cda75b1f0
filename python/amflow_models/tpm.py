"""Temporal processing modules: one per adapter, on its down-projected embedding.

Each maps the embedding ``(B, N, T, r)`` to class logits ``(B, num_classes)``: a temporal model
runs along T for every token (weights shared across tokens, so a token sees its own history,
e.g. the AM flow passing through it), is squeezed over T, averaged over the N tokens, and a
linear head classifies.
"""

from __future__ import annotations

import torch
from torch import nn

TPM_KINDS = ("lstm", "tcn", "transformer")


class LSTMModule(nn.Module):
    """A one-layer LSTM; squeeze = its last hidden state."""

    def __init__(self, features: int, num_classes: int, max_frames: int):
        super().__init__()
        self.lstm = nn.LSTM(features, features, batch_first=True)
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, (hidden, _) = self.lstm(x.flatten(0, 1))
        return self.head(hidden[-1].unflatten(0, x.shape[:2]).mean(1))


class TCNModule(nn.Module):
    """Two residual dilated temporal convolutions (kernel 3, dilations 1 and 2); squeeze = mean over T."""

    def __init__(self, features: int, num_classes: int, max_frames: int):
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv1d(features, features, 3, padding=d, dilation=d) for d in (1, 2))
        self.act = nn.GELU()
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens = x.shape[:2]
        x = x.flatten(0, 1).transpose(1, 2)
        for conv in self.convs:
            x = x + self.act(conv(x))
        return self.head(x.mean(-1).unflatten(0, (batch, tokens)).mean(1))


class TransformerModule(nn.Module):
    """One pre-norm transformer encoder layer over time with a learned position embedding for up
    to ``max_frames`` frames; squeeze = mean over T."""

    def __init__(self, features: int, num_classes: int, max_frames: int):
        super().__init__()
        heads = next(h for h in (8, 4, 2, 1) if features % h == 0)
        self.position = nn.Parameter(torch.zeros(max_frames, features))
        nn.init.trunc_normal_(self.position, std=0.02)
        self.encoder = nn.TransformerEncoderLayer(
            features, heads, 2 * features, dropout=0.0, batch_first=True, norm_first=True
        )
        self.head = nn.Linear(features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, frames = x.shape[:3]
        if frames > self.position.shape[0]:
            raise ValueError(
                f"TransformerModule: clips have {frames} frames, more than max_frames={self.position.shape[0]}"
            )
        encoded = self.encoder(x.flatten(0, 1) + self.position[:frames])
        return self.head(encoded.mean(1).unflatten(0, (batch, tokens)).mean(1))


def build_tpm(kind: str, features: int, num_classes: int, max_frames: int) -> nn.Module:
    modules = {"lstm": LSTMModule, "tcn": TCNModule, "transformer": TransformerModule}
    if kind not in modules:
        raise ValueError(f"tpm must be one of {', '.join(TPM_KINDS)}, got {kind!r}")
    return modules[kind](features, num_classes, max_frames)
