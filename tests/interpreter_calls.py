"""Device-function calls in Triton's interpreter without re-patching triton.language each time.

The interpreter runs a kernel with ``triton.language`` patched to its numpy builder
(``GridExecutor.__call__`` patches, runs every program, restores). Each call of a
``@triton.jit`` helper from inside that kernel patches the same modules again
(``InterpretedFunction.__call__`` → ``_patch_lang``: ``inspect.getmembers`` over ``tl``,
``tl.tensor`` and ``tl.math``, never restored). The result is the same objects patched the
same way, but it costs ~150 µs a call, and the colsum kernels make a helper call per tile and
per D chunk: measured on a 2-core machine, a third of the interpreter's time on the GPU grids.
:func:`install` skips that repeat when the running kernel has already patched every language
module the helper sees; a helper that sees one the kernel does not is patched as before.
"""

from __future__ import annotations

import functools
import inspect

import triton.language as tl
from triton.runtime import interpreter

_plain_kernel_call = interpreter.GridExecutor.__call__
_plain_device_call = interpreter.InterpretedFunction.__call__
_patched: list[frozenset[int]] = []  # the language modules each running kernel patched, innermost last


@functools.cache
def _languages(fn) -> frozenset[int]:
    """ids of the modules ``_patch_lang(fn)`` patches: tl and tl.core where fn's globals name them."""
    return frozenset(id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in (tl, tl.core))


def _kernel_call(self, *args, **kwargs):
    _patched.append(_languages(self.fn))
    try:
        return _plain_kernel_call(self, *args, **kwargs)
    finally:
        _patched.pop()


def _device_call(self, *args, **kwargs):
    if not _patched or not _languages(self.fn) <= _patched[-1]:
        return _plain_device_call(self, *args, **kwargs)
    fn = self.rewrite()
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise interpreter.InterpreterError(repr(e)) from e


def install() -> None:
    """Route the interpreter's kernel and device-function calls through the above (idempotent)."""
    interpreter.GridExecutor.__call__ = _kernel_call
    interpreter.InterpretedFunction.__call__ = _device_call
