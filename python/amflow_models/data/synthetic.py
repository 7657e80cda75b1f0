"""A synthetic motion dataset whose classes no single frame can tell apart.

Each clip shows one textured shape (an "L", "T" or "U") on a textured background. The class
is how the shape moves relative to the background:

    moving left · moving right · moving up · moving down · turning left · turning right

Everything wraps around the frame edges (a torus), and the start position, orientation, size,
speed, colours and textures are drawn at random, so every single frame has the same
distribution whatever the class: only the change between frames tells the class. With
``camera_motion`` the whole scene also pans at a random velocity (a moving camera), so the
shape's motion in the image is its own plus the camera's and only its motion relative to the
background is the class. Mirroring a clip turns "left" into "right" (the training flip swaps
those labels). Where the shape is in a frame (a 3 × 3 grid of cells) is the single-frame task
the image model is pretrained on: it learns to find the shape, not how it moves.

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

CLASSES = ("moving left", "moving right", "moving up", "moving down", "turning left", "turning right")
SHAPES = ("L", "T", "U")
POSITIONS = tuple(f"{row} {column}" for row in ("top", "middle", "bottom") for column in ("left", "centre", "right"))
_VELOCITY = {0: (0, -1), 1: (0, 1), 2: (-1, 0), 3: (1, 0)}  # (dy, dx) per class, y pointing down


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


def render_clip(label: int, rng: np.random.Generator, *, num_frames: int, size: int,
                camera_motion: bool) -> tuple[np.ndarray, np.ndarray]:
    """``uint8`` frames ``(T, size, size, 3)`` of one clip of class ``label``, and the shape's
    centre in every frame ``(T, 2)`` as (y, x) pixels."""
    scale = size / 32
    background = 0.25 + 0.5 * _periodic_texture(rng, size, cutoff=0.15)
    colour = rng.uniform(0.0, 0.4, 3)
    colour[rng.integers(3)] = 1.0                  # one saturated channel: visible on any background
    shape = int(rng.integers(len(SHAPES)))
    half_size = rng.uniform(5.0, 7.0) * scale
    position = rng.uniform(0, size, 2)
    angle = rng.uniform(0, 2 * math.pi)
    speed = rng.uniform(1.5, 3.0) * scale
    spin = math.radians(rng.uniform(20, 40)) * (1 if label == 4 else -1)  # turning left: counter-clockwise
    camera = rng.uniform(-1.5, 1.5, 2) * scale if camera_motion else np.zeros(2)
    own = np.array(_VELOCITY.get(label, (0, 0)), dtype=np.float64) * speed
    grid = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij")).astype(np.float32) - size // 2
    frames, centres = [], []
    for t in range(num_frames):
        pan = np.rint(camera * t).astype(int)
        scene = np.roll(background, tuple(pan), axis=(0, 1))
        rotation = angle + (spin * t if label >= 4 else 0.0)
        mask = _shape_mask(shape, grid, half_size, rotation)
        centre = np.rint(position + own * t + camera * t).astype(int) % size
        mask = np.roll(mask, tuple(centre - size // 2), axis=(0, 1))[..., None]
        frame = scene * (1 - mask) + colour * mask + rng.normal(0, 0.02, scene.shape)
        frames.append(np.clip(frame * 255, 0, 255).astype(np.uint8))
        centres.append(centre)
    return np.stack(frames), np.stack(centres)


def generate_synthetic(
    root: str | Path, *, train_per_class: int = 100, val_per_class: int = 30, num_frames: int = 8,
    size: int = 32, camera_motion: bool = True, seed: int = 0,
) -> Path:
    """Write the dataset under ``root`` and return it:

    - ``videos/{train,val}/{index:05d}.mp4`` and the mmaction-style lists ``train.txt`` and
      ``val.txt`` (``path label``) with ``classes.txt``: the video task;
    - ``frames/{train,val}/{index:05d}_{t:02d}/img_00000.png``, every frame on its own, and the
      rawframe lists ``frames_train.txt``/``frames_val.txt`` (``folder 1 cell``) with
      ``positions.txt``: where the shape is (a 3 × 3 grid of cells), the single-frame task the
      image model is pretrained on.
    """
    from PIL import Image

    if size % 2 or size < 24 or num_frames < 2:
        raise ValueError(f"size must be even and ≥ 24, and num_frames ≥ 2, got size={size}, num_frames={num_frames}")
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "classes.txt").write_text("\n".join(CLASSES) + "\n")
    (root / "positions.txt").write_text("\n".join(POSITIONS) + "\n")
    for split_id, (split, per_class) in enumerate((("train", train_per_class), ("val", val_per_class))):
        (root / "videos" / split).mkdir(parents=True, exist_ok=True)
        lines, frame_lines = [], []
        for index in range(per_class * len(CLASSES)):
            rng = np.random.default_rng([seed, split_id, index])
            label = index % len(CLASSES)
            frames, centres = render_clip(label, rng, num_frames=num_frames, size=size, camera_motion=camera_motion)
            video = f"videos/{split}/{index:05d}.mp4"
            write_video(root / video, frames, crf=0)
            lines.append(f"{video} {label}")
            for t in range(num_frames):
                folder = f"frames/{split}/{index:05d}_{t:02d}"
                (root / folder).mkdir(parents=True, exist_ok=True)
                Image.fromarray(frames[t]).save(root / folder / "img_00000.png")
                row, column = (centres[t] * 3) // size
                frame_lines.append(f"{folder} 1 {3 * row + column}")
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
        (root / f"frames_{split}.txt").write_text("\n".join(frame_lines) + "\n")
    return root
