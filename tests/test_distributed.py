"""Training and evaluation beyond one process: torchrun (gloo on CPU), exact resume, preemption,
unreadable clips, and the errors of a badly launched run.

The torchrun runs train a tiny model on a tiny synthetic set (24 training clips, 4 steps of
6 clips per epoch), so that each launch takes seconds. One 2-process run of 3 epochs is the
reference that the others are compared with:
- one process with twice the per-process batch: the same parameters up to fp32 rounding;
- a run killed with SIGKILL after its first epoch, then resumed: bitwise the same;
- a run sent SIGTERM in its first epoch, then resumed: bitwise the same (2 processes), or up to
  rounding (resumed in 1 process with twice the batch);
- its checkpoint evaluated by 2 processes and by 1: the same metrics, bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import amflow_models
import pytest
import torch
import torch.distributed as dist
from amflow_models.cli import PREEMPTED_EXIT, main
from amflow_models.data.loader import ShardSampler, TrainSampler
from amflow_models.data.synthetic import generate_synthetic
from amflow_models.distributed import start

import amflow_kernels

for _module in ("av", "tqdm"):
    pytest.importorskip(_module, reason=f"training reads videos and shows progress with {_module}, a dependency "
                                        "of `pip install .` that this environment lacks")
if not (dist.is_available() and dist.is_gloo_available()):
    pytest.skip(reason="torch.distributed with gloo is needed for the CPU runs", allow_module_level=True)

TINY = ["--backbone", "vit_tiny_patch16_224", "--random-init", "--variant", "vanilla", "--tpm", "lstm",
        "--adapter-dim", "8", "--num-frames", "4", "--workers", "0", "--no-progress", "--backend", "reference",
        *(f"--backbone-arg={kv}" for kv in ("img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2"))]
EPOCHS = 3


def _data(root: Path, train: str = "train.txt", val: str = "val.txt") -> list[str]:
    return ["--train-list", str(root / train), "--val-list", str(root / val), "--root", str(root),
            "--labels-file", str(root / "classes.txt")]


def _environment() -> dict:
    """This test's packages first on the subprocesses' path, unbuffered output, one thread each."""
    paths = {str(Path(m.__file__).resolve().parents[1]) for m in (amflow_models, amflow_kernels)}
    return {**os.environ, "PYTHONPATH": os.pathsep.join(sorted(paths)), "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1"}


def _torchrun(*args: str, processes: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes),
            "-m", "amflow_models", *args]


def _run(cwd: Path, *args: str, processes: int = 2, expect: int = 0) -> str:
    done = subprocess.run(_torchrun(*args, processes=processes), cwd=cwd, env=_environment(), check=False,
                          capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == expect, f"torchrun exited with {done.returncode}, not {expect}:\n{output[-20000:]}"
    return output


def _last(out: Path) -> dict:
    return torch.load(out / "last.pt", map_location="cpu", weights_only=False)


def _epoch_saved(out: Path) -> int:
    """The epoch last.pt holds, 0 before there is one (it is replaced atomically: never half-written)."""
    return _last(out)["epoch"] if (out / "last.pt").is_file() else 0


def _assert_same_run(out: Path, reference: Path) -> None:
    ours, theirs = _last(out), _last(reference)
    assert ours["epoch"] == theirs["epoch"] == EPOCHS
    different = [k for k in theirs["state"] if not torch.equal(ours["state"][k], theirs["state"][k])]
    assert not different, f"parameters differ from the uninterrupted run: {different[:5]}"
    assert ours["history"] == theirs["history"]
    assert (out / "metrics.jsonl").read_text() == (reference / "metrics.jsonl").read_text()


def _assert_close_run(out: Path, reference: Path) -> None:
    ours, theirs = _last(out), _last(reference)
    for name, value in theirs["state"].items():
        torch.testing.assert_close(ours["state"][name], value, rtol=1e-5, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
    for mine, other in zip(ours["history"], theirs["history"], strict=True):
        assert mine["top1"] == other["top1"] and abs(mine["train_loss"] - other["train_loss"]) < 1e-5


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The synthetic set, and the reference run: 2 processes × 3 clips, 3 epochs."""
    root = tmp_path_factory.mktemp("distributed")
    data = generate_synthetic(root / "data", train_per_class=4, val_per_class=2, num_frames=6, size=32,
                              image_train=0, image_val=0)
    began = time.perf_counter()
    output = _run(root, "train", *_data(data), *TINY, "--batch-size", "3", "--epochs", str(EPOCHS),
                  "--out", str(root / "reference"))
    assert "2 processes × 3 clips = 6 clips per step, 4 steps per epoch" in output
    print(f"2-process reference run: {time.perf_counter() - began:.1f} s")
    return SimpleNamespace(root=root, data=data, reference=root / "reference")


