"""ZeroI2V (Li et al., 2023), the zero-cost image-to-video baseline, on the same frozen timm ViT.

- **Spatial-temporal dual-headed attention (STDHA)**: in every block, a few heads take their
  keys and values from frame t + Δt instead of t. The default is Table 11's for 8 frames: one
  head from t−1 and one from t+1 per 8 heads (ViT-B, 12 heads: once; ViT-L, 16 heads: twice);
  Table 11's settings for 16 and 32 frames add heads at ±2 and 3. Frames whose t + Δt lies
  outside the clip keep their own. No parameters, no extra FLOPs.
- **Linear adapters** ``x + s·(x W_down) W_up`` (no activation) in every adapted block: before
  the qkv projection, after the attention projection, before fc1 and after fc2 of the MLP; the
  bottleneck is a quarter of the token width by default (the paper's ratio 0.25).
- The classifier reads the pooled features averaged over frames; it is trained (reset to
  ``num_classes`` if the backbone's has another width).

``merge()`` folds every adapter into the frozen linear layer beside it (structural
re-parameterisation); the merged model is the backbone's own architecture and parameter count.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import LinearAdapter, merge_after, merge_before
from .backbone import attention_qk, check_backbone, embed_frames, freeze
from .model import check_blocks, check_video


def default_temporal_heads(num_heads: int) -> dict[int, int]:
    """One head from t−1 and one from t+1 per 8 heads, at least one each (ViT-B: heads 0 and 1)."""
    per_side = max(1, num_heads // 8)
    if 2 * per_side > num_heads:
        raise ValueError(f"ZeroI2V needs at least 2 heads for STDHA, the backbone has {num_heads}")
    return {**dict.fromkeys(range(per_side), -1), **{per_side + h: 1 for h in range(per_side)}}


class ZeroI2V(nn.Module):
    """ZeroI2V video classifier (see the module docstring).

    Args:
        backbone: a timm ViT (``create_backbone``); frozen here except its classifier.
        num_classes: video classes.
        temporal_heads: ``{head: Δt}`` for STDHA (default :func:`default_temporal_heads`).
        adapter_dim: linear adapter bottleneck (default: a quarter of the token width).
        adapter_blocks: 1-based blocks with linear adapters (default: all).
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, *, temporal_heads: dict[int, int] | None = None,
        adapter_dim: int | None = None, adapter_blocks=None,
    ):
        super().__init__()
        check_backbone(backbone)
        self.backbone = freeze(backbone)
        if getattr(backbone, "num_classes", 0) != num_classes:
            backbone.reset_classifier(num_classes)
        backbone.get_classifier().requires_grad_(True)
        self.num_classes = num_classes
        heads = backbone.blocks[0].attn.num_heads
        self.temporal_heads = dict(temporal_heads) if temporal_heads is not None else default_temporal_heads(heads)
        bad = {h: dt for h, dt in self.temporal_heads.items() if not 0 <= h < heads or dt == 0}
        if bad:
            raise ValueError(f"temporal_heads must map heads in 0..{heads - 1} to Δt ≠ 0, got {bad}")
        self.adapter_blocks = check_blocks("adapter_blocks", adapter_blocks, len(backbone.blocks))
        adapter_dim = adapter_dim or backbone.embed_dim // 4
        self.adapters = nn.ModuleDict()
        for number in self.adapter_blocks:
            block = backbone.blocks[number - 1]
            targets = {"qkv": block.attn.qkv, "proj": block.attn.proj, "fc1": block.mlp.fc1, "fc2": block.mlp.fc2}
            self.adapters[str(number)] = nn.ModuleDict({
                name: LinearAdapter(
                    linear.in_features if name in ("qkv", "fc1") else linear.out_features,
                    adapter_dim, bias=linear.bias is not None,
                )
                for name, linear in targets.items()
            })

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()
        return self

    def _shift(self, frames: int, heads: int, device: torch.device):
        """STDHA's key/value map: head h of frame t reads frame t + Δt(h) where that exists.
        The frame index is built once per forward and shared by every block."""
        source = torch.arange(frames).repeat(heads, 1)  # (H, T)
        for head, dt in self.temporal_heads.items():
            moved = source[head] + dt
            source[head] = torch.where((moved >= 0) & (moved < frames), moved, source[head])
        picks = (source.T.to(device), torch.arange(heads, device=device))

        def shift(k: torch.Tensor, v: torch.Tensor):
            return tuple(t.unflatten(0, (-1, frames))[:, picks[0], picks[1]].flatten(0, 1) for t in (k, v))
        return shift

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` for normalised clips ``(B, T, 3, H, W)``."""
        check_video("ZeroI2V", video, self.backbone, 1)
        batch, frames = video.shape[:2]
        shift = self._shift(frames, self.backbone.blocks[0].attn.num_heads, video.device)
        identity = nn.Identity()
        x = embed_frames(self.backbone, video.flatten(0, 1))
        for number, block in enumerate(self.backbone.blocks, start=1):
            key = str(number)
            adapters = self.adapters[key] if key in self.adapters else {}  # noqa: SIM401 (ModuleDict has no get)
            pre_qkv, post_proj, pre_fc1, post_fc2 = (
                adapters[n] if adapters else identity for n in ("qkv", "proj", "fc1", "fc2")
            )
            attended, *_ = attention_qk(block.attn, pre_qkv(block.norm1(x)), shift_kv=shift)
            x = x + block.drop_path1(block.ls1(post_proj(attended)))
            x = x + block.drop_path2(block.ls2(post_fc2(block.mlp(pre_fc1(block.norm2(x))))))
        features = self.backbone.forward_head(self.backbone.norm(x), pre_logits=True)
        return self.backbone.get_classifier()(features.unflatten(0, (batch, frames)).mean(1))

    @torch.no_grad()
    def merge(self) -> ZeroI2V:
        """Fold every linear adapter into the backbone's linear layers and drop the adapters.

        The outputs are unchanged (up to rounding; the products are formed in float64) and the
        model then has exactly the backbone's parameters. Returns ``self``."""
        for key, adapters in self.adapters.items():
            block = self.backbone.blocks[int(key) - 1]
            merge_before(block.attn.qkv, adapters["qkv"])
            merge_after(block.attn.proj, adapters["proj"])
            merge_before(block.mlp.fc1, adapters["fc1"])
            merge_after(block.mlp.fc2, adapters["fc2"])
        self.adapters = nn.ModuleDict()
        return self
