"""A tiny case of every CUDA kernel, forward and backward, for compute-sanitizer's memcheck,
racecheck and initcheck (bench/gpu_session.sh runs it under each): softmax colsum paired (AM
flow) and not, on tensor cores (fp16) and CUDA cores (fp32), with a tile edge (N = 33) and a
head dim off the 32-wide chunks (D = 40); linear attention with several chunks.

    python3 -P bench/sanitize_cases.py [--backend cuda|cpu]

(cpu: the same calls on the CPU backend, for a dry run without a GPU.)
"""

from __future__ import annotations

import argparse

import torch

import amflow_kernels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("cuda", "cpu"), default="cuda")
    backend = parser.parse_args().backend
    device = "cuda" if backend == "cuda" else "cpu"
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.float32) if backend == "cuda" else (torch.float32,):
        q, k = (torch.randn(1, 3, 2, 33, 40, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        for op in (amflow_kernels.am_flow, amflow_kernels.attention_colsum):
            out = op(q, k, backend=backend) if op is amflow_kernels.am_flow else op(q[0], k[0], backend=backend)
            out.float().sum().backward()
        q, k, v = (torch.randn(2, 2, 70, 40, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
        amflow_kernels.linear_attention(q, k, v, backend=backend).float().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
    print(f"sanitize cases ran on the {backend} backend")


if __name__ == "__main__":
    main()
