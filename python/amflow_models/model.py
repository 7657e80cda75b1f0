"""The AM Flow video model: a frozen image ViT, scaled parallel adapters with AM flow, TPMs.

For a clip of T frames, the frames go through the ViT as one batch of B·T images. In each
adapted block (``adapter_blocks``), two scaled parallel adapters run beside the frozen
sub-layers (eq. 1):

    h = LN₁(x);  x ← x + MHSA(h) + a_attn(h ‖ flow)        (eq. 6; ‖ flow only in flow_blocks)
    h = LN₂(x);  x ← x + MLP(h)  + a_mlp(h)

``flow`` is the block's AM flow per token, from the q, k the block's attention already computed
(vanilla: ``am_flow``, H channels; aligned: the aligning encoder, its width in channels, on the
column sums that ``amflow_kernels.attention`` returns beside the block's attention output: one
pass over the scores gives both).
In each TPM block (``tpm_blocks``, default every adapted block) each adapter's down-projected
embedding feeds a temporal processing module (TPM) with its own classification head: the TPM
runs along time for every token and averages its outputs over tokens (``tpm.py``). The
backbone's head on the last frame gives one more set of logits; the model's logits are the
average of all of them: 2·12 + 1 = 25 for ViT-B with TPMs in every block, 2·2 + 1 = 5 for the
AVSS paper's AM/2(1,12) (adapters in every block; AM flow and TPMs in blocks 1 and 12 only).

``flow_only`` is a diagnostic, not a paper model: each MHSA adapter reads the AM flow alone
(``E = ReLU(W_down · flow)``, no LN(X)), there are no MLP adapters and no frame head, so the
logits come from the flow's TPMs only: how much of the task the flow carries by itself.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapters import ScaledParallelAdapter
from .backbone import attention_qk, attn_scale, check_backbone, embed_frames, freeze
from .flow import AlignedFlow, VanillaFlow
from .tpm import build_tpm

FLOW_KINDS = ("none", "vanilla", "aligned")


def check_video(model: str, video: torch.Tensor, backbone: nn.Module, min_frames: int) -> None:
    """Videos are ``(B, T, 3, H, W)`` float tensors of the backbone's image size."""
    if not isinstance(video, torch.Tensor) or video.dim() != 5:
        shape = tuple(video.shape) if isinstance(video, torch.Tensor) else type(video).__name__
        raise ValueError(f"{model}: video must have shape (B, T, C, H, W), got {shape}")
    channels = backbone.patch_embed.proj.in_channels
    if video.shape[2] != channels:
        raise ValueError(f"{model}: video must have {channels} channels (dim 2), got shape {tuple(video.shape)}")
    if video.shape[1] < min_frames:
        raise ValueError(
            f"{model}: video must have at least {min_frames} frames (dim 1) for AM flow at this offset, "
            f"got {video.shape[1]}"
        )
    size = getattr(backbone.patch_embed, "img_size", None)
    fixed_size = size is not None and not getattr(backbone.patch_embed, "dynamic_img_size", False)
    if fixed_size and tuple(video.shape[-2:]) != tuple(size):
        raise ValueError(f"{model}: frames must be {tuple(size)} pixels, got {tuple(video.shape[-2:])}")
    if not video.is_floating_point():
        raise TypeError(f"{model}: video must be a float tensor (normalised frames), got {video.dtype}")


def check_blocks(name: str, blocks, depth: int) -> tuple[int, ...]:
    """Block numbers (1-based, as the paper's "AM/2(1,12)"); ``None`` means all ``depth`` blocks."""
    if blocks is None:
        return tuple(range(1, depth + 1))
    blocks = tuple(sorted({int(b) for b in blocks}))
    if not blocks or blocks[0] < 1 or blocks[-1] > depth:
        raise ValueError(f"{name} must be block numbers in 1..{depth} (1-based), got {blocks}")
    return blocks


def _by_token(embedding: torch.Tensor, batch: int, frames: int) -> torch.Tensor:
    """``(B·T, N, r) → (B, N, T, r)``: each token's sequence over time, for a TPM."""
    return embedding.unflatten(0, (batch, frames)).transpose(1, 2)


