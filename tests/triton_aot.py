"""Ahead-of-time compilation of the Triton kernels for a GPU target, on a machine without one:
what each kernel needs per program, as Triton's compiler and its bundled ptxas allocate it.

Triton compiles for any target without a driver (ptxas comes with it), so a CPU machine can
check what only a GPU would otherwise show: shared memory beyond the device's (a launch fails
with OutOfResources) and registers spilled to local memory (a silent slowdown). Kernels are
compiled as a launch specialises them for the layouts the package's launchers pass (tensors
16-byte aligned, strides multiples of 16 elements, the last dim contiguous). Run in a process
without TRITON_INTERPRET, which would turn the kernels into interpreted functions:
``python tests/triton_aot.py '<JSON list of cases>'`` prints one JSON result per case.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

POINTER = {"float32": "*fp32", "float16": "*fp16", "bfloat16": "*bf16"}
# Arguments by role: tensors of the input dtype, fp32 buffers, ints and floats.
INPUT_TENSORS = {"Q", "K", "V", "X", "Y", "OUT", "DQ", "DK", "DQK", "DV_OUT", "GRAD", "GRAD_OUT"}
FLOAT_BUFFERS = {"STATS", "C", "STATS_BWD", "S_PART", "R_PART", "DEN", "W", "KV", "Z", "DKV", "DZ", "BIAS", "COLSUM",
                 "GRAD_COLSUM", "DELTA", "DBIAS"}
FLOATS = {"scale", "eps"}
ALIGNED = [["tt.divisibility", 16]]


def _kernel(name: str):
    from amflow_kernels.ops import attention_triton, linear_attention_triton, softmax_colsum_triton

    modules = (softmax_colsum_triton, linear_attention_triton, attention_triton)
    kernel = next(getattr(module, name) for module in modules if hasattr(module, name))
    return kernel.fn if isinstance(kernel, triton.runtime.autotuner.Autotuner) else kernel


def colsum_case(kernel: str, dtype: str, cc: int, num_warps: int, **constexprs) -> dict:
    """A colsum kernel's case, its PRECISION and BLOCK_K the launcher's choice for ``dtype``."""
    import torch

    from amflow_kernels.ops import softmax_colsum_tiles, triton_device

    torch_dtype = getattr(torch, dtype)
    constexprs = dict(PRECISION=triton_device.input_precision(torch_dtype),
                      BLOCK_K=softmax_colsum_tiles.block_k(constexprs["BLOCK_D"], torch_dtype), **constexprs)
    return dict(kernel=kernel, dtype=dtype, cc=cc, num_warps=num_warps, num_stages=1, constexprs=constexprs)


def linear_case(kernel: str, dtype: str, cc: int, block_d: int, block_dv: int, weighted: bool = False) -> dict:
    """The case of linear-attention kernel ``kernel`` (state, out, bwd_q or bwd_kv) at head-dim
    tiles (BLOCK_D, BLOCK_DV) as the launcher runs it: its state slice and launch config;
    ``weighted``: the state kernel as the backward runs it."""
    from amflow_kernels.ops import linear_attention_triton as la

    block_e = la.state_slice_width(block_d, block_dv)
    block_n, num_warps, num_stages = la.launch_config(block_d, block_e)
    constexprs = dict(BLOCK_N=block_n,
                      BLOCK_D=block_d, BLOCK_E=block_e, **({"WEIGHTED": weighted} if kernel == "state" else {}))
    return dict(kernel=f"linear_attention_{kernel}_kernel", dtype=dtype, cc=cc, num_warps=num_warps,
                num_stages=num_stages, constexprs=constexprs)


def linear_cases(ccs, dtypes_for) -> list[dict]:
    """Every linear-attention kernel (the state kernel forward and weighted, as the backward runs
    it) at every pair of head-dim tiles 16–128, for each compute capability in ``ccs`` and each
    dtype ``dtypes_for(max(BLOCK_D, BLOCK_DV))`` gives; pairs with the same state slice compile to
    the same code, so each case appears once."""
    tiles = (16, 32, 64, 128)
    kernels = (("state", False), ("state", True), ("out", False), ("bwd_q", False), ("bwd_kv", False))
    cases = [
        linear_case(kernel, dtype, cc, bd, bdv, weighted)
        for cc in ccs for bd in tiles for bdv in tiles for dtype in dtypes_for(max(bd, bdv))
        for kernel, weighted in kernels
    ]
    return list({case_id(case): case for case in cases}.values())


ATTENTION_KERNELS = ("attention_fwd_kernel", "attention_colsum_kernel", "attention_bwd_rowdot_kernel",
                     "attention_bwd_dkv_kernel", "attention_bwd_dq_kernel")


def attention_cases(ccs, dtypes_for) -> list[dict]:
    """Every attention kernel as the launcher runs it (``launch_tiles``), with a key bias, at the
    widest head-dim tiles of each of its two tile shapes (64 and 128: registers grow with the
    tiles), for each compute capability in ``ccs`` and each dtype ``dtypes_for(block_d)`` gives."""
    import torch

    from amflow_kernels.ops import attention_triton, triton_device

    cases = []
    for cc in ccs:
        for block_d in (64, 128):
            for dtype in dtypes_for(block_d):
                tiles = attention_triton.launch_tiles(block_d, block_d, getattr(torch, dtype))
                num_warps = tiles.pop("num_warps")
                constexprs = dict(HAS_BIAS=True, PRECISION=triton_device.input_precision(getattr(torch, dtype)),
                                  **tiles)
                for kernel in ATTENTION_KERNELS:
                    fn = _kernel(kernel)
                    own = {name: value for name, value in constexprs.items() if name in fn.arg_names}
                    cases.append(dict(kernel=kernel, dtype=dtype, cc=cc, num_warps=num_warps, num_stages=1,
                                      constexprs=own))
    return cases


def _source(fn, dtype: str, constexprs: dict) -> ASTSource:
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in INPUT_TENSORS or name in FLOAT_BUFFERS:
            signature[name] = POINTER[dtype] if name in INPUT_TENSORS else "*fp32"
            attrs[(index,)] = ALIGNED
        elif name in FLOATS:
            signature[name] = "fp32"
        elif name.startswith("stride"):
            signature[name] = "i64"
            attrs[(index,)] = ALIGNED
        else:
            signature[name] = "i32"
    return ASTSource(
        fn=fn, signature=signature, attrs=attrs,
        constexprs={(fn.arg_names.index(name),): value for name, value in constexprs.items()},
    )


def resources(kernel: str, dtype: str, cc: int, num_warps: int, num_stages: int, constexprs: dict) -> dict:
    """Shared memory (bytes per program), registers per thread and spill bytes per thread of
    ``kernel`` compiled for compute capability ``cc``, read from ptxas' own report."""
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"  # Triton's compiler prints ptxas -v,
    os.environ["TRITON_ALWAYS_COMPILE"] = "1"  # which a hit in Triton's cache would skip
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(
            _source(_kernel(kernel), dtype, constexprs), target=GPUTarget("cuda", cc, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
    report = log.getvalue()
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    registers = re.search(r"Used (\d+) registers", report)
    if spills is None or registers is None:
        raise RuntimeError(f"no ptxas report from Triton {triton.__version__} (TRITON_DUMP_PTXAS_LOG)")
    return dict(
        shared=compiled.metadata.shared,
        registers=int(registers.group(1)),
        spill_stores=int(spills.group(1)),
        spill_loads=int(spills.group(2)),
    )


def case_id(case: dict) -> str:
    """``kernel-sm90-bfloat16-64x64x128-w4s1`` (the tiles in the kernel's BLOCK_* order)."""
    c = case["constexprs"]
    names = ("BLOCK_N", "BLOCK_D", "BLOCK_E") if "BLOCK_E" in c else ("BLOCK_M", "BLOCK_N", "BLOCK_D")
    tiles = "x".join(str(c[k]) for k in names if k in c)
    flags = "".join(f"-{k.lower()}" for k, v in c.items() if v is True)
    return f"{case['kernel']}-sm{case['cc']}-{case['dtype']}-{tiles}-w{case['num_warps']}s{case['num_stages']}{flags}"


def compile_cases(cases: list[dict], workers: int = 2) -> dict[str, dict]:
    """:func:`resources` of every case by its :func:`case_id`, from ``workers`` compiler
    processes without TRITON_INTERPRET (the cases dealt out between them), each compiling the
    kernels of the amflow_kernels this process imported."""
    import amflow_kernels

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # the package this process imported (a checkout or a worktree), not whichever is installed
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(amflow_kernels.__file__).parents[1]),
                                                      env.get("PYTHONPATH")]))
    procs = [
        subprocess.Popen([sys.executable, str(Path(__file__)), json.dumps(cases[i::workers])], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(workers)
    ]
    results = {}
    for proc in procs:
        out, err = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ahead-of-time compilation failed:\n{err[-3000:]}")
        for line in out.splitlines():
            result = json.loads(line)
            results[case_id(result)] = result
    return results


def compile_cases_once(cases: list[dict], shared_dir: Path) -> dict[str, dict]:
    """:func:`compile_cases`, each case once per test session: pytest-xdist workers each run a
    module's fixtures, and the register and shared-memory modules share many cases. Results are
    kept by case id in ``shared_dir``, a directory of this session that all its workers share
    (conftest's ``session_dir``); under its lock, whoever asks compiles the cases not there yet
    (on both compiler processes) and adds them."""
    results = shared_dir / "triton-aot.json"
    with open(shared_dir / "triton-aot.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        known = json.loads(results.read_text()) if results.exists() else {}
        missing = [case for case in cases if case_id(case) not in known]
        if missing:
            known.update(compile_cases(missing))
            results.write_text(json.dumps(known))
        return {case_id(case): known[case_id(case)] for case in cases}


if __name__ == "__main__":
    for case in json.loads(sys.argv[1]):
        print(json.dumps({**case, **resources(**case)}), flush=True)
