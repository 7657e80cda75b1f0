"""A synthetic motion dataset whose classes no single frame can tell apart, in two camera settings.

Two tasks:

- ``which`` (the demo's): three shapes (a reddish "L", a greenish "T" and a bluish "U") on a
  textured background; one of them moves, the others stand still. The class is *which* shape moves and
  *how*: it slides (in a random direction) or turns in place,

      L slides · L turns · T slides · T turns · U slides · U turns.

  This is the claim AM flow makes: it marks *where* the motion is. Every frame holds all three
  shapes at random places, sizes and angles, so no single frame tells the class.
- ``direction``: one shape, the class is *how* it moves (left, right, up, down, turning left,
  turning right). AM flow is a per-token magnitude of change; the direction has to be read from
  how that magnitude moves over the tokens, the hardest case for the method.

Two cameras, as in the papers' two settings: ``static`` (SSv2, Toyota Smarthome: vanilla AM
flow) and ``panning`` (Kinetics: the aligning encoder): the whole scene, background and still
shapes with it, pans at a random velocity, so every token changes and only motion relative to
the scene is the class. The scene wraps around the frame edges (a torus). With ``size`` 48 and
the demo's patch of 8 pixels, a shape covers about 2 × 2 patches and a sliding shape crosses at
least one patch boundary per clip.

Each frame also gets a label of a single-frame task, the one the image model is pretrained on
(it learns to find a shape and tell it from the others, never how it moves): the 3 × 3 cell that
holds the L (``which``) or the shape (``direction``). Mirroring a clip turns "left" into
"right" (the training flip swaps those labels); the ``which`` classes have no mirror pairs.

Clips are written as H.264 files, so the dataset is read back by the same reader as real data.
They are lossless (crf 0): libx264's lossy decisions differ from run to run on identical input,
which made the decoded clips, and every result trained on them, differ between runs of the
same seed; losslessly coded, the decoded frames are bitwise reproducible.
Generation is deterministic in ``seed``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from .video_io import write_video

SHAPES = ("L", "T", "U")
TASKS = {
    "which": tuple(f"{shape} {motion}" for shape in SHAPES for motion in ("slides", "turns")),
    "direction": ("moving left", "moving right", "moving up", "moving down", "turning left", "turning right"),
}
CELLS = tuple(f"{row} {column}" for row in ("top", "middle", "bottom") for column in ("left", "centre", "right"))
CAMERAS = ("static", "panning")
_VELOCITY = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}  # (dy, dx) per direction class, y pointing down


def _shape_mask(shape: int, grid: np.ndarray, half_size: float, angle: float) -> np.ndarray:
    """Soft mask of ``SHAPES[shape]`` of half-extent ``half_size`` pixels, rotated by ``angle``
    (counter-clockwise on screen), centred on the grid's origin; grid is (2, S, S) of (y, x)."""
    cos, sin = math.cos(angle), math.sin(angle)
    y, x = grid
    u = (cos * x - sin * y) / half_size   # the shape's own frame (screen rotation undone)
    v = (sin * x + cos * y) / half_size
    inside = (np.abs(u) <= 1) & (np.abs(v) <= 1)
    if SHAPES[shape] == "L":
        parts = (u <= -0.4) | (v >= 0.4)
    elif SHAPES[shape] == "T":
        parts = (v <= -0.4) | (np.abs(u) <= 0.3)
    else:
        parts = (np.abs(u) >= 0.4) | (v >= 0.4)
    return (inside & parts).astype(np.float32)


def _periodic_texture(rng: np.random.Generator, size: int, cutoff: float) -> np.ndarray:
    """Smooth RGB noise in [0, 1] that tiles seamlessly (low-passed white noise)."""
    frequencies = np.fft.fftfreq(size)
    radius = np.hypot(*np.meshgrid(frequencies, frequencies, indexing="ij"))
    texture = np.stack([
        np.real(np.fft.ifft2(np.fft.fft2(rng.standard_normal((size, size))) * (radius < cutoff)))
        for _ in range(3)
    ], axis=-1)
    texture -= texture.min()
    return texture / max(texture.max(), 1e-8)


