"""Checkpoint files: crash-safe writes, and a clear error for a file that is not a checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import amflow_models
import pytest
import torch
from amflow_models import checkpoints
from amflow_models.checkpoints import read_checkpoint, save_checkpoint
from amflow_models.cli import main


def _checkpoint(value: float, size: int = 1000) -> dict:
    return {"model_config": {"value": value}, "state": {"w": torch.full((size,), value)}}


def test_round_trip(tmp_path):
    save_checkpoint(_checkpoint(1.0), tmp_path / "last.pt")
    assert read_checkpoint(tmp_path / "last.pt")["model_config"] == {"value": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left


@pytest.mark.parametrize(
    "content, message",
    [
        (b"garbage", r"'.*garbage.pt' cannot be read by torch.load"),
        (b"", r"'.*garbage.pt' cannot be read by torch.load"),
        (torch.zeros(3), r"'.*garbage.pt' holds no model_config and state \(found Tensor\)"),
        ({"state": {}}, r"'.*garbage.pt' holds no model_config and state \(found \['state'\]\)"),
    ],
    ids=["text", "empty", "tensor", "dict"],
)
def test_not_a_checkpoint(tmp_path, capsys, content, message):
    path = tmp_path / "garbage.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        torch.save(content, path)
    with pytest.raises(ValueError, match="not an amflow checkpoint: " + message):
        read_checkpoint(path)
    assert main(["eval", str(path), "--no-progress"]) == 2
    assert "amflow eval: error: not an amflow checkpoint" in capsys.readouterr().err


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A write that fails halfway (disk full, an exception) leaves the old file whole and no
    temporary file behind."""
    path = tmp_path / "last.pt"
    save_checkpoint(_checkpoint(1.0), path)

    def torn_save(obj, file):
        file.write(b"PK\x03\x04 half a zip archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoints.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(_checkpoint(2.0), path)
    assert read_checkpoint(path)["model_config"] == {"value": 1.0}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


# Writes 8 MB checkpoints whose tensor holds one value, the value counting up, until killed.
WRITER = """
import sys, torch
from amflow_models.checkpoints import save_checkpoint
value = 0.0
while True:
    value += 1
    save_checkpoint({"model_config": {"value": value}, "state": {"w": torch.full((2_000_000,), value)}}, sys.argv[1])
    print(value, flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL (POSIX)")
def test_kill_during_writes_leaves_a_whole_checkpoint(tmp_path):
    """SIGKILL at several moments of a process that rewrites a checkpoint: each time the file
    reads back whole, one written value throughout."""
    path = tmp_path / "last.pt"
    env = {**os.environ, "PYTHONPATH": str(Path(amflow_models.__file__).resolve().parents[1])}  # this package
    for delay in (0.7, 1.1, 1.6):
        writer = subprocess.Popen(  # from tmp_path: no source checkout first on sys.path
            [sys.executable, "-c", WRITER, str(path)], env=env, cwd=tmp_path, stdout=subprocess.PIPE
        )
        assert writer.stdout.readline(), "the writer wrote no checkpoint"
        time.sleep(delay)
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        checkpoint = read_checkpoint(path)
        value = checkpoint["model_config"]["value"]
        assert torch.equal(checkpoint["state"]["w"], torch.full((2_000_000,), value))
