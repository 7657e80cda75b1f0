"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without one:
the shared memory each kernel needs per program, as Triton's compiler allocates it.

Triton compiles for any target without a driver (ptxas comes with it), so a CPU machine can
check what only a GPU launch would otherwise report (OutOfResources). Run in a process without
TRITON_INTERPRET, which would turn the kernels into interpreted functions:
``python tests/triton_aot.py '<JSON list of cases>'`` prints one JSON result per case.
"""

from __future__ import annotations

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
# Arguments by role: tensors of the input dtype, fp32 buffers, ints and floats.
INPUT_TENSORS = {"Q", "K", "V", "OUT", "DQ", "DK", "DV_OUT", "GRAD"}
FLOAT_BUFFERS = {"STATS", "C", "STATS_BWD", "KV_PART", "Z_PART", "KV", "Z", "DKV_PART", "DZ_PART"}
FLOATS = {"scale", "eps"}


def _kernel(name: str):
    from amflow_kernels.ops import colsum_triton, linear_attention_triton

    kernel = getattr(colsum_triton, name, None) or getattr(linear_attention_triton, name)
    return kernel.fn if isinstance(kernel, triton.runtime.autotuner.Autotuner) else kernel


def shared_memory(kernel: str, dtype: str, cc: int, num_warps: int, num_stages: int, constexprs: dict) -> int:
    """Bytes of shared memory that ``kernel`` needs per program on compute capability ``cc``."""
    fn = _kernel(kernel)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INPUT_TENSORS:
            signature[name] = POINTER[dtype]
        elif name in FLOAT_BUFFERS:
            signature[name] = "*fp32"
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i64" if name.startswith("stride") else "i32"
    source = ASTSource(
        fn=fn, signature=signature,
        constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
    )
    compiled = triton.compile(
        source, target=GPUTarget("cuda", cc, 32), options=dict(num_warps=num_warps, num_stages=num_stages)
    )
    return compiled.metadata.shared


if __name__ == "__main__":
    for case in json.loads(sys.argv[1]):
        print(json.dumps({**case, "shared": shared_memory(**case)}), flush=True)
