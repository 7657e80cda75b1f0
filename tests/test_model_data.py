"""The model package's data and command line: annotation formats, clip reading, sampling,
the synthetic dataset, and a train → eval → visualize round trip."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch
from amflow_models.build import ModelConfig, build_model
from amflow_models.cli import build_parser, main
from amflow_models.data.annotations import VideoRecord, flip_label_pairs, load_annotations
from amflow_models.data.dataset import VideoDataset, dense_indices, uniform_indices
from amflow_models.data.synthetic import CAMERAS, TASKS, dataset_clip, generate_synthetic, render_clip
from amflow_models.data.video_io import read_clip, write_video
from amflow_models.demo import NORMALISE, flow_peak_on_mover, run_demo, summarise, summarise_runs, variant_config
from amflow_models.visualize import overlay_flow

# `pip install .` brings these; an environment set up without the package's dependencies (say a
# GPU machine given the project with --no-deps) skips this module rather than failing in it.
for _module in ("av", "PIL", "tqdm", "matplotlib"):
    pytest.importorskip(_module, reason=f"the data, CLI and plotting code need {_module}, a dependency of "
                                        "`pip install .` that this environment lacks")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    return generate_synthetic(tmp_path_factory.mktemp("synthetic"), train_per_class=2, val_per_class=1,
                              num_frames=6, size=32, image_train=8, image_val=4)


def test_synthetic_clips_are_deterministic_and_read_back_close_to_rendered(synthetic):
    again = generate_synthetic(synthetic.parent / "again", train_per_class=2, val_per_class=1, num_frames=6, size=32,
                               image_train=8, image_val=4)
    assert (again / "train.txt").read_text() == (synthetic / "train.txt").read_text()
    for split in ("train", "val"):  # the H.264 bitstream may differ; the decoded frames may not
        for video in sorted((synthetic / "videos" / split).iterdir()):
            again_clip = read_clip(again / "videos" / split / video.name, range)  # every frame
            assert torch.equal(read_clip(video, range), again_clip)
    rendered, _ = dataset_clip("val", 4, seed=0, num_frames=6, size=32)  # what dataset_clip renders is what was written
    decoded = read_clip(synthetic / "videos/val/00004.mp4", range)
    assert decoded.shape == (6, 32, 32, 3) and decoded.dtype == torch.uint8
    other, _ = dataset_clip("train", 4, seed=0, num_frames=6, size=32)  # the same class, another clip
    error = (decoded.float() - torch.from_numpy(rendered).float()).abs().mean()
    unrelated = (decoded.float() - torch.from_numpy(other).float()).abs().mean()
    # lossless H.264 of 4:2:0 chroma on 32-pixel frames: a few of 255; another clip: ~40
    assert error < 12 and unrelated > 3 * error, f"decoded clip error {error:.1f}, other clip {unrelated:.1f}"
    records, classes = load_annotations(
        "list", synthetic / "train.txt", synthetic, labels_file=synthetic / "classes.txt"
    )
    assert classes == list(TASKS["which"]) and len(records) == 2 * len(classes)
    assert sorted(r.label for r in records) == sorted(list(range(len(classes))) * 2)


@pytest.mark.parametrize("camera", CAMERAS)
@pytest.mark.parametrize("task", TASKS)
def test_single_frames_do_not_tell_the_class(task, camera):
    """Every frame's statistics are the same whatever the class: only motion separates them.
    Measured on the mean colour of a frame and on where the L (the frame label's cell) is."""
    colours, cells = [], []
    for label in range(len(TASKS[task])):
        clips = [render_clip(label, np.random.default_rng([9, label, i]), num_frames=4, size=32, task=task,
                             camera=camera) for i in range(150)]
        colours.append(np.mean([frames.mean(axis=(0, 1, 2)) for frames, _ in clips], axis=0))
        cell = np.concatenate([labels for _, labels in clips])
        cells.append([np.mean(cell // 3), np.mean(cell % 3)])  # mean row and column of the labelled cell
    assert (np.ptp(np.stack(colours), axis=0) < 4).all(), f"frame colour depends on the class: {colours}"
    assert (np.ptp(np.stack(cells), axis=0) < 0.3).all(), f"where the L is depends on the class: {cells}"


def test_which_task_moves_one_shape_and_the_panning_camera_moves_the_scene():
    """Static camera: between the first and last frames only the moving shape's pixels change
    (a few percent of the frame); the shape that moves is the class's. Panning: most pixels do."""
    size = 48
    for label, mover in ((0, 0), (2, 1), (5, 2)):  # L slides, T slides, U turns
        frames, _ = render_clip(label, np.random.default_rng([3, label]), num_frames=8, size=size)
        change = np.abs(frames[-1].astype(int) - frames[0].astype(int)).max(-1) > 60
        assert 0.005 < change.mean() < 0.15, f"class {label}: {change.mean():.3f} of the pixels changed"
        # the changed pixels have the mover's saturated channel (L red, T green, U blue) in frame 0 or the last
        changed = np.concatenate([frames[0][change], frames[-1][change]]).astype(int)
        dominant = np.bincount(changed.argmax(-1), minlength=3)
        assert dominant.argmax() == mover, f"class {label}: the changed pixels' dominant channels {dominant}"
        panned, _ = render_clip(label, np.random.default_rng([3, label]), num_frames=8, size=size, camera="panning")
        moved = np.abs(panned[-1].astype(int) - panned[0].astype(int)).max(-1) > 30
        assert moved.mean() > 0.3, f"class {label}: a panning camera changed only {moved.mean():.3f} of the pixels"


@pytest.mark.parametrize("camera", CAMERAS)
def test_the_track_follows_the_moving_shape(camera):
    """In every frame, the pixels of the moving shape's colour (one channel saturated, the others
    dark: no background pixel is) lie within the shape's reach of the track, on the torus."""
    size = 48
    reach = 4.5 * size / 32 * 2 ** 0.5 + 1  # the largest half-size's corner, and a pixel of rounding
    for label in (0, 3, 4):  # L slides, T turns, U slides
        frames, labels, track = render_clip(label, np.random.default_rng([4, label]), num_frames=8, size=size,
                                            camera=camera, return_track=True)
        again, again_labels = render_clip(label, np.random.default_rng([4, label]), num_frames=8, size=size,
                                          camera=camera)
        assert np.array_equal(frames, again) and np.array_equal(labels, again_labels) and track.shape == (8, 2)
        channel = label // 2  # L red, T green, U blue
        others = [c for c in range(3) if c != channel]
        for t, frame in enumerate(frames.astype(int)):
            shape = (frame[..., channel] >= 230) & (frame[..., others] <= 120).all(-1)
            offset = np.abs(np.argwhere(shape) - track[t])
            distance = np.hypot(*np.minimum(offset, size - offset).T)
            assert shape.sum() >= 10 and distance.max() <= reach, (f"class {label}, frame {t}: {shape.sum()} shape "
                                                                   f"pixels, farthest {distance.max():.1f} px away")


def test_flow_peak_on_mover_finds_the_moving_shape_under_a_static_camera():
    """In the first block only the moving shape's tokens change, so their keys do: every row of
    |S_t − S_t+1| peaks in their columns, and the flow (column sums) peaks on them, whatever
    the backbone's weights (fresh random ones each run)."""
    tiny = dict(img_size=48, patch_size=8, embed_dim=32, depth=2, num_heads=2)
    model = build_model(ModelConfig(num_classes=6, backbone="vit_tiny_patch16_224", backbone_kwargs=tiny,
                                    variant="vanilla", adapter_dim=8, backend="reference"))
    clips = [render_clip(label, np.random.default_rng([5, label]), num_frames=6, size=48, return_track=True)
             for label in range(6)]
    rates, chance = flow_peak_on_mover(model, [(frames, track) for frames, _, track in clips], **NORMALISE)
    assert set(rates) == {1, 2} and all(0 <= rate <= 1 for rate in rates.values())
    assert 9 / 36 <= chance <= 18 / 36 and rates[1] > 0.9, (rates, chance)
    frames, _, track = clips[0]
    with pytest.raises(ValueError, match=r"frames must be \(48, 48\) \(the model's input\) .* got frames \(6, 32, 32"):
        flow_peak_on_mover(model, [(frames[:, :32, :32], track)], **NORMALISE)
    with pytest.raises(ValueError, match=r"with a track per frame, got frames \(6, 48, 48, 3\) and a track of 5"):
        flow_peak_on_mover(model, [(frames, track[:5])], **NORMALISE)


def test_synthetic_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match=r"camera one of static, panning.*camera='tilting'"):
        generate_synthetic(tmp_path, camera="tilting")
    with pytest.raises(ValueError, match=r"task must be one of which, direction.*task='colour'"):
        render_clip(0, np.random.default_rng(0), num_frames=4, size=32, task="colour")
    with pytest.raises(ValueError, match=r"label must be in 0\.\.5"):
        render_clip(6, np.random.default_rng(0), num_frames=4, size=32)
    with pytest.raises(ValueError, match=r"split must be one of train, val, got 'test'"):
        dataset_clip("test", 0, seed=0, num_frames=4, size=32)


def test_video_dataset_train_and_test_views(synthetic):
    records, classes = load_annotations("list", synthetic / "val.txt", synthetic, labels_file=synthetic / "classes.txt")
    kw = dict(num_frames=4, image_size=24, mean=(0.5,) * 3, std=(0.25,) * 3)
    video, label = VideoDataset(records, train=True, flip_pairs=flip_label_pairs(classes), **kw)[0]
    assert video.shape == (4, 3, 24, 24) and video.dtype == torch.float32
    views, label = VideoDataset(records, train=False, num_clips=2, num_crops=3, **kw)[1]
    assert views.shape == (6, 4, 3, 24, 24) and label == records[1].label


def test_rand_augment_and_random_erasing_treat_every_frame_alike(tmp_path):
    """A clip of 4 identical frames stays 4 identical frames through RandAugment and random
    erasing; an item is a function of its generator's seed."""
    import random

    from PIL import Image

    frame = np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    (tmp_path / "clip").mkdir()
    for i in range(4):
        Image.fromarray(frame).save(tmp_path / "clip" / f"img_{i:05d}.png")
    records = [VideoRecord(str(tmp_path / "clip"), 0)]
    kw = dict(num_frames=4, image_size=24, mean=(0.5,) * 3, std=(0.25,) * 3, train=True, flip=False)
    plain = VideoDataset(records, **kw).load(0, random.Random("s"))[0]
    augmented = VideoDataset(records, rand_augment="m9-n4", random_erasing=1.0, **kw)
    outputs = [augmented.load(0, random.Random(seed))[0] for seed in ("s", "s", "t")]
    for video in outputs:
        assert all(torch.equal(video[t], video[0]) for t in range(1, 4)), "frames augmented differently"
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
    assert not torch.equal(outputs[0], plain)
    erased = (outputs[0] == 0).all(1).float().mean()  # RandomErasing's box: zeros after normalisation
    assert 0.01 < erased < 0.5, f"the erased box covers {erased:.0%} of the frame"
    with pytest.raises(ValueError, match="rand_augment must look like m7-n4"):
        VideoDataset(records, rand_augment="m7", **kw)


def test_flip_swaps_mirrored_labels():
    classes = ["Pushing something from left to right", "Pushing something from right to left", "Tearing something"]
    assert flip_label_pairs(classes) == {0: 1, 1: 0}
    assert flip_label_pairs(list(TASKS["direction"])) == {0: 1, 1: 0, 4: 5, 5: 4}
    assert flip_label_pairs(list(TASKS["which"])) == {}


def test_sampling():
    assert uniform_indices(16, 4, train=False) == [2, 6, 10, 14]
    assert all(0 <= i < 3 for i in uniform_indices(3, 8, train=True))
    assert dense_indices(100, 4, 8, train=False) == [38, 46, 54, 62]  # centred: 38 + 62 ≈ 99
    assert dense_indices(5, 4, 2, train=False) == [0, 2, 4, 1]  # a short clip loops
    starts = {dense_indices(100, 4, 8, train=False, clip=c, num_clips=3)[0] for c in range(3)}
    assert len(starts) == 3


def _clip(path, frames=5):
    write_video(path, np.random.default_rng(0).integers(0, 255, (frames, 16, 16, 3), dtype=np.uint8))


def test_kinetics_csv_and_missing_clips(tmp_path):
    (tmp_path / "abseiling").mkdir()
    _clip(tmp_path / "abseiling" / "abc_000010_000020.mp4")
    _clip(tmp_path / "zumba_000001_000011.mp4")
    csv = tmp_path / "train.csv"
    csv.write_text("label,youtube_id,time_start,time_end,split\nabseiling,abc,10,20,train\n"
                   "zumba,zumba,1,11,train\nzumba,gone,0,10,train\n")
    with pytest.raises(FileNotFoundError, match=r"1 of 3 clips .* do not exist.*gone_000000_000010"):
        load_annotations("kinetics", csv, tmp_path)
    records, classes = load_annotations("kinetics", csv, tmp_path, skip_missing=True)
    assert classes == ["abseiling", "zumba"] and [r.label for r in records] == [0, 1]
    assert read_clip(records[0].path, lambda total: [0, total - 1]).shape == (2, 16, 16, 3)


def test_ssv2_json(tmp_path):
    _clip(tmp_path / "7.webm")
    labels = tmp_path / "labels.json"
    labels.write_text(json.dumps({"Moving something up": "1", "Pushing something from left to right": "0"}))
    train = tmp_path / "train.json"
    train.write_text(json.dumps([{"id": "7", "label": "moving a cup up", "template": "Moving [something] up",
                                  "placeholders": ["a cup"]}]))
    records, classes = load_annotations("ssv2", train, tmp_path, labels_file=labels)
    assert classes == ["Pushing something from left to right", "Moving something up"]
    assert records[0].label == 1 and records[0].path.endswith("7.webm")
    # WebM records no frame count: the reader decodes the clip to count it
    assert read_clip(records[0].path, lambda total: [total - 1] * 2).shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="labels_file"):
        load_annotations("ssv2", train, tmp_path)


def test_rawframe_list(tmp_path):
    from PIL import Image

    (tmp_path / "clip").mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "clip" / f"img_{i:05d}.jpg")
    (tmp_path / "list.txt").write_text("clip 3 1\n")
    records, classes = load_annotations("list", tmp_path / "list.txt", tmp_path)
    assert classes == ["0", "1"] and records[0].label == 1
    frames = read_clip(records[0].path, lambda total: [2, 0, 2])
    assert frames.shape == (3, 8, 8, 3) and abs(int(frames[0, 0, 0, 0]) - 80) <= 2


@pytest.mark.parametrize(
    "fmt, content, match",
    [
        ("list", "a.mp4\n", "expected 'path label'"),
        ("list", "missing.mp4 0\n", "1 of 1 clips .* do not exist"),
        ("avi", "", "format must be one of list, kinetics, ssv2"),
        ("kinetics", "name,id\nx,y\n", "needs the columns"),
    ],
)
def test_bad_annotations(tmp_path, fmt, content, match):
    annotation = tmp_path / "annotations.txt"
    annotation.write_text(content)
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        load_annotations(fmt, annotation, tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_annotations("list", tmp_path / "nothing.txt", tmp_path)


def test_cli_train_eval_visualize_round_trip(synthetic, tmp_path, capsys):
    out = tmp_path / "run"
    common = ["--root", str(synthetic), "--labels-file", str(synthetic / "classes.txt")]
    tiny = ("img_size=32", "patch_size=8", "embed_dim=32", "depth=2", "num_heads=2")
    backbone = [f"--backbone-arg={kv}" for kv in tiny]
    # the recipe options too: RandAugment, random erasing, label smoothing, validation on 2 clips × 3 crops
    args = ["train", "--train-list", str(synthetic / "train.txt"), "--val-list", str(synthetic / "val.txt"),
            *common, "--backbone", "vit_tiny_patch16_224", "--random-init", *backbone, "--variant", "aligned",
            "--aligner-dim", "24", "--tpm", "tcn", "--adapter-dim", "8", "--num-frames", "4", "--rand-augment", "m7-n4",
            "--random-erasing", "0.25", "--label-smoothing", "0.1", "--val-clips", "2", "--val-crops", "3",
            "--batch-size", "4", "--workers", "0", "--out", str(out), "--no-progress"]
    assert main([*args, "--epochs", "2"]) == 0
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2 and {"top1", "top5", "confusion", "train_loss"} <= set(json.loads(lines[-1]))
    assert (out / "best.pt").is_file() and (out / "last.pt").is_file()
    assert main([*args, "--epochs", "3", "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3
    metrics = tmp_path / "eval.json"
    assert main(["eval", str(out / "best.pt"), "--clips", "2", "--crops", "3", "--workers", "0", "--no-progress",
                 "--backend", "reference", "--json", str(metrics)]) == 0
    result = json.loads(metrics.read_text())
    classes = len(TASKS["which"])
    assert result["clips"] == classes and len(result["confusion"]) == classes
    assert "confusion matrix" in capsys.readouterr().out
    png = tmp_path / "flow.png"
    assert main(["visualize", str(out / "best.pt"), str(synthetic / "videos/val/00000.mp4"), "--out", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from amflow_models.engine import load_checkpoint  # needs tqdm, checked above

    model, _ = load_checkpoint(out / "best.pt")
    clips = [(f"clip {i}", read_clip(synthetic / f"videos/val/0000{i}.mp4", range)) for i in range(2)]
    overlay = overlay_flow(model, clips, tmp_path / "overlay.png", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3,
                           blocks=[2])
    assert overlay.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match=r"blocks \[3\] have no AM flow; the model's flow blocks are \(1, 2\)"):
        overlay_flow(model, clips, tmp_path / "bad.png", image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3, blocks=[3])


def test_demo_summary_is_mean_and_sample_std_over_seeds():
    """Three seeds' runs → mean and sample standard deviation, per metric and per epoch."""
    runs = {"static": {"vanilla": [
        {"best_top1": 0.5, "best_top5": 1.0, "final_top1": 0.4, "val_top1_per_epoch": [0.2, 0.5]},
        {"best_top1": 0.7, "best_top5": 1.0, "final_top1": 0.7, "val_top1_per_epoch": [0.3, 0.7]},
        {"best_top1": 0.9, "best_top5": 1.0, "final_top1": 0.7, "val_top1_per_epoch": [0.4, 0.9]},
    ]}}
    row = summarise_runs(runs)["static"]["vanilla"]
    assert row["best_top1"] == pytest.approx({"mean": 0.7, "std": 0.2, "n": 3})  # sqrt((0.04 + 0 + 0.04) / 2)
    assert row["final_top1"] == pytest.approx({"mean": 0.6, "std": 0.3 / 3 ** 0.5, "n": 3})
    assert row["best_top5"] == {"mean": 1.0, "std": 0.0, "n": 3}
    assert [epoch["mean"] for epoch in row["val_top1_per_epoch"]] == pytest.approx([0.3, 0.7])
    assert [epoch["std"] for epoch in row["val_top1_per_epoch"]] == pytest.approx([0.1, 0.2])
    assert summarise([0.25]) == {"mean": 0.25, "std": 0.0, "n": 1}


def test_demo_options_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--variants", "vanilla,optical-flow"])
    assert "expected comma-separated names of none, vanilla" in capsys.readouterr().err
    args = build_parser().parse_args(["demo", "--cameras", "panning", "--variants", "none, flow-only", "--seeds", "3"])
    assert (args.cameras, args.variants, args.seeds) == (["panning"], ["none", "flow-only"], 3)
    with pytest.raises(ValueError, match=r"seeds ≥ 1.*seeds=0"):
        run_demo(tmp_path, seeds=0)
    assert variant_config("flow-only", "panning", "clip") == {"variant": "aligned", "flow_only": True,
                                                                "flow_norm": "clip"}
    assert variant_config("vanilla-raw", "static", "clip") == {"variant": "vanilla", "flow_norm": "none"}


def test_cli_reports_bad_input(tmp_path, capsys):
    assert main(["eval", str(tmp_path / "nothing.pt")]) == 2
    assert "checkpoint" in capsys.readouterr().err
    # no weights named: refused before anything loads, naming the three ways to say what to start from
    assert main(["train", "--train-list", "a", "--val-list", "b", "--out", str(tmp_path)]) == 2
    error = capsys.readouterr().err
    assert "'vit_base_patch14_dinov2.lvd142m' would start from random weights" in error
    assert "--pretrained" in error and "--checkpoint-path" in error and "--random-init" in error
    with pytest.raises(SystemExit):
        main(["train", "--train-list", "a", "--val-list", "b", "--out", "c", "--tpm", "gru"])


def test_every_cli_option_says_what_it_does_and_its_default():
    """`amflow <command> --help` describes every argument, and every default that is a value."""
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name, command in commands.choices.items():
        for action in command._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            flag = f"amflow {name} {action.option_strings or action.dest}"
            assert action.help, f"{flag} has no help text"
            if action.default not in (None, False, []) and action.default is not argparse.SUPPRESS:
                assert "default" in action.help, f"{flag} does not state its default {action.default!r}"


def test_evaluate_on_a_hand_computed_case():
    """Six clips of 3 classes, labels 0 0 0 0 1 2, predicted 0 0 0 1 1 0, and one unreadable
    clip: top-1 4/6, per-class recalls 3/4, 1, 0 → mean per-class accuracy 7/12."""
    from amflow_models.engine import evaluate

    class Fixed(torch.nn.Module):
        num_classes = 3

        def forward(self, video):
            predicted = torch.tensor([0, 0, 0, 1, 1, 0])[video[:, 0, 0, 0, 0].long()]
            return torch.nn.functional.one_hot(predicted, 3).float() * 5

    labels = [0, 0, 0, 0, 1, 2]
    batches = [
        {"video": torch.arange(first, first + 3).float().view(3, 1, 1, 1, 1),
         "label": torch.tensor(labels[first:first + 3]), "index": torch.arange(first, first + 3),
         "failed": [], "unscorable": []}
        for first in (0, 3)
    ]
    batches.append({"video": None, "label": torch.zeros(0, dtype=torch.long), "index": torch.zeros(0, dtype=torch.long),
                    "failed": [("gone.mp4", "cannot decode video 'gone.mp4'")], "unscorable": [6]})
    metrics = evaluate(Fixed(), batches)
    assert metrics["top1"] == 4 / 6 and metrics["top5"] == 1.0 and metrics["clips"] == 6
    assert metrics["mean_class_accuracy"] == pytest.approx(7 / 12)
    assert metrics["confusion"] == [[3, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert metrics["unscorable"] == [{"path": "gone.mp4", "reason": "cannot decode video 'gone.mp4'"}]