def _colour(rng: np.random.Generator, channel: int | None = None) -> np.ndarray:
    """One saturated channel (visible on any background): ``channel``, or a random one."""
    colour = rng.uniform(0.0, 0.4, 3)
    colour[rng.integers(3) if channel is None else channel] = 1.0
    return colour


def _spin(rng: np.random.Generator) -> float:
    """Radians per frame of a turning shape: 20°–40°."""
    return math.radians(rng.uniform(20, 40))


def _plan_which(label: int, rng: np.random.Generator, num_frames: int, size: int) -> list[dict]:
    """The three shapes of a ``which`` clip: start centres apart and inside the frame, the
    moving one's per-frame velocity (it stays inside the frame) or spin."""
    scale = size / 32
    margin = 6.0 * scale
    while True:
        centres = rng.uniform(margin, size - margin, (3, 2))
        gaps = [np.hypot(*(centres[i] - centres[j])) for i in range(3) for j in range(i)]
        if min(gaps) >= 10.0 * scale:
            break
    mover, turns = divmod(label, 2)
    shapes = []
    for shape in range(3):
        plan = {"shape": shape, "centre": centres[shape], "half_size": rng.uniform(3.5, 4.5) * scale,
                "angle": rng.uniform(0, 2 * math.pi), "colour": _colour(rng, shape),
                "velocity": np.zeros(2), "spin": 0.0}
        shapes.append(plan)
    moving = shapes[mover]
    if turns:
        moving["spin"] = _spin(rng) * rng.choice((-1, 1))
    else:
        while True:
            heading = rng.uniform(0, 2 * math.pi)
            velocity = np.array([math.sin(heading), math.cos(heading)]) * rng.uniform(1.0, 2.0) * scale
            end = moving["centre"] + velocity * (num_frames - 1)
            if ((end >= margin) & (end <= size - margin)).all():
                break
        moving["velocity"] = velocity
    # the moving shape drawn last, on top of the still ones
    return sorted(shapes, key=lambda plan: plan["shape"] == mover)


def _plan_direction(label: int, rng: np.random.Generator, num_frames: int, size: int) -> list[dict]:
    """The one shape of a ``direction`` clip: anywhere (the scene wraps), moving or turning."""
    scale = size / 32
    speed = rng.uniform(1.5, 3.0) * scale
    return [{"shape": int(rng.integers(len(SHAPES))), "half_size": rng.uniform(5.0, 7.0) * scale,
             "centre": rng.uniform(0, size, 2), "angle": rng.uniform(0, 2 * math.pi), "colour": _colour(rng),
             "velocity": np.array(_VELOCITY.get(label, (0, 0)), dtype=np.float64) * speed,
             "spin": _spin(rng) * (1 if label == 4 else -1) if label >= 4 else 0.0}]


def _frame_label(centre: np.ndarray, size: int) -> int:
    """The single-frame label: the 3 × 3 cell that holds ``centre`` (y, x)."""
    row, column = (centre * 3) // size
    return int(3 * row + column)


def _check_options(task: str, camera: str) -> None:
    if task not in TASKS or camera not in CAMERAS:
        raise ValueError(f"task must be one of {', '.join(TASKS)} and camera one of {', '.join(CAMERAS)}, "
                         f"got task={task!r}, camera={camera!r}")


