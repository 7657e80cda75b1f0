"""Reading and writing clips: video files through PyAV (FFmpeg), folders of frames through Pillow.

Frames are ``uint8`` tensors ``(T, H, W, 3)`` (RGB). A clip that exists but cannot be decoded
raises :class:`ClipReadError`, whatever library failed on it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class ClipReadError(RuntimeError):
    """A video file or frame that exists but cannot be decoded (truncated, corrupt, not a video)."""


def frame_files(folder: str | Path) -> list[Path]:
    """The images of a folder of frames, in name order (``img_00001.jpg``, …)."""
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"frame folder {str(folder)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def read_clip(path: str | Path, pick: Callable[[int], Sequence[int]]) -> torch.Tensor:
    """Frames ``pick(total)`` of the video file or frame folder at ``path``; ``pick`` receives the
    number of frames and returns the indices to keep (repeats allowed)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"clip {str(path)!r} does not exist")
    if path.is_dir():
        files = frame_files(path)
        indices = list(pick(len(files)))
        from PIL import Image

        try:
            loaded = {i: np.asarray(Image.open(files[i]).convert("RGB")) for i in sorted(set(indices))}
            return torch.from_numpy(np.stack([loaded[i] for i in indices]))
        except (OSError, ValueError) as error:  # PIL: unidentified or truncated image; np: mixed sizes
            raise ClipReadError(f"cannot decode frames of {str(path)!r}: {error}") from error
    return _read_video(path, pick)


def _read_video(path: Path, pick: Callable[[int], Sequence[int]]) -> torch.Tensor:
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            total = stream.frames  # 0 where the container does not record it (e.g. WebM)
            if total > 0:
                indices = list(pick(total))
                wanted, stop, kept = set(indices), max(indices), {}
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        kept[i] = frame.to_ndarray(format="rgb24")
                    if i >= stop:
                        break
                if not kept:
                    raise ClipReadError(f"video {str(path)!r} has no decodable frames")
                # a header's count can exceed what decodes: such indices get the last decoded frame
                last = kept[max(kept)]
                frames = [kept.get(i, last) for i in indices]
            else:
                decoded = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
                if not decoded:
                    raise ClipReadError(f"video {str(path)!r} has no decodable frames")
                frames = [decoded[i] for i in pick(len(decoded))]
    except av.error.FFmpegError as error:
        raise ClipReadError(f"cannot decode video {str(path)!r}: {error}") from error
    return torch.from_numpy(np.stack(frames))


def write_video(path: str | Path, frames: torch.Tensor | np.ndarray, fps: int = 8, crf: int = 12) -> None:
    """Write ``uint8`` frames ``(T, H, W, 3)`` (even H and W), yuv420p: VP9 for ``.webm`` (as
    SSv2 ships), H.264 (``libx264``) otherwise."""
    import av

    frames = np.asarray(frames, dtype=np.uint8)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"write_video: frames must be (T, H, W, 3) with even H and W, got {frames.shape}")
    with av.open(str(path), mode="w") as container:
        webm = Path(path).suffix.lower() == ".webm"
        stream = container.add_stream("libvpx-vp9" if webm else "libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": str(crf), "b": "0"} if webm else {"crf": str(crf), "preset": "medium"}
        for image in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        container.mux(stream.encode())
