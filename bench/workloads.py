"""Benchmark workloads: shapes (B, T, H, N, D) of real ViTs as timm configures them, and the
bf16 CUDA inputs every provider of an op gets.

N counts patches plus prefix tokens: (224/16)² + cls = 197, (224/14)² + cls = 257,
+ 4 DINOv2 registers = 261, (518/14)² + cls = 1370.
"""

from __future__ import annotations

import torch
from helpers import make_qk

SHAPES = {
    "vit_base_patch16_224 B32 T8": (32, 8, 12, 197, 64),
    "vit_base_patch14_reg4_dinov2 B16 T8": (16, 8, 12, 261, 64),
    "vit_large_patch14_224 B8 T16": (8, 16, 16, 257, 64),
    "vit_base_patch14_dinov2.518 B2 T8": (2, 8, 12, 1370, 64),
    "vit_base_patch14_224 B4 T32": (4, 32, 12, 257, 64),
}
MODES = ("fwd", "fwd+bwd")


def qkv_inputs(shape, mode):
    """q, k: (B·T, H, N, D) bf16 views of one fused qkv projection (timm's layout); v alike."""
    B, T, H, N, D = shape
    q, k, _ = make_qk("qkv", B, T, H, N, D, torch.bfloat16, "cuda")
    v = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(mode != "fwd")
    return q, k, v


def step(forward, mode, inputs):
    """The timed call: the forward alone, or forward then backward of a fixed random cotangent."""
    if mode == "fwd":
        return forward
    grad = torch.randn_like(forward())

    def forward_backward():
        for t in inputs:
            t.grad = None
        forward().backward(grad)

    return forward_backward