def test_two_processes_train_as_one_with_twice_the_batch(runs, tmp_path):
    # loader workers too: an item is the same whichever process makes it
    assert main(["train", *_data(runs.data), *TINY, "--batch-size", "6", "--epochs", str(EPOCHS), "--workers", "2",
                 "--out", str(tmp_path)]) == 0
    _assert_close_run(tmp_path, runs.reference)
    losses = [epoch["train_loss"] for epoch in _last(runs.reference)["history"]]
    assert len(set(losses)) == EPOCHS, f"the model does not change: training losses {losses}"


def test_two_process_evaluation_equals_one_process_exactly(runs, tmp_path):
    views = ["--clips", "2", "--crops", "3", "--batch-size", "5", "--workers", "0", "--no-progress"]
    _run(runs.root, "eval", str(runs.reference / "last.pt"), *views, "--json", str(tmp_path / "two.json"))
    assert main(["eval", str(runs.reference / "last.pt"), *views, "--json", str(tmp_path / "one.json")]) == 0
    two, one = json.loads((tmp_path / "two.json").read_text()), json.loads((tmp_path / "one.json").read_text())
    assert two == one and one["clips"] == 12 and sum(map(sum, one["confusion"])) == 12


def test_sigkill_after_the_first_epoch_then_resume_is_bitwise_the_same_run(runs, tmp_path):
    out = tmp_path / "killed"
    args = ["train", *_data(runs.data), *TINY, "--batch-size", "3", "--epochs", str(EPOCHS), "--out", str(out)]
    run = subprocess.Popen(_torchrun(*args), cwd=runs.root, env=_environment(), start_new_session=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # until last.pt holds a finished epoch: the metrics line comes before it (and best.pt, each
    # fsynced), so a kill on seeing that line can still find last.pt at epoch 0 on a loaded machine
    while run.poll() is None and _epoch_saved(out) < 1:
        time.sleep(0.02)
    os.killpg(run.pid, signal.SIGKILL)  # torchrun and its workers at once, as a lost node
    run.wait()
    killed = _last(out)
    assert 1 <= killed["epoch"] < EPOCHS, f"the kill came too late to test anything (epoch {killed['epoch']})"
    _run(runs.root, *args, "--resume")
    _assert_same_run(out, runs.reference)


def test_sigterm_stops_after_a_step_and_the_run_resumes(runs, tmp_path):
    out = tmp_path / "stopped"
    args = ["train", *_data(runs.data), *TINY, "--batch-size", "3", "--epochs", str(EPOCHS), "--out", str(out)]
    run = subprocess.Popen(_torchrun(*args), cwd=runs.root, env=_environment(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)
    lines = []
    for line in run.stdout:
        lines.append(line)
        if "clips per step" in line:
            run.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to its workers
            break
    lines += run.stdout.readlines()
    run.wait(timeout=120)
    output = "".join(lines)
    assert "amflow train: stopped by SIGTERM after step" in output and "--resume" in output, output[-3000:]
    stopped = _last(out)
    assert stopped["epoch"] < EPOCHS and len(stopped["processes"]) == 2
    shutil.copytree(out, tmp_path / "on one process")
    _run(runs.root, *args, "--resume")
    _assert_same_run(out, runs.reference)
    # the same global batch on another number of processes continues the same run, up to rounding
    assert main([*args[:-1], str(tmp_path / "on one process"), "--batch-size", "6", "--resume"]) == 0
    _assert_close_run(tmp_path / "on one process", runs.reference)


def test_preempted_exit_status_on_one_process(runs, tmp_path, monkeypatch):
    """Without torchrun too: SIGTERM during a step → last.pt, the message, exit status 143."""
    from amflow_models import engine

    real_step = torch.optim.AdamW.step

    def step_then_sigterm(self, *a, **kw):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_step(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_sigterm)
    assert main(["train", *_data(runs.data), *TINY, "--batch-size", "6", "--out", str(tmp_path)]) == PREEMPTED_EXIT
    assert engine.read_checkpoint(tmp_path / "last.pt")["step"] == 1


def _bad_lists(data: Path) -> None:
    (data / "videos" / "train" / "truncated.mp4").write_bytes((data / "videos/train/00000.mp4").read_bytes()[:300])
    (data / "videos" / "train" / "text.mp4").write_text("not a video")
    bad = "videos/train/truncated.mp4 0\nvideos/train/text.mp4 1\n"
    good = (data / "train.txt").read_text().splitlines(keepends=True)
    (data / "train_bad.txt").write_text("".join(good + good[:4]) + bad)  # 30 clips: every one read each epoch
    (data / "val_bad.txt").write_text((data / "val.txt").read_text() + bad)


def test_unreadable_clips_are_replaced_in_training_and_reported_in_evaluation(runs, tmp_path, capsys):
    _bad_lists(runs.data)
    args = ["train", *_data(runs.data, "train_bad.txt", "val_bad.txt"), *TINY, "--batch-size", "6", "--epochs", "1"]
    assert main([*args, "--out", str(tmp_path / "tolerant")]) == 0
    output = capsys.readouterr().out
    assert "unreadable training clip: cannot decode video" in output and "truncated.mp4" in output
    assert "2 validation clips could not be read and were not scored" in output
    checkpoint = _last(tmp_path / "tolerant")
    assert sorted(Path(p).name for p in checkpoint["bad_clips"]) == ["text.mp4", "truncated.mp4"]
    assert checkpoint["history"][0]["clips"] == 12  # scored: the 12 readable validation clips
    assert main(["eval", str(tmp_path / "tolerant" / "last.pt"), "--list", str(runs.data / "val_bad.txt"),
                 "--workers", "0", "--no-progress", "--json", str(tmp_path / "eval.json")]) == 0
    assert "2 clips could not be read and are not scored" in capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["clips"] == 12 and sorted(Path(c["path"]).name for c in result["unscorable"]) == [
        "text.mp4", "truncated.mp4"]
    # past --max-bad-clips every process stops, naming the files
    output = _run(runs.root, *args, "--batch-size", "3", "--max-bad-clips", "1", "--out", str(tmp_path / "strict"),
                  expect=1)
    assert "(rank 0): error: 2 training clips cannot be read, more than --max-bad-clips 1" in output
    assert "(rank 1): error: 2 training clips cannot be read" in output and "text.mp4" in output


def test_resume_refuses_another_run(runs, tmp_path, capsys):
    shutil.copytree(runs.reference, tmp_path, dirs_exist_ok=True)
    args = ["train", *_data(runs.data), *TINY, "--epochs", str(EPOCHS + 1), "--out", str(tmp_path), "--resume"]
    assert main([*args, "--batch-size", "3"]) == 2  # 1 process × 3 clips: not the global batch of 6
    error = capsys.readouterr().err
    assert "run global_batch: 6 in the checkpoint, 3 now" in error and "2 process(es) × --batch-size 3" in error
    assert main([*args[:-1], "--adapter-dim", "16", "--lr", "0.01", "--batch-size", "6", "--resume"]) == 2
    error = capsys.readouterr().err
    assert "model adapter_dim: 8 in the checkpoint, 16 now" in error and "train lr: 0.001 in the checkpoint" in error


def test_samplers_split_steps_and_shards_as_documented():
    clips, batch = 29, 3
    for world in (1, 2, 3):
        samplers = [TrainSampler(clips, batch, world_size=world, rank=r, seed=7) for r in range(world)]
        single = TrainSampler(clips, world * batch, seed=7)
        for sampler in (*samplers, single):
            sampler.set_epoch(2)
        steps = [list(s) for s in samplers]
        expected = list(single)
        assert samplers[0].steps == single.steps == clips // (world * batch)
        for step in range(single.steps):
            together = sorted(key for s in steps for key in s[step * batch:(step + 1) * batch])
            assert together == sorted(expected[step * world * batch:(step + 1) * world * batch])
        samplers[0].set_epoch(2, start_step=1)
        assert list(samplers[0]) == steps[0][batch:]
        shards = [list(ShardSampler(clips, batch, world_size=world, rank=r)) for r in range(world)]
        assert sorted(i for s in shards for i, _ in s) == list(range(clips))
        for shard in shards:  # every batch of a shard is a batch of the single-process pass
            for first in range(0, len(shard), batch):
                indices = [i for i, _ in shard[first:first + batch]]
                assert indices[0] % batch == 0 and indices == list(range(indices[0], indices[0] + len(indices)))
    with pytest.raises(ValueError, match="the training set has 5 clips, fewer than one step takes: 2 processes × "
                                         "batch_size 3"):
        TrainSampler(5, 3, world_size=2)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")
def test_launch_errors_without_a_gpu(monkeypatch):
    with pytest.raises(ValueError, match="dist_backend='nccl' needs CUDA GPUs, and this run is on the CPU"):
        start(dist_backend="nccl")
    with pytest.raises(ValueError, match="device='cuda' needs a CUDA GPU, but torch sees none"):
        start("cuda")
    with pytest.raises(ValueError, match="dist_backend must be one of auto, nccl, gloo, got 'mpi'"):
        start(dist_backend="mpi")
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE='two' is not an integer"):
        start()
