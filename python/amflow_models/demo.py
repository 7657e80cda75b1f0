"""The end-to-end demo: synthetic motion data → an image model → video models, compared over
seeds, in the papers' two camera settings.

For every seed:

1. Generate the synthetic set (``data/synthetic.py``) for each camera setting: ``static`` and
   ``panning``. By default the task is ``which``: three shapes, one moves; the class is which
   one and how (slides or turns), so what matters is *where* the motion is.
2. Pretrain a tiny ViT (48 px frames, 8 px patches: a 6 × 6 token grid) on 6000 single frames
   of still scenes (where is the L?): the "image model", frozen from then on. One frame of
   either setting has the same distribution, so both settings share it. It never sees motion.
3. Train, on each setting, with the same data, epochs, batch size, learning rate and seed:
   adapters + TPMs without AM flow, with vanilla AM flow, with aligned AM flow, the flow-only
   diagnostic (the setting's own flow: vanilla for the static camera, aligned for the panning
   one, as in the papers) and the ZeroI2V baseline; on request also ``vanilla-raw``, vanilla
   AM flow at the scale the papers' eq. 6 concatenates it (the others standardise it per clip,
   ``flow_norm="clip"``, see ``flow.py``).

Then print mean ± standard deviation over seeds of the best and final validation top-1 and
the best top-5 per setting and variant, and write ``results.json`` (every run's numbers and
the summary), ``accuracy.png`` (validation top-1 per epoch, mean ± std over seeds) and
``flow_overlay_{camera}.png`` (seed 0's AM flow laid over a validation clip of each class).

``flow_peak_on_mover`` measures what the overlay shows: how often a trained model's AM flow
peaks on the moving shape, per block (``docs/demo/flow_on_mover.py`` runs it on a demo's
checkpoints).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from .build import ModelConfig, parameter_report
from .data.annotations import load_annotations
from .data.loader import DataConfig
from .data.synthetic import CAMERAS, CELLS, TASKS, generate_synthetic
from .data.video_io import read_clip
from .train_config import TrainConfig
from .visualize import overlay_flow, patch_flows, pyplot

CLIP_FRAMES = 8  # frames per synthetic clip, all of them sampled
TINY_VIT = dict(img_size=48, patch_size=8, embed_dim=64, depth=4, num_heads=4)
NORMALISE = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
SETTING_FLOW = {"static": "vanilla", "panning": "aligned"}  # the papers' AM flow for each camera
VARIANTS = {
    "none": "adapters + TPM, no AM flow",
    "vanilla": "+ vanilla AM flow",
    "vanilla-raw": "+ vanilla AM flow, unscaled",
    "aligned": "+ aligned AM flow",
    "flow-only": "AM flow alone (diagnostic)",
    "zeroi2v": "ZeroI2V baseline",
}
DEFAULT_VARIANTS = ("none", "vanilla", "aligned", "flow-only", "zeroi2v")


def variant_config(variant: str, camera: str, flow_norm: str) -> dict:
    """The ``ModelConfig`` fields of a demo variant in a camera setting: AM flow enters the
    adapters standardised per clip (``flow_norm``) except in ``vanilla-raw``, the papers' eq. 6
    as written (``flow_norm="none"``)."""
    if variant == "flow-only":
        return {"variant": SETTING_FLOW[camera], "flow_only": True, "flow_norm": flow_norm}
    if variant == "vanilla-raw":
        return {"variant": "vanilla", "flow_norm": "none"}
    return {"variant": variant, "flow_norm": flow_norm}


def summarise(values: list[float]) -> dict:
    """``{"mean", "std", "n"}`` of per-seed values; ``std`` is the sample standard deviation
    (``n − 1`` in the denominator), 0 for a single seed."""
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarise_runs(runs: dict) -> dict:
    """Per setting and variant: the mean ± std over seeds of best top-1, best top-5, final
    top-1 and the validation top-1 of every epoch."""
    summary = {}
    for camera, variants in runs.items():
        summary[camera] = {}
        for variant, seeds in variants.items():
            curves = [run["val_top1_per_epoch"] for run in seeds]
            summary[camera][variant] = {
                key: summarise([run[key] for run in seeds]) for key in ("best_top1", "best_top5", "final_top1")
            } | {"val_top1_per_epoch": [summarise(list(epoch)) for epoch in zip(*curves)]}
    return summary


def run_demo(
    out: str | Path = "amflow-demo", *, seeds: int = 1, cameras=CAMERAS, variants=DEFAULT_VARIANTS,
    task: str = "which", train_per_class: int = 60, val_per_class: int = 20, image_frames=(6000, 720),
    image_epochs: int = 10,
    epochs: int = 8, batch_size: int = 16, lr: float = 1e-2, tpm: str = "lstm", flow_norm: str = "clip",
    workers: int = 2, backend: str = "auto", progress: bool = True, log=print,
) -> dict:
    """Run the demo into folder ``out`` and return its results (also in ``out/results.json``)."""
    from .engine import fit, load_checkpoint, train_image_model  # needs tqdm; the CLI imports this module without

    cameras, variants = tuple(cameras), tuple(variants)
    unknown = sorted(set(cameras) - set(CAMERAS)) + sorted(set(variants) - set(VARIANTS))
    if unknown or not cameras or not variants or seeds < 1 or task not in TASKS:
        raise ValueError(f"run_demo: cameras must be among {CAMERAS}, variants among {tuple(VARIANTS)}, task one "
                         f"of {tuple(TASKS)} and seeds ≥ 1; got cameras={cameras}, variants={variants}, "
                         f"task={task!r}, seeds={seeds}")
    out = Path(out)
    began = time.perf_counter()
    runs = {camera: {variant: [] for variant in variants} for camera in cameras}
    image_top1 = []
    classes = TASKS[task]
    for seed in range(seeds):
        where = out / f"seed{seed}"
        log(f"[seed {seed + 1}/{seeds}] generating the synthetic sets ({', '.join(cameras)} camera) in {where}")
        roots = {}
        for camera in dict.fromkeys(("static", *cameras)):  # the image model's frames: the static set's
            image_train, image_val = image_frames if camera == "static" else (0, 0)
            roots[camera] = generate_synthetic(
                where / f"data-{camera}", train_per_class=train_per_class, val_per_class=val_per_class,
                num_frames=CLIP_FRAMES, size=TINY_VIT["img_size"], task=task, camera=camera, image_train=image_train,
                image_val=image_val, seed=seed,
            )
        log(f"[seed {seed + 1}/{seeds}] pretraining the image model on single frames: where is the "
            f"{'L' if task == 'which' else 'shape'}?")
        image_model = where / "image_model.pt"
        frames = _data_config(roots["static"], "frames_train.txt", "frames_val.txt", "frame_classes.txt", 1)
        image_top1.append(train_image_model("vit_tiny_patch16_224", TINY_VIT, frames, image_model,
                                            epochs=image_epochs, workers=workers, seed=seed, progress=progress,
                                            log=log)["top1"])
        for camera in cameras:
            data = _data_config(roots[camera], "train.txt", "val.txt", "classes.txt", CLIP_FRAMES)
            for variant in variants:
                log(f"[seed {seed + 1}/{seeds}] {camera} camera: {VARIANTS[variant]}")
                config = ModelConfig(
                    num_classes=len(classes), backbone="vit_tiny_patch16_224", checkpoint_path=str(image_model),
                    backbone_kwargs={**TINY_VIT, "num_classes": len(CELLS)}, tpm=tpm, adapter_dim=32,
                    aligner_dim=48, backend=backend, **variant_config(variant, camera, flow_norm),
                )
                run_dir = where / camera / variant
                result = fit(config, data, TrainConfig(epochs=epochs, batch_size=batch_size, lr=lr, seed=seed), run_dir,
                             workers=workers, progress=progress, log=log)
                model, _ = load_checkpoint(run_dir / "best.pt")
                report = parameter_report(model)["total"]
                runs[camera][variant].append({
                    "seed": seed, "best_top1": result["best"]["top1"], "best_top5": result["best"]["top5"],
                    "final_top1": result["history"][-1]["top1"], "trainable": report["trainable"],
                    "frozen": report["frozen"], "seconds": result["seconds"],
                    "val_top1_per_epoch": [h["top1"] for h in result["history"]],
                })
    log("writing the table, the accuracy plot and the AM flow overlay")
    results = {
        "chance": 1 / len(classes), "classes": list(classes), "image_model_frame_top1": summarise(image_top1),
        "variants": {variant: VARIANTS[variant] for variant in variants}, "summary": summarise_runs(runs),
        "runs": runs,
        "settings": {"seeds": seeds, "cameras": list(cameras), "task": task, "train_per_class": train_per_class,
                     "val_per_class": val_per_class, "epochs": epochs, "image_frames": list(image_frames),
                     "image_epochs": image_epochs, "batch_size": batch_size, "lr": lr, "tpm": tpm,
                     "flow_norm": flow_norm, "backbone": TINY_VIT, "setting_flow": SETTING_FLOW},
        "seconds": time.perf_counter() - began,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot_accuracy(results, out / "accuracy.png")
    pictures = _overlay(out, cameras, variants, task)
    log(format_table(results))
    log(f"wrote {out / 'results.json'}, {out / 'accuracy.png'}{pictures} in {results['seconds'] / 60:.1f} min")
    return results


def _data_config(root: Path, train: str, val: str, labels: str, num_frames: int) -> DataConfig:
    return DataConfig(train_list=str(root / train), val_list=str(root / val), root=str(root),
                      labels_file=str(root / labels), num_frames=num_frames, min_scale=1.0, **NORMALISE)


def _overlay(out: Path, cameras, variants, task: str) -> str:
    """Seed 0's flow over a validation clip of each class, per setting with an AM flow model;
    the figure's name, or an empty string when no variant has AM flow."""
    from .engine import load_checkpoint

    panels = []
    for camera in cameras:
        flow_variant = next((v for v in (SETTING_FLOW[camera], "vanilla", "aligned") if v in variants), None)
        if flow_variant is None:
            continue
        model, checkpoint = load_checkpoint(out / "seed0" / camera / flow_variant / "best.pt")
        data = DataConfig.from_dict(checkpoint["data_config"])
        records, names = load_annotations("list", data.val_list, data.root, labels_file=data.labels_file)
        clips = [(names[label], read_clip(next(r for r in records if r.label == label).path, range))
                 for label in range(len(names))]
        path = out / f"flow_overlay_{camera}.png"
        overlay_flow(model, clips, path, image_size=TINY_VIT["img_size"], **NORMALISE,
                     blocks=(2, TINY_VIT["depth"]),
                     title=f"{camera} camera, task '{task}': {flow_variant} AM flow over a validation clip "
                           f"of each class (bright = large flow)")
        panels.append(path.name)
    return "".join(f", {name}" for name in panels)


