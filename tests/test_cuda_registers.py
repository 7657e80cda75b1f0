"""Registers of the CUDA kernels (csrc/cuda/*.cuh) on the extension's GPU architectures, compiled here.

A thread whose kernel needs more registers than ptxas gives it spills to local memory, a silent
slowdown. nvcc compiles for any GPU without one, so this compiles every kernel the extension
instantiates (both ops' launchers, fp16 / bf16 / fp32), with the extension's own nvcc flags
and architectures (csrc/build.json), and requires ptxas to report no spill stores or loads for any of them. It needs
a CUDA toolkit's nvcc, as the extension's CUDA build does, and skips with the reason without one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

CSRC = Path(__file__).resolve().parents[1] / "csrc"
CSRC_CUDA = CSRC / "cuda"
BUILD = json.loads((CSRC / "build.json").read_text())
NVCC_FLAGS = [*BUILD["nvcc_flags"], "-std=c++17"]  # the C++ standard the kernels' headers need alone
ARCHS = [int(arch.replace(".", "")) for arch in BUILD["cuda_arch_list"].split(";")]
# Every launcher of both ops for each dtype: the kernels they launch are all instantiated.
INSTANTIATIONS = """
#include "softmax_colsum.cuh"
#include "linear_attention.cuh"
#define AMFLOW_INSTANTIATE(T)                                                              \\
  template cudaError_t amflow::cuda::launch_forward<T>(const amflow::cuda::ColsumParams&,  \\
                                                       cudaStream_t);                      \\
  template cudaError_t amflow::cuda::launch_backward<T>(const amflow::cuda::ColsumParams&, \\
                                                        cudaStream_t);                     \\
  template cudaError_t amflow::cuda::linear::launch_forward<T>(amflow::cuda::linear::Params, \\
                                                               int64_t, cudaStream_t);     \\
  template cudaError_t amflow::cuda::linear::launch_backward<T>(amflow::cuda::linear::Params, \\
                                                                int64_t, cudaStream_t);
AMFLOW_INSTANTIATE(float)
AMFLOW_INSTANTIATE(__half)
AMFLOW_INSTANTIATE(__nv_bfloat16)
"""
USAGE = re.compile(
    r"Function properties for (\S+)\n\s*(\d+) bytes stack frame, (\d+) bytes spill stores, "
    r"(\d+) bytes spill loads\n[^\n]*Used (\d+) registers"
)


def _nvcc() -> str | None:
    from torch.utils.cpp_extension import CUDA_HOME

    for root in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if root and (Path(root) / "bin" / "nvcc").is_file():
            return str(Path(root) / "bin" / "nvcc")
    return None


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if tool is None:
        return names
    return subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=True).stdout.split("\n")


@pytest.mark.parametrize("arch", ARCHS, ids=lambda arch: f"sm{arch}")
def test_cuda_kernels_do_not_spill(arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip(reason="needs a CUDA toolkit's nvcc (set CUDA_HOME), as the extension's CUDA build does")
    source = tmp_path / "kernels.cu"
    source.write_text(INSTANTIATIONS)
    result = subprocess.run(
        [nvcc, *NVCC_FLAGS, f"-arch=sm_{arch}", "-cubin", "--resource-usage", f"-I{CSRC_CUDA}",
         "-o", str(tmp_path / "kernels.cubin"), str(source)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    kernels = USAGE.findall(result.stdout + result.stderr)
    # 4 colsum kernels and 4 linear-attention kernels (state and bwd_q in two tile counts) a dtype
    assert len(kernels) >= 24, f"found {len(kernels)} kernels in ptxas' report"
    names = _demangle([k[0] for k in kernels])
    spilled = [
        f"{name}: {regs} registers, {stores} bytes of spill stores, {loads} of loads"
        for name, (_, _, stores, loads, regs) in zip(names, kernels)
        if int(stores) or int(loads)
    ]
    assert not spilled, "\n".join(spilled)
