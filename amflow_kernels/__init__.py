"""amflow_kernels: fused kernels for AM flow, the attention-map motion signal of video ViTs.

    import amflow_kernels
    flow = amflow_kernels.am_flow(q, k)            # (B, T, H, N, D) → (B, T−1, H, N)
    out, colsum = amflow_kernels.attention(q, k, v) # softmax attention + the attention each key receives
    out = amflow_kernels.linear_attention(q, k, v) # (..., N, D), (..., N, Dv) → (..., N, Dv)
    amflow_kernels.nn.AligningEncoder              # aligned AM flow for moving cameras

``python -m amflow_kernels`` reports versions and backends and checks them on this machine.
"""

from . import nn
from ._dispatch import available_backends
from .ops.am_flow import am_flow
from .ops.attention import attention
from .ops.attention_colsum import attention_colsum
from .ops.linear_attention import linear_attention

__version__ = "0.1.0"
__all__ = ["__version__", "am_flow", "attention", "attention_colsum", "available_backends", "linear_attention", "nn"]
