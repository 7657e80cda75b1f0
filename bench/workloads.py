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
# CPU (float32, the machine's threads): the speed shape and its memory shape, and the
# demo's tiny ViT (32 px frames, patch 8: 16 patches + cls), where per-row work dominates.
CPU_SHAPES = {
    "vit_base_patch14_224 B2 T8": (2, 8, 12, 257, 64),
    "vit_base_patch14_dinov2.518 B1 T4": (1, 4, 12, 1370, 64),
    "demo tiny ViT B16 T8": (16, 8, 4, 17, 24),
}
MODES = ("fwd", "fwd+bwd")
DTYPE = {"cuda": torch.bfloat16, "cpu": torch.float32}


def workloads(fused_providers: dict[str, tuple[str, ...]]):
    """(device, shape name, provider) for every shape of each device and every provider."""
    return [
        (device, name, provider)
        for device, shapes in (("cuda", SHAPES), ("cpu", CPU_SHAPES))
        for name in shapes
        for provider in fused_providers[device]
    ]


def shape_of(device: str, name: str):
    return (SHAPES if device == "cuda" else CPU_SHAPES)[name]


def qkv_inputs(shape, mode, device):
    """q, k: (B·T, H, N, D) views of one fused qkv projection (timm's layout); v alike."""
    B, T, H, N, D = shape
    q, k, _ = make_qk("qkv", B, T, H, N, D, DTYPE[device], device)
    v = torch.randn_like(q)
    for t in (q, k, v):
        t.requires_grad_(mode != "fwd")
    return q, k, v


def step(forward, mode, inputs):
    """The timed call: the forward alone, or forward then backward of fixed random cotangents (one
    per output, where the forward returns several)."""
    if mode == "fwd":
        return forward
    first = forward()
    grads = [torch.randn_like(x) for x in (first if isinstance(first, tuple) else (first,))]

    def forward_backward():
        for t in inputs:
            t.grad = None
        outputs = forward()
        torch.autograd.backward(outputs if isinstance(outputs, tuple) else (outputs,), grads)

    return forward_backward
