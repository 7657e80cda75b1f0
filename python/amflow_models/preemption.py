"""SIGTERM, what schedulers (Slurm, Kubernetes, torchrun passing on its own) send some seconds
before they kill a job, turned into a request that the training loop honours between steps."""

from __future__ import annotations

import signal
import threading


class Preempted(Exception):
    """Training stopped on request after a step, with ``last.pt`` written; the message says how
    to resume."""


class StopRequest:
    """While entered, SIGTERM sets ``requested`` instead of ending the process (main thread only;
    elsewhere Python cannot install handlers and SIGTERM keeps its previous meaning)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._request)
        return self

    def _request(self, signum, frame) -> None:
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
