"""Builds csrc/cuda's kernels for the CPU emulator of emulator.h and loads them as a module.

The headers are copied with two rewrites that a C++ compiler needs in place of nvcc, as
hipify rewrites CUDA for HIP: ``kernel<<<config>>>(args)`` becomes
``::emu::launch(kernel, config)(args)`` and ``extern __shared__ T name[];`` becomes a pointer to
the launch's dynamic shared memory. Everything else compiles as written, against the stand-in
``<cuda_runtime.h>`` and ``<mma.h>`` of ``include/`` and CUDA's own fp16/bf16 headers.
"""

from __future__ import annotations

import functools
import os
import platform
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
CSRC_CUDA = HERE.parents[1] / "csrc" / "cuda"
# a·b + c contracted into one fused multiply-add, as nvcc does by default (--fmad=true): the
# kernels' fp32 sums then round as they do on a GPU (x86-64 needs -mfma for the instruction).
FUSED_MULTIPLY_ADD = ["-ffp-contract=fast", *(["-mfma"] if platform.machine() in ("x86_64", "AMD64") else [])]
LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)<<<(.*?)>>>\(")
DYNAMIC_SHARED = re.compile(r"extern __shared__ (\w+) (\w+)\[\];")
# `__shared__ [__align__(n)] TYPE NAME[DIMS];` (SharedVar aligns every array to 64 bytes)
STATIC_SHARED = re.compile(r"__shared__ (?:__align__\(\d+\) )?([\w:]+(?:<[^;]*?>)?) (\w+)((?:\[[^\]]+\])*);")


def cuda_headers() -> Path | None:
    """CUDA's include directory (for cuda_fp16.h, cuda_bf16.h, vector_types.h), if installed."""
    from torch.utils.cpp_extension import CUDA_HOME

    for root in (os.environ.get("CUDA_HOME"), CUDA_HOME, "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def rewrite(source: str) -> str:
    source = LAUNCH.sub(r"::emu::launch(\1, \2)(", source)
    source = DYNAMIC_SHARED.sub(r"\1* \2 = ::emu::dynamic_shared<\1>();", source)
    return STATIC_SHARED.sub(r'static ::emu::SharedVar<\1\3> \2_shared; auto& \2 = \2_shared.get("\2");', source)


# The checked build (checks.h): every load and store instrumented by GCC's ThreadSanitizer pass,
# whose hooks checks.h defines in place of ThreadSanitizer's runtime (which is not linked).
CHECKED = ["-DAMFLOW_EMU_CHECKED", "-fsanitize=thread", "--param=tsan-instrument-func-entry-exit=0"]


@functools.cache
def load(cuda_cores_only: bool = False, checked: bool = False, fast_math: bool = False,
         sources: Path = CSRC_CUDA, tag: str = ""):
    """The emulated kernels as a module, built in torch's extension cache (per torch version).

    ``cuda_cores_only``: the build of GPUs older than sm_80, whose fp16/bf16 products run on
    CUDA cores instead of tensor cores (AMFLOW_CUDA_CORES_ONLY). ``checked``: with the memory,
    race and initialisation checks of checks.h. ``fast_math``: with the approximations and the
    flushing of subnormals that nvcc's --use_fast_math (setup.py) compiles to (fast_math.h).
    ``sources`` and ``tag``: another copy of csrc/cuda (a planted bug), built under its tag."""
    import torch
    from torch.utils.cpp_extension import load as load_extension

    headers = cuda_headers()
    if headers is None:
        raise RuntimeError("the CUDA emulator needs CUDA's headers (set CUDA_HOME to a toolkit)")
    variant = {"cuda_cores": cuda_cores_only, "checked": checked, "fast_math": fast_math}
    name = "_".join(["amflow_cuda_emulator", *(v for v, on in variant.items() if on), *filter(None, [tag])])
    cache = Path(os.environ.get("TORCH_EXTENSIONS_DIR", Path.home() / ".cache" / "torch_extensions"))
    build = cache / f"{name}-torch{torch.__version__}"
    build.mkdir(parents=True, exist_ok=True)
    texts = {path.name: rewrite(path.read_text()) for path in (*sources.glob("*.cuh"), *sources.glob("*.h"))}
    texts["ops.cpp"] = (HERE / "ops.cpp").read_text()
    for file, text in texts.items():  # rewritten only when changed: ninja rebuilds on mtimes
        target = build / file
        if not target.exists() or target.read_text() != text:
            target.write_text(text)
    return load_extension(
        name=name,
        sources=[str(build / "ops.cpp")],
        build_directory=str(build),
        extra_include_paths=[str(HERE / "include"), str(build), str(headers)],
        extra_cflags=["-O2", "-Wno-unknown-pragmas", *FUSED_MULTIPLY_ADD,
                      *(["-DAMFLOW_CUDA_CORES_ONLY"] if cuda_cores_only else []),
                      *(CHECKED if checked else []), *(["-DAMFLOW_EMU_FAST_MATH"] if fast_math else [])],
        verbose=False,
    )