class AMFlowVideoModel(nn.Module):
    """Video classifier on a frozen timm ViT (see the module docstring).

    Args:
        backbone: a timm ViT (``create_backbone``); it is frozen here.
        num_classes: video classes.
        flow: ``"vanilla"``, ``"aligned"`` or ``"none"`` (adapters and TPMs without AM flow).
        flow_blocks: 1-based blocks whose MHSA adapter reads AM flow (default: all adapted blocks).
        adapter_blocks: 1-based blocks with adapters (default: all).
        tpm_blocks: 1-based adapted blocks whose adapters feed TPMs (default: all adapted blocks).
        tpm: ``"lstm"``, ``"tcn"`` or ``"transformer"``.
        adapter_dim: adapter bottleneck r (the width each TPM reads).
        adapter_activation: the adapters' f, ``"relu"`` (the papers' eq. 6) or ``"gelu"``.
        offset: the frame distance Δ of AM flow.
        max_frames: the longest clip the transformer TPM accepts.
        aligner_dim, aligner_depth, aligner_heads: the aligning encoder of ``flow="aligned"``.
        backend: the ``amflow_kernels`` backend of the flow ops (``"auto"`` or ``"reference"``, …).
        flow_only: the diagnostic of the module docstring (needs AM flow in every adapted block).
        flow_norm: ``"none"`` (the papers) or ``"clip"``: the flow standardised per clip (``flow.py``).

    If the backbone's classifier already has ``num_classes`` outputs (say an image model
    fine-tuned on the dataset's frames), it stays frozen and gives the last frame's logits;
    otherwise a trainable linear head on the backbone's pooled features does.
    """

    def __init__(
        self, backbone: nn.Module, num_classes: int, *, flow: str = "vanilla", flow_blocks=None,
        adapter_blocks=None, tpm_blocks=None, tpm: str = "lstm", adapter_dim: int = 64,
        adapter_activation: str = "relu", offset: int = 1, max_frames: int = 32, aligner_dim: int = 96,
        aligner_depth: int = 1, aligner_heads: int = 12, backend: str = "auto", flow_only: bool = False,
        flow_norm: str = "none",
    ):
        super().__init__()
        check_backbone(backbone)
        if flow not in FLOW_KINDS:
            raise ValueError(f"flow must be one of {', '.join(FLOW_KINDS)}, got {flow!r}")
        if num_classes < 1 or adapter_dim < 1 or offset < 1 or max_frames < 2:
            raise ValueError(
                "num_classes, adapter_dim and offset must be ≥ 1 and max_frames ≥ 2, got "
                f"num_classes={num_classes}, adapter_dim={adapter_dim}, offset={offset}, max_frames={max_frames}"
            )
        self.backbone = freeze(backbone)
        self.num_classes, self.flow_kind, self.offset = num_classes, flow, offset
        depth = len(backbone.blocks)
        self.adapter_blocks = check_blocks("adapter_blocks", adapter_blocks, depth)
        flow_blocks = flow_blocks or self.adapter_blocks
        self.flow_blocks = () if flow == "none" else check_blocks("flow_blocks", flow_blocks, depth)
        self.tpm_blocks = check_blocks("tpm_blocks", tpm_blocks or self.adapter_blocks, depth)
        for name, blocks in (("flow_blocks", self.flow_blocks), ("tpm_blocks", self.tpm_blocks)):
            if not set(blocks) <= set(self.adapter_blocks):
                raise ValueError(f"{name} {blocks} must be adapted blocks, got adapter_blocks {self.adapter_blocks}")
        if flow_only and (flow == "none" or self.flow_blocks != self.adapter_blocks):
            raise ValueError(
                "flow_only needs AM flow in every adapted block (flow 'vanilla' or 'aligned', flow_blocks = "
                f"adapter_blocks), got flow={flow!r}, flow_blocks={self.flow_blocks}, "
                f"adapter_blocks={self.adapter_blocks}"
            )
        self.flow_only = flow_only

        width = backbone.embed_dim
        tokens = backbone.patch_embed.num_patches + backbone.num_prefix_tokens
        self.flows = nn.ModuleDict()
        for block in self.flow_blocks:
            heads = backbone.blocks[block - 1].attn.num_heads
            self.flows[str(block)] = (
                VanillaFlow(heads, offset=offset, norm=flow_norm, backend=backend) if flow == "vanilla" else
                AlignedFlow(heads, tokens, dim=aligner_dim, depth=aligner_depth, encoder_heads=aligner_heads,
                            offset=offset, norm=flow_norm, backend=backend)
            )
        self.adapters = nn.ModuleDict()
        self.tpms = nn.ModuleDict()
        for block in self.adapter_blocks:
            extra = self.flows[str(block)].features if str(block) in self.flows else 0
            adapters = {"attn": ScaledParallelAdapter((0 if flow_only else width) + extra, width, adapter_dim,
                                                      activation=adapter_activation)}
            if not flow_only:
                adapters["mlp"] = ScaledParallelAdapter(width, width, adapter_dim, activation=adapter_activation)
            self.adapters[str(block)] = nn.ModuleDict(adapters)
        for block in self.tpm_blocks:
            self.tpms[str(block)] = nn.ModuleDict({
                part: build_tpm(tpm, adapter_dim, num_classes, max_frames) for part in self.adapters[str(block)]
            })
        own_head = getattr(backbone, "num_classes", 0) == num_classes
        self.frame_head = None if own_head or flow_only else nn.Linear(backbone.num_features, num_classes)

    def train(self, mode: bool = True):
        super().train(mode)
        self.backbone.eval()  # frozen: no dropout, drop-path or batch statistics
        return self

    def forward(self, video: torch.Tensor, *, return_flows: bool = False):
        """Logits ``(B, num_classes)`` for normalised clips ``(B, T, 3, H, W)``; with
        ``return_flows``, also ``{block: flow (B, T, N, F)}`` for the flow blocks."""
        check_video("AMFlowVideoModel", video, self.backbone, self.offset + 1 if self.flow_blocks else 1)
        batch, frames = video.shape[:2]
        x = embed_frames(self.backbone, video.flatten(0, 1))
        logits, flows = [], {}
        for number, block in enumerate(self.backbone.blocks, start=1):
            key = str(number)
            if key not in self.adapters:
                x = block(x)
                continue
            h = block.norm1(x)
            flow_module = self.flows[key] if key in self.flows else None  # noqa: SIM401 (ModuleDict has no get)
            colsum_backend = getattr(flow_module, "colsum_backend", None)
            attended, q, k, colsums = attention_qk(block.attn, h, colsum_backend=colsum_backend)
            adapter_input = h
            if flow_module is not None:
                flow = flow_module(q, k, frames, attn_scale(block.attn), colsums=colsums)
                adapter_input = flow.to(h.dtype) if self.flow_only else torch.cat([h, flow.to(h.dtype)], dim=-1)
                if return_flows:
                    flows[number] = flow.unflatten(0, (batch, frames))
            delta, embedding = self.adapters[key]["attn"](adapter_input)
            if key in self.tpms:
                logits.append(self.tpms[key]["attn"](_by_token(embedding, batch, frames)))
            x = x + block.drop_path1(block.ls1(attended)) + delta
            h = block.norm2(x)
            x = x + block.drop_path2(block.ls2(block.mlp(h)))
            if "mlp" in self.adapters[key]:
                delta, embedding = self.adapters[key]["mlp"](h)
                if key in self.tpms:
                    logits.append(self.tpms[key]["mlp"](_by_token(embedding, batch, frames)))
                x = x + delta
        if not self.flow_only:
            last_frame = self.backbone.norm(x).unflatten(0, (batch, frames))[:, -1]
            if self.frame_head is None:
                logits.append(self.backbone.forward_head(last_frame))
            else:
                logits.append(self.frame_head(self.backbone.forward_head(last_frame, pre_logits=True)))
        dtype = torch.promote_types(video.dtype, torch.float32)  # float32 logits under autocast
        out = torch.stack([logit.to(dtype) for logit in logits]).mean(0)
        return (out, flows) if return_flows else out
