"""Layers on the fused ops: multi-head linear attention, the aligning encoder, and a timm ViT's
attention run through :func:`attention` so that it also gives the attention each token receives.

For moving cameras, AM flow taken straight from attention maps mixes camera and object
motion. The aligning encoder of the AM Flow paper reads, for every frame, the column sums
of the ViT's attention (one feature per head and token, :func:`attention_colsum`), passes
them through a small pre-norm transformer encoder built on linear attention (Katharopoulos
et al. 2020; 12 heads by default, weights shared across frames), and takes aligned AM flow
as ``|X_t − X_{t+Δ}|`` of its outputs X.

    encoder = AligningEncoder(in_features=12, dim=192, depth=2)
    flow = encoder.aligned_flow(q, k, num_frames=T)   # (B, T−1, N, 192)
    set_backend(model, "reference")                   # every such layer in a model

    ColsumAttention.patch(vit, blocks=[4], colsum_rows=1)  # timm ViT: block 4's attention also gives
    vit(images); vit.blocks[3].attn.colsum                 # what the CLS query pays each token (B, H, N)
"""

from __future__ import annotations

import torch
from torch import nn

from ._dispatch import ACCEPTED
from ._validate import check_am_flow, check_frames
from .ops.attention import attention
from .ops.attention_colsum import attention_colsum
from .ops.linear_attention import linear_attention

__all__ = [
    "AligningEncoder", "AligningEncoderLayer", "ColsumAttention", "FusedOpModule", "LinearAttention", "set_backend",
    "timm_attention_output", "timm_qkv",
]


class FusedOpModule(nn.Module):
    """A layer whose forward runs ``amflow_kernels`` ops on backend ``self.backend``."""

    backend: str


def set_backend(model: nn.Module, backend: str) -> None:
    """Run every ``amflow_kernels`` op inside ``model`` on ``backend``: sets it on each
    :class:`FusedOpModule` (checked when the ops run, against the inputs)."""
    if backend not in ACCEPTED:
        raise ValueError(f"set_backend: backend must be one of {ACCEPTED}, got {backend!r}")
    for module in model.modules():
        if isinstance(module, FusedOpModule):
            module.backend = backend


