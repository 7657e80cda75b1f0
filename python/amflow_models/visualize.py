"""AM flow as pictures.

- ``visualize_flow`` (Figure 5 of the AM Flow paper): per block, the flow channels of every
  patch reduced to three by PCA and shown as RGB, one row per block, beside the input frames.
- ``overlay_flow`` (the demo's): for a few clips, each frame with the flow of a few blocks
  (the mean over its channels, upsampled from the patch grid) laid over it as a heat map, so
  the flow can be seen following what moves.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .data.dataset import resize_short_side, spatial_crops


def flow_to_rgb(flow: torch.Tensor) -> torch.Tensor:
    """``(..., F)`` flow features → ``(..., 3)`` in [0, 1]: the first three principal components
    over all positions, each scaled to its range (fewer than three channels are repeated)."""
    samples = flow.reshape(-1, flow.shape[-1]).double()
    samples = samples - samples.mean(0)
    if samples.shape[1] >= 3:
        _, _, v = torch.linalg.svd(samples, full_matrices=False)
        samples = samples @ v[:3].T
    else:
        samples = samples[:, [i % samples.shape[1] for i in range(3)]]
    low, high = samples.min(0).values, samples.max(0).values
    rgb = (samples - low) / (high - low).clamp_min(1e-12)
    return rgb.reshape(*flow.shape[:-1], 3).float()


def patch_flows(model: torch.nn.Module, frames: torch.Tensor, image_size: int, mean, std):
    """(frames shown ``(T, 3, S, S)``, ``{block: flow (T−Δ, grid_h, grid_w, F)}``) for one clip."""
    if not getattr(model, "flow_blocks", ()):
        raise ValueError(f"the model has no AM flow to show ({type(model).__name__} without flow blocks); "
                         f"use a vanilla or aligned AM flow model")
    shown, video = prepare_clip(frames, image_size, mean, std)
    model.eval()
    device = next(model.parameters()).device
    _, flows = model(video.to(device), return_flows=True)
    backbone = model.backbone
    grid = tuple(backbone.patch_embed.grid_size)
    pairs = shown.shape[0] - model.offset
    patches = {block: flow[0, :pairs, backbone.num_prefix_tokens:].float().cpu().unflatten(1, grid)
               for block, flow in sorted(flows.items())}
    return shown, patches


def prepare_clip(frames: torch.Tensor, image_size: int, mean, std) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 ``(T, H, W, 3)`` → (the centre-cropped frames in [0, 1] ``(T, 3, S, S)``, the
    normalised model input ``(1, T, 3, S, S)``)."""
    video = frames.permute(0, 3, 1, 2).float().div(255)
    shown = spatial_crops(resize_short_side(video, image_size), image_size, 1)[0]
    mean = torch.tensor(mean).view(1, 3, 1, 1)
    std = torch.tensor(std).view(1, 3, 1, 1)
    return shown, ((shown - mean) / std)[None]


@torch.no_grad()
def visualize_flow(model: torch.nn.Module, frames: torch.Tensor, out_file: str | Path, *, image_size: int,
                   mean, std, title: str | None = None) -> Path:
    """Write the PNG for one clip (uint8 frames ``(T, H, W, 3)``) and return its path."""
    plt = pyplot()
    shown, flows = patch_flows(model, frames, image_size, mean, std)
    pairs = shown.shape[0] - model.offset
    rows = 1 + len(flows)
    figure, axes = plt.subplots(rows, pairs, figsize=(1.6 * pairs, 1.6 * rows), squeeze=False)
    for t in range(pairs):
        axes[0, t].imshow(shown[t].permute(1, 2, 0).clamp(0, 1).numpy())
        axes[0, t].set_title(f"t={t}", fontsize=8)
    for row, (block, flow) in enumerate(flows.items(), start=1):
        rgb = flow_to_rgb(flow)
        for t in range(pairs):
            axes[row, t].imshow(rgb[t].numpy(), interpolation="nearest")
        axes[row, 0].set_ylabel(f"block {block}", fontsize=8)
    return _save(figure, axes, title or f"AM flow ({model.flow_kind}) between frames t and t+{model.offset}",
                 out_file, fontsize=9, dpi=120)


@torch.no_grad()
def overlay_flow(model: torch.nn.Module, clips: list[tuple[str, torch.Tensor]], out_file: str | Path, *,
                 image_size: int, mean, std, blocks=None, title: str | None = None) -> Path:
    """Write a PNG with, for each ``(name, uint8 frames (T, H, W, 3))`` of ``clips``, one row per
    block of ``blocks`` (default: every flow block): frame t with the flow between t and t+Δ
    (mean over channels, bilinearly upsampled) as a heat map. Each clip's colour scale runs from
    its median to its largest value over frames and shown blocks (below the median is dark), so
    within a clip colours compare and a few low outliers cannot wash it out; return the path."""
    plt = pyplot()
    blocks = tuple(blocks or getattr(model, "flow_blocks", ()))
    missing = sorted(set(blocks) - set(getattr(model, "flow_blocks", ())))
    if missing:
        raise ValueError(f"overlay_flow: blocks {missing} have no AM flow; the model's flow blocks are "
                         f"{tuple(getattr(model, 'flow_blocks', ()))}")
    rows = []
    for name, frames in clips:
        shown, flows = patch_flows(model, frames, image_size, mean, std)
        heat = torch.stack([flows[block].mean(-1) for block in blocks])  # (blocks, T−Δ, gh, gw)
        heat = torch.nn.functional.interpolate(heat, size=shown.shape[-2:], mode="bilinear", align_corners=False)
        floor = heat.median()  # the typical token: what is brighter stands out
        heat = ((heat - floor) / (heat.max() - floor).clamp_min(1e-12)).clamp_min(0)
        rows += [(name, block, shown, heat[i]) for i, block in enumerate(blocks)]
    pairs = rows[0][3].shape[0]
    figure, axes = plt.subplots(len(rows), pairs, figsize=(1.1 * pairs, 1.15 * len(rows)), squeeze=False)
    for row, (name, block, shown, heat) in enumerate(rows):
        for t in range(pairs):
            axes[row, t].imshow(shown[t].permute(1, 2, 0).clamp(0, 1).numpy())
            axes[row, t].imshow(heat[t].numpy(), cmap="inferno", alpha=0.55, vmin=0, vmax=1)
        axes[row, 0].set_ylabel(f"{name}\nblock {block}", fontsize=6)
    for t in range(pairs):
        axes[0, t].set_title(f"t={t}→{t + model.offset}", fontsize=6)
    return _save(figure, axes, title or f"AM flow ({model.flow_kind}) over the frames: bright = large flow",
                 out_file, fontsize=8, dpi=110)


def pyplot():
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, axes, title: str, out_file: str | Path, *, fontsize: int, dpi: int) -> Path:
    """Strip the panels' ticks, title the figure, write it to ``out_file`` and close it."""
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle(title, fontsize=fontsize)
    figure.tight_layout()
    out_file = Path(out_file)
    figure.savefig(out_file, dpi=dpi)
    pyplot().close(figure)
    return out_file
