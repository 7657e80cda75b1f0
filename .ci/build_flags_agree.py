"""CI: setup.py and CMakeLists.txt build the extension from the same sources with the same flags.

    python .ci/build_flags_agree.py CMAKE_BUILD_DIR

Runs setup.py with ``setuptools.setup`` captured (no build) to get the extension pip would build,
and reads ``compile_commands.json`` of a CMake build configured with
``-DCMAKE_EXPORT_COMPILE_COMMANDS=ON``. Both must compile exactly the files of csrc/build.json's
globs, and every command must carry csrc/build.json's flags for its language (and CUDA's its
architectures, ``cuda_arch_list`` or TORCH_CUDA_ARCH_LIST).
"""

from __future__ import annotations

import json
import os
import platform
import runpy
import shlex
import sys
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]


def setup_extension(cuda: bool):
    """The Extension setup.py makes, with CUDA kernels or without."""
    os.environ["AMFLOW_BUILD_EXTENSION"] = "cuda" if cuda else "cpu"
    with mock.patch("setuptools.setup") as setup:
        runpy.run_path(str(ROOT / "setup.py"), run_name="__main__")
    (extension,) = setup.call_args.kwargs["ext_modules"]
    return extension


def main(build_dir: str) -> None:
    os.chdir(ROOT)
    build = json.loads((ROOT / "csrc" / "build.json").read_text())
    commands = json.loads((Path(build_dir) / "compile_commands.json").read_text())
    cmake_sources = sorted(str(Path(c["file"]).resolve().relative_to(ROOT)) for c in commands)
    cuda = any(source.endswith(".cu") for source in cmake_sources)
    extension = setup_extension(cuda)
    assert sorted(extension.sources) == cmake_sources, (
        f"setup.py compiles {sorted(extension.sources)}, CMake {cmake_sources}"
    )
    args = extension.extra_compile_args
    x86 = platform.machine() in ("x86_64", "AMD64")
    cpu = build["avx2_flags"] + [f"-D{d}" for d in build["avx2_defines"]] if x86 else []
    expected = {
        ".cpp": build["cxx_flags"] + cpu,
        ".cu": build["nvcc_flags"],
    }
    for language, flags in (("cxx", expected[".cpp"]), ("nvcc", expected[".cu"] if cuda else [])):
        missing = [f for f in flags if f not in args.get(language, [])]
        assert not missing, f"setup.py's {language} flags lack {missing}"
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or build["cuda_arch_list"]
    gencode = [f"arch=compute_{arch.replace('.', '')},code=sm_{arch.replace('.', '')}" for arch in archs.split(";")]
    for command in commands:
        words = command.get("arguments") or shlex.split(command["command"])
        flags = expected[Path(command["file"]).suffix] + (gencode if command["file"].endswith(".cu") else [])
        missing = [f for f in flags if f not in words]
        assert not missing, f"CMake compiles {command['file']} without {missing}"
    print(f"setup.py and CMake agree: {len(cmake_sources)} sources, flags of csrc/build.json")


if __name__ == "__main__":
    main(sys.argv[1])
