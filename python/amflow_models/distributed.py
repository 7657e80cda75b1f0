"""One process per GPU (or per share of a CPU) under torchrun: the process group, the device a
process drives, and the few collectives training and evaluation need.

``torchrun`` (``python -m torch.distributed.run``) sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``
and the rendezvous variables; :func:`start` reads them and joins the process group (``nccl`` on
CUDA, ``gloo`` on CPU). Without them a run is a world of one process and needs no group: every
collective below is then the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

DIST_BACKENDS = ("auto", "nccl", "gloo")


@dataclass(frozen=True)
class Runtime:
    """This process's place in the run: ``rank`` of ``world_size``, its ``device``."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """The one process that writes checkpoints, logs and progress bars."""
        return self.rank == 0

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum of ``values`` over the processes, in float64 (counts up to 2⁵³ exact)."""
        if self.world_size == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=self._collective_device())
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, value) -> list:
        """``value`` of every process (picklable), in rank order, on every process."""
        if self.world_size == 1:
            return [value]
        values = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def close(self, *, wait: bool = True) -> None:
        """Leave the process group; ``wait`` first for every process to get here, so that none
        exits while another still exchanges data with it (a run that failed cannot wait)."""
        if self.world_size > 1 and dist.is_initialized():
            if wait:
                dist.barrier()
            dist.destroy_process_group()

    def _collective_device(self) -> torch.device:
        return self.device if dist.get_backend() == "nccl" else torch.device("cpu")


def _environment_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer (torchrun sets it)") from None


def start(device: str | None = None, dist_backend: str = "auto") -> Runtime:
    """This process's :class:`Runtime`, joining the process group when torchrun started it.

    Args:
        device: ``cuda`` or ``cpu`` (default: ``cuda`` when available). Under torchrun each
            process drives GPU ``LOCAL_RANK``; a GPU index is not accepted there.
        dist_backend: ``auto`` (``nccl`` on CUDA, ``gloo`` on CPU), ``nccl`` or ``gloo``.
    """
    if dist_backend not in DIST_BACKENDS:
        raise ValueError(f"dist_backend must be one of {', '.join(DIST_BACKENDS)}, got {dist_backend!r}")
    world_size, rank = _environment_int("WORLD_SIZE", 1), _environment_int("RANK", 0)
    local_rank = _environment_int("LOCAL_RANK", 0)
    try:
        chosen = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    except RuntimeError:
        raise ValueError(f"device must be cuda, cuda:N or cpu, got {device!r}") from None
    if chosen.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be cuda, cuda:N or cpu, got {device!r}")
    if chosen.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} needs a CUDA GPU, but torch sees none; use --device cpu")
        if world_size > 1 and chosen.index is not None:
            raise ValueError(f"device={device!r}: under torchrun each process drives GPU LOCAL_RANK; use --device cuda")
        index = local_rank if world_size > 1 else (chosen.index or 0)
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"this process needs GPU {index} (LOCAL_RANK={local_rank}) but {torch.cuda.device_count()} are "
                "visible; start at most that many processes per node (torchrun --nproc_per_node)"
            )
        chosen = torch.device("cuda", index)
        torch.cuda.set_device(chosen)
    if dist_backend == "nccl" and chosen.type != "cuda":
        raise ValueError("dist_backend='nccl' needs CUDA GPUs, and this run is on the CPU; use gloo (or auto)")
    if world_size > 1 and not dist.is_initialized():
        backend = dist_backend if dist_backend != "auto" else "nccl" if chosen.type == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    return Runtime(rank=rank, world_size=world_size, device=chosen)


@contextmanager
def session(device: str | None = None, dist_backend: str = "auto") -> Iterator[Runtime]:
    """:func:`start`, and on leaving, :meth:`Runtime.close`: waiting for every process after
    success, at once after an error (the others may never get there)."""
    runtime = start(device, dist_backend)
    try:
        yield runtime
    except BaseException:
        runtime.close(wait=False)
        raise
    runtime.close()
