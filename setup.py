"""Build and install amflow_kernels with its compiled extension (amflow_kernels._C).

``pip install .`` builds the extension from csrc/: CUDA and CPU kernels when a CUDA toolkit
is found, CPU kernels alone otherwise; sources and flags are csrc/build.json's, which
CMakeLists.txt reads too. Environment:

- ``AMFLOW_BUILD_EXTENSION``: ``auto`` (default; a failed build warns and installs the package
  without the extension, whose absence ``python -m amflow_kernels`` then explains), ``cuda`` or
  ``cpu`` (force that build; a failure fails the install), ``none`` (pure Python).
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures, default ``cuda_arch_list`` of csrc/build.json
  (8.0;9.0: A100, H100/H200).
- ``CUDA_HOME``: the toolkit root; defaults to /usr/local/cuda when its nvcc exists.
- ``AMFLOW_CPU_AVX2``: ``1`` (default on x86-64) compiles the CPU kernels for AVX2 + FMA.
- ``MAX_JOBS``: parallel compile jobs (ninja), default from the core count and memory.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent
BUILD = json.loads((ROOT / "csrc" / "build.json").read_text(encoding="utf-8"))
MODE = os.environ.get("AMFLOW_BUILD_EXTENSION", "auto").lower()
if MODE not in ("auto", "cuda", "cpu", "none"):
    sys.exit(f"AMFLOW_BUILD_EXTENSION must be auto, cuda, cpu or none, got {MODE!r}")


def _default_cuda_home() -> None:
    # torch guesses the toolkit root from the nvcc on PATH, which may be a wrapper script.
    if "CUDA_HOME" not in os.environ and Path("/usr/local/cuda/bin/nvcc").exists():
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def _max_jobs() -> None:
    # nvcc takes ~2 GB per job: size the ninja job count to memory as well as cores.
    if "MAX_JOBS" not in os.environ:
        try:
            memory_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
        except (ValueError, OSError):
            memory_gb = 8
        os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(memory_gb // 3))))


def _cpu_flags() -> list[str]:
    avx2 = os.environ.get("AMFLOW_CPU_AVX2", "1" if platform.machine() in ("x86_64", "AMD64") else "0")
    if avx2 == "1":
        return [f"-D{d}" for d in BUILD["avx2_defines"]] + BUILD["avx2_flags"]
    return [f"-D{d}" for d in BUILD["portable_defines"]]


def _openmp_flags() -> list[str]:
    # at::parallel_for is an inline OpenMP loop: without -fopenmp the CPU kernels run on one
    # thread. On Linux the extension then shares torch's bundled libgomp (same soname).
    return ["-fopenmp"] if sys.platform.startswith("linux") else []


def _sources(key: str) -> list[str]:
    """The files of csrc/build.json's globs under ``key``, relative to the root, sorted per glob."""
    return [str(p.relative_to(ROOT)) for pattern in BUILD[key] for p in sorted(ROOT.glob(pattern))]


def extension_build():
    """(ext_modules, cmdclass) for the requested build."""
    if MODE == "none":
        return [], {}
    _default_cuda_home()
    _max_jobs()
    from torch.utils import cpp_extension

    use_cuda = MODE == "cuda" or (MODE == "auto" and cpp_extension.CUDA_HOME is not None)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", BUILD["cuda_arch_list"])
    sources = _sources("sources")
    cxx = [*BUILD["cxx_flags"], *_cpu_flags(), *_openmp_flags()]  # the C++ standard: torch's, set by torch
    link = _openmp_flags()
    if use_cuda:
        sources += _sources("cuda_sources")
        nvcc = BUILD["nvcc_flags"]
        extension = cpp_extension.CUDAExtension(
            "amflow_kernels._C", sources, extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=link
        )
    else:
        extension = cpp_extension.CppExtension(
            "amflow_kernels._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link
        )

    class BuildExtension(cpp_extension.BuildExtension):
        """torch's BuildExtension (ninja); under ``auto`` a failure leaves a pure-Python install."""

        def run(self):
            try:
                super().run()
            except Exception as error:  # compiler errors surface as several exception types
                if MODE != "auto":
                    raise
                print(
                    f"\nWARNING: amflow_kernels._C failed to build ({error}); installing without the "
                    "compiled extension (the cuda and cpu backends). Set AMFLOW_BUILD_EXTENSION=cpu "
                    "or =cuda to make this an error.\n",
                    file=sys.stderr,
                )

    return [extension], {"build_ext": BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_build()

setup(
    name="amflow-kernels",
    version="0.1.0",
    description="Fused GPU kernels for AM flow: motion from the attention maps of frozen image ViTs",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=[
        *find_packages(include=["amflow_kernels", "amflow_kernels.*"]),
        *find_packages("python", include=["amflow_models", "amflow_models.*"]),
    ],
    package_dir={"amflow_models": "python/amflow_models"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    install_requires=[
        "torch>=2.7",
        # optional at run time (the cpu and reference backends run without it); 3.3 is the first
        # whose autotune() passes do_bench on, which the interpreter path relies on
        "triton>=3.3; platform_system == 'Linux'",
        # the model package (python/amflow_models)
        "timm>=1.0",
        "torchvision",  # timm's dependency too; the training clips' RandAugment and RandomErasing
        "av>=12",
        "numpy",
        "pillow",
        "matplotlib",
        "tqdm",
    ],
    entry_points={"console_scripts": ["amflow = amflow_models.cli:main"]},
    extras_require={
        # ninja: tests/cuda_emulator builds csrc/cuda's kernels with torch's JIT extension loader;
        # pytest-xdist: `pytest -n auto` spreads the suite over the cores; CI lints with ruff
        # (`ruff check .`, rules in pyproject.toml)
        "test": ["pytest>=8", "pytest-benchmark>=4", "pytest-xdist>=3", "numpy", "ninja", "ruff>=0.17,<0.18"],
        "bench": ["pytest>=8", "pytest-benchmark>=4", "numpy", "flash-colreduce"],
    },
    license="MIT",
)
