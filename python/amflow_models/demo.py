"""The end-to-end demo: synthetic motion data → an image model → four video models, compared.

1. Generate the synthetic motion dataset (``data/synthetic.py``): classes that only motion
   tells apart, filmed by a panning camera.
2. Pretrain a tiny ViT on single frames (where is the shape?): the "image model". Freeze it.
3. Train, with the same data, epochs, batch size, learning rate and seed:
   (a) adapters + TPMs without AM flow, (b) with vanilla AM flow, (c) with aligned AM flow,
   (d) the ZeroI2V baseline.
4. Print the table (accuracy, trainable/frozen parameters, time), write ``results.json``,
   ``accuracy.png`` (validation top-1 per epoch) and ``flow.png`` (AM flow of a validation clip).

It measures one seed on a small problem: differences of a few points are within noise.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

from .build import ModelConfig, parameter_report
from .data.annotations import load_annotations
from .data.loader import DataConfig
from .data.synthetic import generate_synthetic
from .data.video_io import read_clip
from .engine import fit, load_checkpoint, train_image_model
from .visualize import visualize_flow

TINY_VIT = dict(img_size=32, patch_size=8, embed_dim=96, depth=4, num_heads=4)
NORMALISE = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
VARIANTS = {
    "none": "adapters + TPM, no AM flow",
    "vanilla": "+ vanilla AM flow",
    "aligned": "+ aligned AM flow",
    "zeroi2v": "ZeroI2V baseline",
}


def run_demo(
    out: str | Path = "amflow-demo", *, train_per_class: int = 100, val_per_class: int = 30,
    image_epochs: int = 12, epochs: int = 10, batch_size: int = 16, lr: float = 2e-3, tpm: str = "lstm",
    workers: int = 2, seed: int = 0, backend: str = "auto", progress: bool = True, log=print,
) -> dict:
    """Run the demo into folder ``out`` and return its results (also in ``out/results.json``)."""
    out = Path(out)
    began = time.perf_counter()
    log(f"[1/4] generating the synthetic motion dataset in {out / 'data'}")
    root = generate_synthetic(out / "data", train_per_class=train_per_class, val_per_class=val_per_class,
                              size=TINY_VIT["img_size"], seed=seed)
    log("[2/4] pretraining the image model (a tiny ViT) on single frames: where is the shape?")
    frames = DataConfig(train_list=str(root / "frames_train.txt"), val_list=str(root / "frames_val.txt"),
                        root=str(root), labels_file=str(root / "positions.txt"), min_scale=1.0, **NORMALISE)
    image_model = out / "image_model.pt"
    image_metrics = train_image_model("vit_tiny_patch16_224", TINY_VIT, frames, image_model, epochs=image_epochs,
                                      workers=workers, seed=seed, progress=progress, log=log)
    positions = len(load_annotations("list", frames.val_list, root, labels_file=frames.labels_file)[1])
    data = DataConfig(train_list=str(root / "train.txt"), val_list=str(root / "val.txt"), root=str(root),
                      labels_file=str(root / "classes.txt"), num_frames=8, min_scale=1.0, **NORMALISE)
    classes = len(load_annotations("list", data.val_list, root, labels_file=data.labels_file)[1])
    rows = {}
    for step, (variant, description) in enumerate(VARIANTS.items()):
        log(f"[3/4] ({step + 1}/{len(VARIANTS)}) training on the frozen image model: {description}")
        config = ModelConfig(
            num_classes=classes, backbone="vit_tiny_patch16_224", checkpoint_path=str(image_model),
            backbone_kwargs={**TINY_VIT, "num_classes": positions}, variant=variant, tpm=tpm,
            adapter_dim=32, aligner_dim=48, backend=backend,
        )
        result = fit(config, data, out / variant, epochs=epochs, batch_size=batch_size, lr=lr, workers=workers,
                     seed=seed, progress=progress, log=log)
        model, _ = load_checkpoint(out / variant / "best.pt")
        report = parameter_report(model)["total"]
        rows[variant] = {
            "description": description, "best_top1": result["best"]["top1"], "best_top5": result["best"]["top5"],
            "final_top1": result["history"][-1]["top1"], "trainable": report["trainable"],
            "frozen": report["frozen"], "seconds": result["seconds"],
            "val_top1_per_epoch": [h["top1"] for h in result["history"]],
        }
    log("[4/4] writing the table, the accuracy plot and the AM flow visualisation")
    results = {
        "chance": 1 / classes, "image_model_frame_top1": image_metrics["top1"], "variants": rows,
        "settings": {"train_per_class": train_per_class, "val_per_class": val_per_class, "epochs": epochs,
                     "image_epochs": image_epochs, "batch_size": batch_size, "lr": lr, "tpm": tpm, "seed": seed,
                     "backbone": TINY_VIT, "data": asdict(data)},
        "seconds": time.perf_counter() - began,
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    _plot(rows, 1 / classes, out / "accuracy.png")
    model, _ = load_checkpoint(out / "vanilla" / "best.pt")
    records, names = load_annotations("list", data.val_list, root, labels_file=data.labels_file)
    clip = read_clip(records[0].path, range)  # every frame
    visualize_flow(model, clip, out / "flow.png", image_size=TINY_VIT["img_size"], **NORMALISE,
                   title=f"vanilla AM flow, blocks 1-{TINY_VIT['depth']}: a clip of '{names[records[0].label]}'")
    log(format_table(results))
    log(f"wrote {out / 'results.json'}, {out / 'accuracy.png'} and {out / 'flow.png'} "
        f"in {results['seconds'] / 60:.1f} min")
    return results


def format_table(results: dict) -> str:
    lines = [
        f"Synthetic motion, {len(results['variants'])} variants at equal budget "
        f"(chance {results['chance']:.3f}; image model's frame top-1 on its own task "
        f"{results['image_model_frame_top1']:.3f}):",
        f"{'variant':<32} {'best top-1':>10} {'top-5':>7} {'final top-1':>11} "
        f"{'trainable':>10} {'frozen':>9} {'time':>7}",
    ]
    for row in results["variants"].values():
        lines.append(
            f"{row['description']:<32} {row['best_top1']:>10.3f} {row['best_top5']:>7.3f} {row['final_top1']:>11.3f} "
            f"{row['trainable']:>10,} {row['frozen']:>9,} {row['seconds']:>6.0f}s"
        )
    lines.append("One seed on a small problem: differences of a few points are within noise.")
    return "\n".join(lines)


def _plot(rows: dict, chance: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(5, 3.2))
    for row in rows.values():
        epochs = range(1, len(row["val_top1_per_epoch"]) + 1)
        axis.plot(epochs, row["val_top1_per_epoch"], marker="o", label=row["description"])
    axis.axhline(chance, color="grey", linestyle="--", linewidth=1, label="chance")
    axis.set_xlabel("epoch")
    axis.set_ylabel("validation top-1")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