def _check_positive(layer: str, **values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{layer}: {name} must be an int ≥ 1, got {value!r}")


def timm_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v ``(F, H, N, D)`` of a timm ViT ``Attention`` for its tokens ``x`` ``(F, N, C)``:
    strided views of its fused qkv projection (no copy), q and k after its optional norms."""
    frames, tokens, _ = x.shape
    qkv = attn.qkv(x).reshape(frames, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return attn.q_norm(q), attn.k_norm(k), v


def timm_attention_output(attn: nn.Module, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The rest of a timm ``Attention``'s forward after its softmax attention ``out``
    ``(F, H, N, D)``: heads merged, its optional norm and sigmoid gate (of its input ``x``), the
    output projection."""
    frames, heads, tokens, head_dim = out.shape
    out = out.transpose(1, 2).reshape(frames, tokens, heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if getattr(attn, "gate", None) is not None:
        out = out * attn.gate(x).sigmoid()
    return attn.proj_drop(attn.proj(out))


class ColsumAttention(FusedOpModule):
    """A timm ViT ``Attention`` whose softmax attention runs through :func:`attention`: the same
    output, and in ``colsum`` the attention each token received in the last forward, ``(F, H, N)``
    float32, summed over every query or the first ``colsum_rows`` (``1``: what the class token
    attends to, EViT's token score). Attention dropout is not supported (a frozen or evaluated
    backbone has none), nor masks or causal attention (take the ViT's signature, refuse them).

    ``ColsumAttention.patch(vit, blocks)`` puts one in the given 1-based blocks of a timm
    ``VisionTransformer`` and returns them; see docs/kernels.md for EViT-style token pruning.
    """

    def __init__(self, attn: nn.Module, *, colsum_rows: int | None = None, backend: str = "auto"):
        super().__init__()
        missing = [name for name in ("qkv", "num_heads", "head_dim", "q_norm", "k_norm", "proj", "proj_drop")
                   if not hasattr(attn, name)]
        if missing:
            raise ValueError(
                f"ColsumAttention: {type(attn).__name__} is not a timm Attention (no {', '.join(missing)})"
            )
        self.attn, self.colsum_rows, self.backend = attn, colsum_rows, backend
        self.colsum: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("ColsumAttention: attention masks and causal attention are not supported; pass key "
                             "biases to amflow_kernels.attention instead")
        dropout = getattr(self.attn, "attn_drop", None)
        if self.training and dropout is not None and dropout.p > 0:
            raise ValueError(f"ColsumAttention: attention dropout ({dropout.p}) is not supported; call eval() "
                             "or set attn_drop.p = 0")
        q, k, v = timm_qkv(self.attn, x)
        scale = float(getattr(self.attn, "scale", self.attn.head_dim**-0.5))
        out, self.colsum = attention(q, k, v, scale=scale, colsum_rows=self.colsum_rows, backend=self.backend)
        return timm_attention_output(self.attn, out, x)

    @classmethod
    def patch(cls, vit: nn.Module, blocks, **options) -> list[ColsumAttention]:
        """Wrap the attention of ``vit.blocks[b − 1]`` for each 1-based ``b`` in ``blocks``."""
        depth = len(vit.blocks)
        if not blocks or any(not 1 <= b <= depth for b in blocks):
            raise ValueError(f"ColsumAttention.patch: blocks must be 1-based block numbers in 1..{depth}, got {blocks}")
        patched = []
        for b in blocks:
            block = vit.blocks[b - 1]
            if not isinstance(block.attn, cls):
                block.attn = cls(block.attn, **options)
            patched.append(block.attn)
        return patched


class LinearAttention(FusedOpModule):
    """Multi-head non-causal linear attention: one fused qkv projection, :func:`linear_attention`
    per head (φ = elu + 1), an output projection and dropout.

    Args:
        dim: token width C.
        num_heads: heads H; the head width is ``head_dim`` or C / H.
        qkv_bias: bias of the qkv projection.
        dropout: dropout after the output projection (linear attention has no attention
            matrix to drop from).
        eps: the normaliser's eps.
        backend: the :func:`linear_attention` backend.

    Shape: ``(..., N, C) → (..., N, C)``.
    """

    def __init__(
        self, dim: int, num_heads: int = 12, *, head_dim: int | None = None, qkv_bias: bool = True,
        dropout: float = 0.0, eps: float = 1e-6, backend: str = "auto",
    ):
        super().__init__()
        _check_positive("LinearAttention", dim=dim, num_heads=num_heads)
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(
                    f"LinearAttention: dim must be divisible by num_heads when head_dim is not given, "
                    f"got dim={dim}, num_heads={num_heads}"
                )
            head_dim = dim // num_heads
        _check_positive("LinearAttention", head_dim=head_dim)
        self.num_heads, self.head_dim, self.eps, self.backend = num_heads, head_dim, eps, backend
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=qkv_bias)
        self.proj = nn.Linear(num_heads * head_dim, dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (..., N, 3·H·hd) → three (B, H, N, hd) strided views, read in place by the kernels.
        qkv = self.qkv(x.reshape(-1, *x.shape[-2:]))
        q, k, v = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        out = linear_attention(q, k, v, eps=self.eps, backend=self.backend)
        out = self.proj(out.transpose(1, 2).flatten(2))
        return self.dropout(out).reshape(*x.shape[:-1], -1)


class AligningEncoderLayer(nn.Module):
    """Pre-norm transformer encoder layer on linear attention:
    ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP of ``mlp_ratio · dim``."""

    def __init__(
        self, dim: int, num_heads: int = 12, *, mlp_ratio: float = 4.0, dropout: float = 0.0,
        eps: float = 1e-6, backend: str = "auto",
    ):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        _check_positive("AligningEncoderLayer", hidden_width=hidden)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = LinearAttention(dim, num_heads, dropout=dropout, eps=eps, backend=backend)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, dim), nn.Dropout(dropout)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class AligningEncoder(FusedOpModule):
    """The aligning encoder: per-frame attention column sums → a linear-attention transformer.

    Args:
        in_features: features per token: the ViT's attention heads (column sums per head).
        dim: the encoder's width.
        depth: encoder layers.
        num_heads: linear-attention heads (12, as in the paper).
        mlp_ratio, dropout, eps: of each layer.
        num_tokens: if given, a learned position embedding for that many tokens (the ViT's N,
            class token included), so the encoder can relate shifted patterns to positions.
        backend: the backend of both fused ops (``attention_colsum``, ``linear_attention``).

    ``forward`` maps per-token features ``(..., N, in_features) → (..., N, dim)``; every frame is
    encoded on its own with the same weights. ``aligned_flow`` goes from q, k to aligned AM flow.
    """

    def __init__(
        self, in_features: int = 12, dim: int = 192, depth: int = 2, num_heads: int = 12, *,
        mlp_ratio: float = 4.0, dropout: float = 0.0, num_tokens: int | None = None, eps: float = 1e-6,
        backend: str = "auto",
    ):
        super().__init__()
        _check_positive("AligningEncoder", in_features=in_features, dim=dim, depth=depth)
        if num_tokens is not None:
            _check_positive("AligningEncoder", num_tokens=num_tokens)
        self.in_features, self.backend = in_features, backend
        self.embed = nn.Linear(in_features, dim)
        self.position = nn.Parameter(torch.zeros(num_tokens, dim)) if num_tokens is not None else None
        if self.position is not None:
            nn.init.trunc_normal_(self.position, std=0.02)
        self.layers = nn.ModuleList(
            AligningEncoderLayer(dim, num_heads, mlp_ratio=mlp_ratio, dropout=dropout, eps=eps, backend=backend)
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.dim() < 2 or features.shape[-1] != self.in_features:
            raise ValueError(
                f"AligningEncoder: features must have shape (..., N, {self.in_features}), "
                f"got {tuple(features.shape)}"
            )
        x = self.embed(features)
        if self.position is not None:
            if x.shape[-2] != self.position.shape[0]:
                raise ValueError(
                    f"AligningEncoder: the position embedding is for N={self.position.shape[0]} tokens, "
                    f"got N={x.shape[-2]}"
                )
            x = x + self.position
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)

    def frame_features(
        self, q: torch.Tensor, k: torch.Tensor, *, num_frames: int | None = None, scale: float | None = None
    ) -> torch.Tensor:
        """Encoded frames X: ``(B, T, N, dim)`` from a ViT block's q, k (the layouts of ``am_flow``:
        ``(B, T, H, N, D)``, or ``(B·T, H, N, D)`` with ``num_frames``), H = in_features."""
        q, k, scale = check_frames("AligningEncoder.frame_features", q, k, num_frames, scale)
        return self(attention_colsum(q, k, scale=scale, backend=self.backend).transpose(-1, -2))

    def aligned_flow(
        self, q: torch.Tensor, k: torch.Tensor, *, num_frames: int | None = None, offset: int = 1,
        scale: float | None = None,
    ) -> torch.Tensor:
        """Aligned AM flow ``|X_t − X_{t+Δ}|``: ``(B, T−Δ, N, dim)``, for the inputs of
        :meth:`frame_features` and the frame distance ``offset`` = Δ."""
        q, k, scale = check_am_flow(q, k, num_frames, offset, scale)
        return self.flow_from_colsums(attention_colsum(q, k, scale=scale, backend=self.backend), offset=offset)

    def flow_from_colsums(self, colsums: torch.Tensor, *, offset: int = 1) -> torch.Tensor:
        """Aligned AM flow from each frame's attention column sums ``(B, T, H, N)``, H =
        in_features, as :func:`attention` returns them beside the block's own output (no second
        pass over the scores): ``(B, T−Δ, N, dim)``."""
        if colsums.dim() != 4 or colsums.shape[2] != self.in_features:
            raise ValueError(f"AligningEncoder.flow_from_colsums: colsums must have shape (B, T, "
                             f"{self.in_features}, N), got {tuple(colsums.shape)}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not 1 <= offset < colsums.shape[1]:
            raise ValueError(f"AligningEncoder.flow_from_colsums: offset must be an int in [1, T = "
                             f"{colsums.shape[1]}), got {offset!r}")
        x = self(colsums.transpose(-1, -2))
        return (x[:, :-offset] - x[:, offset:]).abs()
