"""The papers' configurations as presets: ``amflow train --preset NAME`` (``amflow presets`` lists them).

A preset sets the defaults of ``amflow train``'s flags; a flag given on the command line still
wins. Each preset keeps apart what its paper specifies (``specified``) and what the paper leaves
open, where the preset states this package's own choice (``chosen``), with ``notes`` on how a
value was read. Sources: the AM Flow paper (AAAI) and its AVSS 2025 version with supplement, and
ZeroI2V (Li and Wang), its Table 11 (STDHA's heads) and Table 12 (the recipe).

The AM Flow texts give no optimiser, learning rate, epochs, batch size, adapter width or TPM
kind; every AM Flow preset takes the package's defaults for those (``AMFLOW_CHOSEN``).

``reported`` is the model size a paper's authors report, printed by ``amflow presets NAME``
beside the preset model's own counts. ZeroI2V's comes from its official repository's README
(MCG-NJU/ZeroI2V). The AM Flow papers' sizes are in none of the texts this package could
read (their stored pages hold the abstract and introduction only); those presets say so.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# what the AM Flow papers leave open, as this package chooses it
AMFLOW_CHOSEN = {"tpm": "lstm", "adapter_dim": 64, "epochs": 30, "batch_size": 8, "lr": 1e-3, "weight_decay": 0.05}
# ZeroI2V's Table 12 recipe, shared by its presets
ZEROI2V_RECIPE = {"variant": "zeroi2v", "lr": 3e-4, "batch_size": 64, "rand_augment": "m7-n4",
                  "random_erasing": 0.25, "label_smoothing": 0.1}
ZEROI2V_NOTES = ("Table 12's batch of 64 is global: with N processes pass --batch-size 64/N. Table 12 gives 40 "
                 "and 50 epochs: 40 for Kinetics-400 and 50 for SSv2, as the released configs "
                 "(vit_zero_base_clip_k400_16x8x1.py, vit_zero_base_clip_sthv2_u16.py) train. Those configs "
                 "test Kinetics-400 on 3 clips × 1 centre crop and SSv2 on 1 clip × 3 crops (the README's "
                 "views 8x1x3 and 8x3x1: frames × crops × clips); the released Kinetics-400 config also "
                 "leaves random erasing and label smoothing out. The backbone is the CLIP ViT-B/16 of those "
                 "configs.")
AMFLOW_SIZE = "not in the texts this package could read (the stored pages give the abstract and introduction)"


def _zeroi2v_size(frames: int) -> str:
    size = ("86 M parameters (CLIP ViT-B/16), 0 M added at inference: the adapters merge into the backbone "
            "and STDHA adds nothing (official repository README)")
    return size + (", 422 GFLOPs over the 3 views of 8 frames" if frames == 8 else "")


@dataclass(frozen=True)
class Preset:
    """One paper configuration: ``specified`` and ``chosen`` map ``amflow train`` flag names
    (argparse dests) to values; ``num_classes`` is the dataset's, for ``amflow presets NAME``."""

    name: str
    source: str
    summary: str
    num_classes: int
    specified: dict = field(default_factory=dict)
    chosen: dict = field(default_factory=dict)
    notes: str = ""
    reported: str = AMFLOW_SIZE

    @property
    def defaults(self) -> dict:
        return {**self.chosen, **self.specified}


def _amflow(name, source, summary, num_classes, specified, chosen=None, notes="") -> Preset:
    return Preset(name, source, summary, num_classes, {"adapter_activation": "relu", **specified},
                  {**AMFLOW_CHOSEN, **(chosen or {})}, notes)


def _zeroi2v(dataset: str, frames: int, heads: list[int]) -> Preset:
    kinetics = dataset == "k400"
    return Preset(
        f"zeroi2v-{dataset}-{frames}f", f"ZeroI2V, Tables 11 and 12 ({'Kinetics-400' if kinetics else 'SSv2'})",
        f"ZeroI2V ViT-B, {frames} frames: STDHA offsets {heads}, linear adapters (bottleneck 0.25)",
        400 if kinetics else 174,
        {**ZEROI2V_RECIPE, "num_frames": frames, "temporal_heads": heads, "epochs": 40 if kinetics else 50,
         "val_clips": 3 if kinetics else 1, "val_crops": 1 if kinetics else 3},
        {"backbone": "vit_base_patch16_clip_224.openai", "weight_decay": 0.05,
         "sampling": "dense" if kinetics else "uniform", **({"frame_interval": 64 // frames} if kinetics else {})},
        ZEROI2V_NOTES, _zeroi2v_size(frames),
    )


PRESETS = {preset.name: preset for preset in (
    _amflow("amflow-k400", "AM Flow (AAAI; AVSS 2025), Kinetics-400",
            "aligned AM flow (moving camera), DINOv2 ViT-B/14, 8 frames, dense sampling, 8×3×1 views", 400,
            {"variant": "aligned", "num_frames": 8, "sampling": "dense", "val_clips": 1, "val_crops": 3},
            {"frame_interval": 8},
            "8×3×1 is read as 8 frames × 3 spatial crops × 1 clip, the order of ZeroI2V's released "
            "configs (frames × crops × clips)."),
    _amflow("amflow-ssv2-8f", "AM Flow (AAAI; AVSS 2025), Something-Something v2",
            "aligned AM flow, DINOv2 ViT-B/14, 8 frames, uniform sampling", 174,
            {"variant": "aligned", "num_frames": 8, "sampling": "uniform"}),
    _amflow("amflow-ssv2-24f", "AM Flow (AAAI; AVSS 2025), Something-Something v2",
            "aligned AM flow, DINOv2 ViT-B/14, 24 frames, uniform sampling", 174,
            {"variant": "aligned", "num_frames": 24, "sampling": "uniform"}),
    _amflow("amflow-smarthome-am2", "AM Flow, AVSS 2025 supplement, Toyota Smarthome (cross-subject)",
            "AM/2(1,12): adapters in every block, vanilla AM flow and TPMs in blocks 1 and 12; mean per-class "
            "accuracy", 31,
            {"variant": "vanilla", "flow_blocks": [1, 12], "tpm_blocks": [1, 12], "select_by": "mean_class_accuracy"},
            {"num_frames": 8, "sampling": "uniform"},
            "Cross-subject is a split: pass its training and test lists. Vanilla AM flow: the camera is fixed."),
    _zeroi2v("k400", 8, [1, -1]), _zeroi2v("k400", 16, [1, -1, 2]), _zeroi2v("k400", 32, [1, -1, 2, -2, 3]),
    _zeroi2v("ssv2", 8, [1, -1]), _zeroi2v("ssv2", 16, [1, -1, 2, -2]), _zeroi2v("ssv2", 32, [1, -1, 2, -2, 3]),
)}


def describe(preset: Preset) -> str:
    """What ``amflow presets NAME`` prints before the parameter report."""
    def flags(values: dict) -> str:
        return " ".join(f"--{key.replace('_', '-')} {_flag_value(value)}" for key, value in values.items())

    lines = [f"{preset.name}: {preset.summary}", f"  source: {preset.source}",
             f"  the paper specifies: {flags(preset.specified)}",
             f"  this package chose (the paper gives none): {flags(preset.chosen)}"]
    if preset.notes:
        lines.append(f"  notes: {preset.notes}")
    lines.append(f"  model size the paper's authors report: {preset.reported}")
    return "\n".join(lines)


def _flag_value(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