@torch.no_grad()
def flow_peak_on_mover(model, clips, *, mean, std) -> tuple[dict[int, float], float]:
    """How often the AM flow marks the shape that moves.

    ``clips``: ``(uint8 frames (T, S, S, 3), track (T, 2))`` pairs, the track being the moving
    shape's centre ``(y, x)`` per frame (``render_clip(..., return_track=True)``) and ``S`` the
    model's input size, so that the track's pixels are the model's. A frame pair ``(t, t+Δ)``
    is a hit in a block when its largest flow (mean over channels) lies on a patch token within
    one token (on the torus: the panning scene wraps) of the token holding the shape at ``t`` or
    at ``t+Δ``. Returns the hit rate per flow block and the chance rate: the mean share of the
    grid's tokens that would count as a hit."""
    patch_embed = model.backbone.patch_embed
    grid, size = tuple(patch_embed.grid_size), tuple(patch_embed.img_size)
    patch = torch.tensor(patch_embed.patch_size)
    rows, columns = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    hits, chance = {}, []
    for frames, track in clips:
        if tuple(frames.shape[1:3]) != size or len(track) != len(frames):
            raise ValueError(f"flow_peak_on_mover: frames must be {size} (the model's input) with a track per "
                             f"frame, got frames {tuple(frames.shape)} and a track of {len(track)}")
        _, flows = patch_flows(model, torch.as_tensor(frames), size[0], mean, std)
        tokens = torch.as_tensor(track).div(patch, rounding_mode="floor").long()  # (T, 2)
        dy = (rows - tokens[:, 0, None, None]).remainder(grid[0])  # (T, grid_h, grid_w), on the torus
        dx = (columns - tokens[:, 1, None, None]).remainder(grid[1])
        near = ((torch.minimum(dy, grid[0] - dy) <= 1) & (torch.minimum(dx, grid[1] - dx) <= 1)).flatten(1)
        target = near[:-model.offset] | near[model.offset:]  # (T−Δ, N): near the shape at t or t+Δ
        chance.append(target.float().mean(1))
        for block, flow in flows.items():
            peak = flow.mean(-1).flatten(1).argmax(1)  # (T−Δ,)
            hits.setdefault(block, []).append(target.gather(1, peak[:, None])[:, 0].float())
    rates = {block: torch.cat(h).mean().item() for block, h in sorted(hits.items())}
    return rates, torch.cat(chance).mean().item()


