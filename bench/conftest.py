"""Benchmark harness: every provider of an op timed side by side in one run.

Each measurement records the median time (pytest-benchmark, with torch.cuda.synchronize()
inside the timed call, after warm-up and autotuning) and the peak memory the call allocates
beyond its inputs. At the end of the session the results, with device, versions, date and
git revision, go to bench/results/<device>-<date>.json and a markdown table beside it.
"""

from __future__ import annotations

import datetime
import json
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
GPU_REASON = "GPU benchmark: needs a CUDA device; none is present on this machine"


def environment() -> dict:
    import triton

    import amflow_kernels

    revision = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "amflow_kernels": amflow_kernels.__version__,
        "git_revision": revision,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


@pytest.fixture
def measure(benchmark):
    """measure(op, shape_name, mode, provider, fn): time ``fn`` on CUDA and record it."""

    def run(op: str, shape: str, mode: str, provider: str, fn) -> None:
        def timed():
            fn()
            torch.cuda.synchronize()

        for _ in range(3):  # warm-up: compilation, autotuning, allocator
            timed()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        timed()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        benchmark.group = f"{op} {shape} {mode}"
        benchmark.extra_info.update(op=op, shape=shape, mode=mode, provider=provider, peak_extra_mb=peak_mb)
        benchmark.pedantic(timed, rounds=20, iterations=5, warmup_rounds=1)
        RESULTS.append(
            dict(op=op, shape=shape, mode=mode, provider=provider,
                 median_ms=benchmark.stats.stats.median * 1e3, peak_extra_mb=peak_mb)
        )

    return run


@pytest.fixture
def record_failure():
    """A provider that cannot run a shape (e.g. torch.compile's InductorError) is recorded."""

    def run(op: str, shape: str, mode: str, provider: str, error: Exception) -> None:
        RESULTS.append(dict(op=op, shape=shape, mode=mode, provider=provider,
                            error=f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"))

    return run


def markdown_table(results: list[dict]) -> str:
    """One row per (op, shape, mode): each provider's time and its ratio to SDPA's."""
    providers = list(dict.fromkeys(r["provider"] for r in results))
    rows = {}
    for r in results:
        rows.setdefault((r["op"], r["shape"], r["mode"]), {})[r["provider"]] = r
    lines = [
        "| op | shape | mode | " + " | ".join(providers) + " |",
        "|---|---|---|" + "---|" * len(providers),
    ]
    for (op, shape, mode), cells in rows.items():
        sdpa = cells.get("sdpa", {}).get("median_ms")
        out = []
        for p in providers:
            c = cells.get(p)
            if c is None:
                out.append("")
            elif "error" in c:
                out.append("fails")
            else:
                ratio = f" ({c['median_ms'] / sdpa:.2f}×)" if sdpa else ""
                out.append(f"{c['median_ms']:.3f} ms{ratio}, {c['peak_extra_mb']:.0f} MB")
        lines.append(f"| {op} | {shape} | {mode} | " + " | ".join(out) + " |")
    return "\n".join(lines) + "\n\nTime: median; (×): ratio to SDPA on the same q/k/v; MB: peak memory allocated beyond the inputs.\n"


def pytest_sessionfinish(session, exitstatus):
    if not RESULTS:
        return
    env = environment()
    slug = re.sub(r"[^a-z0-9]+", "-", env["device"].lower()).strip("-")
    stem = ROOT / "bench" / "results" / f"{slug}-{env['date'][:10]}"
    stem.with_suffix(".json").write_text(json.dumps({**env, "results": RESULTS}, indent=1) + "\n")
    header = f"Device: {env['device']}; torch {env['torch']}, triton {env['triton']}, CUDA {env['cuda']}; {env['date']}; rev {env['git_revision']}\n\n"
    stem.with_suffix(".md").write_text(header + markdown_table(RESULTS))
