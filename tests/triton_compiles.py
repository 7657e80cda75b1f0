"""How many Triton compilations a run would trigger on a GPU, counted from a run under the
interpreter, which compiles nothing.

A GPU compiles a kernel once per specialisation: its constexprs and launch options
(num_warps, num_stages), each tensor argument's dtype and 16-byte alignment, and each int
argument's type and divisibility by 16 (with 1 as its own value), except those named in
``do_not_specialize``. :func:`specialization` forms that key for an interpreted launch (an
upper bound: Triton 3.3+ no longer specialises on 1), and :func:`recording` collects the keys
of every launch, optionally without running the kernels.

``AMFLOW_COUNT_COMPILES=DIR`` (read by conftest.py) records a whole pytest session and writes
the keys to DIR/compiles-<worker>.json; ``python tests/triton_compiles.py DIR`` prints how many
distinct ones the workers' files hold (bench/gpu_session.sh --dry-run does).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import sys
from pathlib import Path

OPTIONS = ("num_warps", "num_stages")


def _int_key(value: int, specialize: bool) -> tuple:
    kind = "i32" if -(2**31) <= value < 2**31 else "i64"
    return (kind, value == 1, value % 16 == 0) if specialize else (kind,)


def specialization(function, args: tuple, kwargs: dict) -> tuple:
    """The compile key of launching interpreted ``function`` with ``args`` and ``kwargs``."""
    names = function.arg_names
    parameters = inspect.signature(function.fn).parameters
    unspecialized = set(function.kwargs.get("do_not_specialize") or ())
    values = {**dict(zip(names, args)), **kwargs}
    key = [function.fn.__name__]
    for name, value in sorted(values.items()):
        if name in OPTIONS or (name in parameters and "constexpr" in str(parameters[name].annotation)):
            key.append((name, repr(value)))
        elif hasattr(value, "data_ptr"):
            key.append((name, str(value.dtype), value.data_ptr() % 16 == 0))
        elif isinstance(value, bool):
            key.append((name, "i1", value))
        elif isinstance(value, int):
            key.append((name, *_int_key(value, name not in unspecialized)))
        elif isinstance(value, float):
            key.append((name, "fp32"))
    return tuple(key)


@contextlib.contextmanager
def recording(execute: bool = True):
    """The set of compile keys of every interpreted launch made inside; with ``execute`` False
    the kernels are not run (their outputs stay as allocated)."""
    from triton.runtime.interpreter import InterpretedFunction

    keys: set[tuple] = set()
    run = InterpretedFunction.run

    def recorded(self, *args, grid, warmup, **kwargs):
        keys.add(specialization(self, args, kwargs))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs) if execute else None

    InterpretedFunction.run = recorded
    try:
        yield keys
    finally:
        InterpretedFunction.run = run


def write(keys: set[tuple], directory: Path, worker: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"compiles-{worker}.json").write_text(json.dumps(sorted(map(repr, keys))))


def count(directory: Path) -> int:
    """Distinct compile keys over every worker's file in ``directory``."""
    keys = set()
    for path in directory.glob("compiles-*.json"):
        keys.update(json.loads(path.read_text()))
    return len(keys)


if __name__ == "__main__":
    print(count(Path(sys.argv[1])))
