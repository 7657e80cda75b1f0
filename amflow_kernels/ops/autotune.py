"""How the Triton autotuners choose among their candidate configs: ``AMFLOW_AUTOTUNE``, read
when the kernel modules are imported.

- ``time`` (the default on a GPU): Triton's own choice; every candidate that fits the device is
  compiled and timed, once per autotune key.
- ``first``: the first candidate that fits, nothing timed (the default under Triton's
  interpreter, where every config ties). On a GPU a correctness run then compiles one config
  per key instead of every candidate: bench/gpu_session.sh runs its tests so.
- ``random`` or ``random:SEED``: a candidate that fits drawn per autotune key, reproducibly from
  the seed (0 if none). Partner kernels (colsum's cols after stats, dq/dk after rowdot) must
  run with the tiles their partner was tuned to, which ``first`` would never vary;
  tests/test_triton_checks.py runs a covering subset of the grids so, from the session seed.
"""

from __future__ import annotations

import os
import random

from .triton_device import INTERPRET

MODES = ("time", "first", "random")


def parse(value: str) -> tuple[str, int]:
    """(mode, seed) of an ``AMFLOW_AUTOTUNE`` value, or a ValueError that says what is accepted."""
    mode, _, seed = value.partition(":")
    if mode not in MODES or (seed and (mode != "random" or not seed.isdigit())):
        raise ValueError(
            f"AMFLOW_AUTOTUNE must be one of time, first, random or random:SEED (SEED a whole number), got {value!r}"
        )
    return mode, int(seed or 0)


MODE, SEED = parse(os.environ.get("AMFLOW_AUTOTUNE") or ("first" if INTERPRET else "time"))


def choose(fit, kernel: str, keys: tuple[str, ...]):
    """An ``early_config_prune`` for ``kernel``: the configs ``fit`` keeps, then, but in ``time``
    mode, the first of them or one drawn for this autotune key (the values of ``keys`` and the
    inputs' dtype)."""

    def prune(configs, named_args, **kwargs):
        fits = fit(configs, named_args, **kwargs)
        if MODE == "time":
            return fits
        if MODE == "first":
            return fits[:1]
        values = {**named_args, **kwargs}
        key = (SEED, kernel, *(values[name] for name in keys), str(named_args["Q"].dtype))
        return [random.Random(repr(key)).choice(fits)]

    return prune


def _untimed(kernel_call, quantiles):
    """Every config ties, so the one ``choose`` left runs; nothing is compiled to time it
    (Triton before 3.8 would time even a single config)."""
    return [0.0] * len(quantiles)


def do_bench():
    """The autotuners' ``do_bench``: Triton's own in ``time`` mode, else one that times nothing."""
    return None if MODE == "time" else _untimed
