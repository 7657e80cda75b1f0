"""Benchmark harness: every provider of an op timed side by side in one run.

Each measurement records the median time (pytest-benchmark, after warm-up, compilation and
autotuning; on CUDA with torch.cuda.synchronize() inside the timed call) and the peak memory
the call needs beyond its inputs: on CUDA from torch.cuda.max_memory_allocated, on CPU from
the process's resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs).
At the end of the session the results, with device, versions, threads, date and git
revision, go to bench/results/<device>-<date>.json and a markdown table beside it.
"""

from __future__ import annotations

import ctypes
import datetime
import json
import os
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the benchmarks reuse the tests' inputs and checks

RESULTS: list[dict] = []


def _status_mb(key: str) -> float:
    return int(re.search(key + r":\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) / 1024


_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None


def _mmap_threshold(nbytes: int) -> None:
    _LIBC.mallopt(_M_MMAP_THRESHOLD, nbytes)


def _peak_extra_mb(fn, device: str) -> float:
    """Peak memory one call of ``fn`` needs beyond what is allocated before it.

    CPU: glibc keeps freed heap memory resident and hands it out again, so a call that reuses
    it would not raise the resident set. Before measuring, free heap pages go back to the
    system (malloc_trim) and blocks from 64 KiB up are mapped on their own, so the resident
    high-water mark follows live allocations; for timing the threshold is set to 32 MiB,
    glibc's own steady state.
    """
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    _mmap_threshold(64 * 1024)
    _LIBC.malloc_trim(0)
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident set
        base = _status_mb("VmRSS")
        fn()
        return _status_mb("VmHWM") - base
    finally:
        _mmap_threshold(32 * 2**20)


def environment() -> dict:
    import triton

    import amflow_kernels
    from amflow_kernels.ops import autotune

    # AMFLOW_REVISION: where the checkout's .git is not the tree's (the device machine's copy)
    revision = os.environ.get("AMFLOW_REVISION") or subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "amflow_kernels": amflow_kernels.__version__,
        "autotune": autotune.MODE,
        "git_revision": revision,
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "cpu"


@pytest.fixture
def measure(benchmark):
    """measure(op, device, shape_name, mode, provider, fn, inputs, fused=...): time ``fn`` and
    record it; the memory probe starts with the inputs' gradients released. A provider that is
    not ours (``fused=False``) and cannot run the shape (e.g. torch.compile's InductorError)
    is recorded as failing and the benchmark xfails; our own failures raise."""

    def run(op: str, device: str, shape: str, mode: str, provider: str, fn, inputs, *, fused: bool) -> None:
        try:
            _measure(op, device, shape, mode, provider, fn, inputs)
        except Exception as error:
            if fused:
                raise
            RESULTS.append(dict(op=op, device=device, shape=shape, mode=mode, provider=provider,
                                error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"))
            pytest.xfail(f"{provider} cannot run this shape: {type(error).__name__}")

    def _measure(op: str, device: str, shape: str, mode: str, provider: str, fn, inputs) -> None:
        def timed():
            fn()
            if device == "cuda":
                torch.cuda.synchronize()

        for _ in range(3 if device == "cuda" else 1):  # warm-up: compilation, autotuning, allocator
            timed()
        for t in inputs:
            t.grad = None
        peak_mb = _peak_extra_mb(timed, device)
        benchmark.group = f"{op} {device} {shape} {mode}"
        benchmark.extra_info.update(
            op=op, device=device, shape=shape, mode=mode, provider=provider, peak_extra_mb=peak_mb
        )
        if device == "cuda":
            benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=1)
        else:
            benchmark.pedantic(timed, rounds=5, iterations=1)
        RESULTS.append(
            dict(op=op, device=device, shape=shape, mode=mode, provider=provider,
                 median_ms=benchmark.stats.stats.median * 1e3, peak_extra_mb=peak_mb)
        )

    return run


BASELINE = {"cuda": "sdpa", "cpu": "reference"}
# Ops without a PyTorch fused counterpart are compared with their eager reference everywhere;
# attention with SDPA everywhere (its out alone: what the fused op's out + colsum costs beyond it).
OP_BASELINE = {
    "attention": "sdpa", "linear_attention": "reference", "AligningEncoder": "reference",
    "AMFlowVideoModel vanilla": "reference", "AMFlowVideoModel aligned": "reference",
}


def markdown_table(results: list[dict]) -> str:
    """Per device, one row per (op, shape, mode): each provider's time, its ratio to the
    baseline (SDPA on CUDA, the eager reference on CPU) and its peak extra memory."""
    out = []
    for device in dict.fromkeys(r["device"] for r in results):
        mine = [r for r in results if r["device"] == device]
        providers = list(dict.fromkeys(r["provider"] for r in mine))
        rows = {}
        for r in mine:
            rows.setdefault((r["op"], r["shape"], r["mode"]), {})[r["provider"]] = r
        out += [
            f"**{device}** (×: time relative to {BASELINE[device]}; "
            + "; ".join(f"{op}: to {base}" for op, base in OP_BASELINE.items()) + ")\n",
            "| op | shape | mode | " + " | ".join(providers) + " |",
            "|---|---|---|" + "---|" * len(providers),
        ]
        for (op, shape, mode), cells in rows.items():
            base = cells.get(OP_BASELINE.get(op, BASELINE[device]), {}).get("median_ms")
            row = []
            for p in providers:
                c = cells.get(p)
                if c is None:
                    row.append("")
                elif "error" in c:
                    row.append("fails")
                else:
                    ratio = f" ({c['median_ms'] / base:.2f}×)" if base else ""
                    row.append(f"{c['median_ms']:.3f} ms{ratio}, {c['peak_extra_mb']:.0f} MB")
            out.append(f"| {op} | {shape} | {mode} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out) + "Time: median. MB: peak memory beyond the inputs (CUDA: allocated; CPU: resident).\n"


DESELECTED: list = []


def pytest_deselected(items):
    DESELECTED.extend(items)


def _partial(session) -> bool:
    """Whether ``-k``, ``-m`` or file arguments narrowed the run to part of the benchmarks."""
    ran = {Path(str(item.fspath)).name for item in session.items}
    return bool(DESELECTED) or ran != {p.name for p in (ROOT / "bench").glob("bench_*.py")}


def pytest_sessionfinish(session, exitstatus):
    """Write the results; a narrowed run writes ``<device>-<date>-partial``, never over a full
    run's record."""
    if not RESULTS:
        return
    env = environment()
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    partial = "-partial" if _partial(session) else ""
    stem = ROOT / "bench" / "results" / f"{slug}-{env['date'][:10]}{partial}"
    stem.with_suffix(".json").write_text(json.dumps({**env, "results": RESULTS}, indent=1) + "\n")
    header = (
        f"Device: {env['device']} ({env['cpu_threads']} CPU threads); torch {env['torch']}, "
        f"triton {env['triton']}, CUDA {env['cuda']}; autotune {env['autotune']}; {env['date']}; "
        f"rev {env['git_revision']}\n\n"
    )
    stem.with_suffix(".md").write_text(header + markdown_table(RESULTS))
