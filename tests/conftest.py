"""Test setup: Triton's interpreter on CPU-only machines, seeding, NaN-poisoned allocations.

- Without CUDA, TRITON_INTERPRET=1 is set before amflow_kernels (and triton.jit) is imported,
  so the Triton kernels run on CPU tensors through Triton's interpreter. There, TF32 products
  are computed as a GPU computes them (tests/interpreter_tf32.py), and device-function calls
  skip the interpreter's redundant re-patching of triton.language (tests/interpreter_calls.py).
- Every test gets fresh random inputs: a session seed (AMFLOW_TEST_SEED, else random, shown
  in the report's header and last line) mixed with the test's id seeds torch before each test.
- torch.empty / torch.empty_like (and, without a GPU, the C++ at::empty) return NaN-filled
  memory, so an output element a kernel forgets to write fails loudly instead of passing by
  luck.
"""

from __future__ import annotations

import os
import random
import zlib
from pathlib import Path

import pytest
import torch

# Set in the environment, so pytest-xdist's workers, started after this, draw the same inputs.
SESSION_SEED = int(os.environ.setdefault("AMFLOW_TEST_SEED", str(random.SystemRandom().randrange(2**31))))
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if os.environ.get("TRITON_INTERPRET") == "1":
    import interpreter_calls
    import interpreter_tf32

    interpreter_calls.install()
    interpreter_tf32.install()


def _seed_line() -> str:
    settings = ("AMFLOW_TEST_SEED", "TRITON_INTERPRET", "AMFLOW_AUTOTUNE")
    return "amflow settings: " + "; ".join(f"{name}={os.environ.get(name, '')}" for name in settings)


def pytest_report_header(config):
    return _seed_line()


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed again at the end, where -q (which drops the header) still shows it: a failure on
    fresh random inputs is rerun on the same ones with AMFLOW_TEST_SEED."""
    terminalreporter.write_line(_seed_line())


def pytest_sessionstart(session):
    """AMFLOW_COUNT_COMPILES=DIR: every Triton launch's compile key recorded (triton_compiles.py)."""
    if os.environ.get("AMFLOW_COUNT_COMPILES") and os.environ.get("TRITON_INTERPRET") == "1":
        import triton_compiles

        session.config._amflow_compiles = triton_compiles.recording()
        session.config._amflow_compile_keys = session.config._amflow_compiles.__enter__()


def pytest_sessionfinish(session, exitstatus):
    recording = getattr(session.config, "_amflow_compiles", None)
    if recording is not None:
        import triton_compiles

        recording.__exit__(None, None, None)
        worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
        triton_compiles.write(session.config._amflow_compile_keys, Path(os.environ["AMFLOW_COUNT_COMPILES"]), worker)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    """A temporary directory of this test session that all its pytest-xdist workers share
    (each worker's own base directory sits in it; a lone process's is it)."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()) ^ SESSION_SEED)


_empty, _empty_like = torch.empty, torch.empty_like


def _poison(t: torch.Tensor) -> torch.Tensor:
    return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture(autouse=True)
def _nan_poisoned_allocations(monkeypatch):
    """torch.empty in Python, and without a GPU at::empty in C++ too (the CPU kernels' outputs):
    PyTorch's deterministic mode fills uninitialised memory with NaN. warn_only: no op is
    refused; on GPU machines the mode stays off, as cuBLAS would warn on every product."""
    monkeypatch.setattr(torch, "empty", lambda *a, **kw: _poison(_empty(*a, **kw)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **kw: _poison(_empty_like(*a, **kw)))
    if torch.cuda.is_available():
        yield
        return
    assert torch.utils.deterministic.fill_uninitialized_memory
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