def render_clip(label: int, rng: np.random.Generator, *, num_frames: int, size: int, task: str = "which",
                camera: str = "static", return_track: bool = False) -> tuple[np.ndarray, ...]:
    """``uint8`` frames ``(T, size, size, 3)`` of one clip of class ``label`` of ``task``, and
    the single-frame label of every frame ``(T,)``; with ``return_track``, also the track of the
    shape that moves (``which``) or the only shape (``direction``): its centre ``(y, x)`` in
    pixels in every frame ``(T, 2)``, camera motion included."""
    _check_options(task, camera)
    if not 0 <= label < len(TASKS[task]):
        raise ValueError(f"label must be in 0..{len(TASKS[task]) - 1} for task {task!r}, got {label}")
    scale = size / 32
    background = 0.25 + 0.5 * _periodic_texture(rng, size, cutoff=0.15)
    shapes = (_plan_which if task == "which" else _plan_direction)(label, rng, num_frames, size)
    camera_velocity = rng.uniform(-1.5, 1.5, 2) * scale if camera == "panning" else np.zeros(2)
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")).astype(np.float32) - size // 2
    frames, labels, track = [], [], []
    for t in range(num_frames):
        pan = camera_velocity * t
        frame = np.roll(background, tuple(np.rint(pan).astype(int)), axis=(0, 1))
        for plan in shapes:
            mask = _shape_mask(plan["shape"], grid, plan["half_size"], plan["angle"] + plan["spin"] * t)
            centre = np.rint(plan["centre"] + plan["velocity"] * t + pan).astype(int) % size
            mask = np.roll(mask, tuple(centre - size // 2), axis=(0, 1))[..., None]
            frame = frame * (1 - mask) + plan["colour"] * mask
            if plan["shape"] == 0 or task == "direction":
                label_centre = centre  # the L's (or the only shape's)
        track.append(centre)  # the moving shape is drawn last
        frame = frame + rng.normal(0, 0.02, frame.shape)
        frames.append(np.clip(frame * 255, 0, 255).astype(np.uint8))
        labels.append(_frame_label(label_centre, size))
    if return_track:
        return np.stack(frames), np.array(labels), np.stack(track)
    return np.stack(frames), np.array(labels)


SPLITS = ("train", "val")


def _clip_class(index: int, task: str) -> int:
    """The class of clip ``index`` of a split: the classes in turn."""
    return index % len(TASKS[task])


def dataset_clip(split: str, index: int, *, seed: int, num_frames: int, size: int, task: str = "which",
                 camera: str = "static", return_track: bool = False) -> tuple[np.ndarray, ...]:
    """``render_clip`` of clip ``index`` of ``split`` (class ``index`` mod the classes), the very
    clip ``generate_synthetic(seed=seed, ...)`` writes as ``videos/{split}/{index:05d}.mp4``."""
    _check_options(task, camera)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    return render_clip(_clip_class(index, task), np.random.default_rng([seed, SPLITS.index(split), index]),
                       num_frames=num_frames, size=size, task=task, camera=camera, return_track=return_track)


def generate_synthetic(
    root: str | Path, *, train_per_class: int = 100, val_per_class: int = 30, num_frames: int = 8,
    size: int = 48, task: str = "which", camera: str = "static", image_train: int = 6000, image_val: int = 720,
    seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` and return it:

    - ``videos/{train,val}/{index:05d}.mp4`` and the mmaction-style lists ``train.txt`` and
      ``val.txt`` (``path label``) with ``classes.txt``: the video task;
    - ``frames/{train,val}/{index:05d}/img_00000.png``, ``image_train`` and ``image_val`` single
      frames of scenes of their own (a clip's frames are near-copies of one scene, too few
      scenes for an image model to generalise from), and the rawframe lists
      ``frames_train.txt``/``frames_val.txt`` (``folder 1 label``) with ``frame_classes.txt``:
      the single-frame task the image model is pretrained on.
    """
    from PIL import Image

    _check_options(task, camera)
    if size % 2 or size < 24 or num_frames < 2:
        raise ValueError(f"size must be even and ≥ 24, and num_frames ≥ 2, got size={size}, num_frames={num_frames}")
    classes = TASKS[task]
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "frame_classes.txt").write_text("\n".join(CELLS) + "\n")
    for split_id, (split, per_class, frames) in enumerate(zip(SPLITS, (train_per_class, val_per_class),
                                                               (image_train, image_val))):
        (root / "videos" / split).mkdir(parents=True, exist_ok=True)
        lines = []
        for index in range(per_class * len(classes)):
            clip, _ = dataset_clip(split, index, seed=seed, num_frames=num_frames, size=size, task=task,
                                   camera=camera)
            video = f"videos/{split}/{index:05d}.mp4"
            write_video(root / video, clip, crf=0)
            lines.append(f"{video} {_clip_class(index, task)}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        frame_lines = []
        for index in range(frames):
            frame, frame_label = render_clip(index % len(classes), np.random.default_rng([seed, 2 + split_id, index]),
                                             num_frames=1, size=size, task=task, camera=camera)
            folder = f"frames/{split}/{index:05d}"
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray(frame[0]).save(root / folder / "img_00000.png")
            frame_lines.append(f"{folder} 1 {frame_label[0]}")
        (root / f"frames_{split}.txt").write_text("\n".join(frame_lines) + "\n")
    return root
