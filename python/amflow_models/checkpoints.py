"""Checkpoint files: written so that a kill at any moment leaves the old or the new one whole,
and read with an error that says what is wrong with a file that is not one."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import torch

REQUIRED_KEYS = ("model_config", "state")


def save_checkpoint(checkpoint: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file in ``path``'s folder, flushed and fsynced, then renamed
    over ``path`` (atomic on POSIX and Windows), and the folder fsynced so the rename survives a
    power loss. A process killed at any point leaves the previous file, or the new one, whole."""
    path = Path(path)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            torch.save(checkpoint, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        folder = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint dict written by :func:`save_checkpoint` (on CPU), or ``FileNotFoundError`` /
    ``ValueError("not an amflow checkpoint: …")`` naming the file and what is wrong with it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError, KeyError) as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"not an amflow checkpoint: {str(path)!r} cannot be read by torch.load ({reason})") from None
    if not isinstance(checkpoint, dict) or any(key not in checkpoint for key in REQUIRED_KEYS):
        found = sorted(checkpoint)[:8] if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ValueError(
            f"not an amflow checkpoint: {str(path)!r} holds no {' and '.join(REQUIRED_KEYS)} (found {found})"
        )
    return checkpoint