def format_table(results: dict) -> str:
    settings = results["settings"]
    image = results["image_model_frame_top1"]
    lines = [
        f"Synthetic motion, task '{settings['task']}', {settings['seeds']} seed(s), {settings['epochs']} epochs, "
        f"all variants at equal budget (chance {results['chance']:.3f}; the image model's frame top-1 on its "
        f"own task {image['mean']:.3f}). Mean ± std over seeds:",
        f"{'camera':<8} {'variant':<28} {'best top-1':>15} {'best top-5':>15} {'final top-1':>15} {'trainable':>10}",
    ]
    for camera, variants in results["summary"].items():
        for variant, row in variants.items():
            cells = [f"{row[key]['mean']:.3f} ± {row[key]['std']:.3f}" for key in ("best_top1", "best_top5",
                                                                                    "final_top1")]
            trainable = results["runs"][camera][variant][0]["trainable"]
            lines.append(f"{camera:<8} {results['variants'][variant]:<28} {cells[0]:>15} {cells[1]:>15} "
                         f"{cells[2]:>15} {trainable:>10,}")
    if settings["seeds"] == 1:
        lines.append("One seed: its std is 0 and says nothing of the spread; run --seeds 3 or more to compare.")
    return "\n".join(lines)


def plot_accuracy(results: dict, path: Path) -> None:
    """Validation top-1 per epoch, mean ± std over seeds as error bars, one panel per setting."""
    plt = pyplot()
    summary = results["summary"]
    figure, axes = plt.subplots(1, len(summary), figsize=(5 * len(summary), 3.4), squeeze=False, sharey=True)
    for axis, (camera, variants) in zip(axes[0], summary.items()):
        for variant, row in variants.items():
            curve = row["val_top1_per_epoch"]
            axis.errorbar(range(1, len(curve) + 1), [p["mean"] for p in curve], yerr=[p["std"] for p in curve],
                          marker="o", markersize=3, capsize=2, label=results["variants"][variant])
        axis.axhline(results["chance"], color="grey", linestyle="--", linewidth=1, label="chance")
        axis.set_title(f"{camera} camera ({results['settings']['seeds']} seed(s), mean ± std)", fontsize=9)
        axis.set_xlabel("epoch")
        axis.set_ylabel("validation top-1")
        axis.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
