"""Triton is optional: where it cannot be imported (macOS, Windows, a CPU-only torch), the
package imports, the compiled CPU kernels and the reference run, and asking for the Triton
backend names the reason. Checked in a fresh interpreter in which ``import triton`` fails."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from helpers import require_backend

import amflow_kernels

# Runs with triton unimportable: every op on the cpu backend against the reference, and the
# error of backend="triton". Prints what it found as JSON.
SCRIPT = r"""
import json, sys
sys.modules["triton"] = None  # any `import triton` now raises ImportError
import torch
import amflow_kernels
from amflow_kernels import _dispatch

torch.manual_seed(0)
q, k, v = (torch.randn(2, 3, 2, 19, 8) for _ in range(3))
calls = {
    "am_flow": lambda backend: amflow_kernels.am_flow(q, k, backend=backend),
    "attention_colsum": lambda backend: amflow_kernels.attention_colsum(q, k, backend=backend),
    "linear_attention": lambda backend: amflow_kernels.linear_attention(q, k, v, backend=backend),
}
errors = {}
for name, call in calls.items():
    torch.testing.assert_close(call("auto"), call("reference"), rtol=1e-5, atol=1e-5)
    try:
        call("triton")
    except RuntimeError as error:
        errors[name] = str(error)
print(json.dumps({
    "triton_imported": any(m == "triton" or m.startswith("triton.") for m, v in sys.modules.items() if v),
    "available": amflow_kernels.available_backends("cpu"),
    "triton_reason": _dispatch.backend_report("cpu")["triton"],
    "errors": errors,
}))
"""


def test_package_runs_without_triton(tmp_path):
    require_backend("cpu", "cpu")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(Path(amflow_kernels.__file__).resolve().parents[1])  # this package
    # Run outside the checkout: `python -c` puts the working directory first on sys.path, where a
    # source tree's amflow_kernels (without the built extension) would shadow this one.
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert not report["triton_imported"]
    assert report["available"] == ["reference", "cpu"]
    assert report["triton_reason"].startswith("triton is not importable")
    assert set(report["errors"]) == {"am_flow", "attention_colsum", "linear_attention"}
    for message in report["errors"].values():
        assert "backend 'triton' cannot run" in message and "triton is not importable" in message
