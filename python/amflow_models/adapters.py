"""Adapters: the scaled parallel adapter of AM Flow and the linear adapter of ZeroI2V."""

from __future__ import annotations

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU}


class ScaledParallelAdapter(nn.Module):
    """``a(x) = s · f(x W_down) W_up`` (eq. 1 of AM Flow), added to the residual stream beside a
    frozen sub-layer: ``x + sublayer(LN(x)) + a(LN(x) ‖ extra)``.

    Args:
        in_features: width of the adapter input (the token width C, plus the AM flow channels
            when the adapter sits across MHSA, eq. 6).
        out_features: the token width C.
        bottleneck: width of the down-projection, the embedding the temporal modules read.
        init_scale: initial value of the learnable scalar s.
        activation: f, ``"relu"`` (the papers' eq. 6: ``E = ReLU(W_down(LN(X) ‖ AMFlow))``) or
            ``"gelu"``.

    ``W_up`` starts at zero, so the adapted model starts as the frozen backbone.
    ``forward`` returns ``(a(x), f(x W_down))``.
    """

    def __init__(
        self, in_features: int, out_features: int, bottleneck: int, init_scale: float = 1.0, activation: str = "relu"
    ):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.down = nn.Linear(in_features, bottleneck)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, out_features)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.act(self.down(x))
        return self.scale * self.up(hidden), hidden


class LinearAdapter(nn.Module):
    """ZeroI2V's linear adapter ``x + s · (x W_down) W_up``: no activation, so it is one affine
    map ``x ↦ x Mᵀ + c`` that merges into the frozen linear layer next to it.

    ``W_up`` starts at zero (the identity map). ``bias=False`` for an adapter beside a linear
    layer without bias, so the merged layer keeps the backbone's parameters exactly."""

    def __init__(self, features: int, bottleneck: int, init_scale: float = 1.0, bias: bool = True):
        super().__init__()
        self.down = nn.Linear(features, bottleneck, bias=bias)
        self.up = nn.Linear(bottleneck, features, bias=bias)
        self.scale = nn.Parameter(torch.tensor(float(init_scale)))
        nn.init.zeros_(self.up.weight)
        if bias:
            nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.up(self.down(x))

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M, c)`` in float64 with ``self(x) = x Mᵀ + c``: with Linear's weights
        ``D = W_downᵀ``, ``U = W_upᵀ``, ``M = I + s·U D`` and ``c = s·(U b_down + b_up)``."""
        d, u, s = self.down.weight.double(), self.up.weight.double(), self.scale.double()
        m = torch.eye(d.shape[1], dtype=torch.float64, device=d.device) + s * u @ d
        if self.down.bias is None:
            return m, torch.zeros(m.shape[0], dtype=torch.float64, device=m.device)
        return m, s * (u @ self.down.bias.double() + self.up.bias.double())


@torch.no_grad()
def merge_before(linear: nn.Linear, adapter: LinearAdapter) -> None:
    """Fold ``adapter`` into the ``linear`` that follows it: ``linear(adapter(x))`` becomes
    ``x W'ᵀ + b'`` with ``W' = W M`` and ``b' = W c + b``."""
    m, c = adapter.affine()
    w = linear.weight.double()
    weight, bias = w @ m, (w @ c + linear.bias.double()) if linear.bias is not None else None
    _assign(linear, weight, bias)


@torch.no_grad()
def merge_after(linear: nn.Linear, adapter: LinearAdapter) -> None:
    """Fold ``adapter`` into the ``linear`` before it: ``adapter(linear(x))`` becomes
    ``x W'ᵀ + b'`` with ``W' = M W`` and ``b' = M b + c``."""
    m, c = adapter.affine()
    weight = m @ linear.weight.double()
    bias = (m @ linear.bias.double() + c) if linear.bias is not None else None
    _assign(linear, weight, bias)


def _assign(linear: nn.Linear, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Write the merged weights (computed before any write: for float64 layers ``.double()`` is
    the parameter itself)."""
    linear.weight.copy_(weight)
    if bias is not None:
        linear.bias.copy_(bias)
