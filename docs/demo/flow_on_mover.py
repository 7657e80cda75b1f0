"""How often the AM flow's peak is on the moving shape (README, "What the demo shows").

    python docs/demo/flow_on_mover.py static=RUN/seed0/static/vanilla/best.pt \
        panning=RUN/seed0/panning/aligned/best.pt ...

For each ``camera=checkpoint`` of an ``amflow demo`` run: render that seed's and task's
validation clips again with the moving shape's track (``dataset_clip``: the very clips the demo
wrote), and print, per flow block, the share of frame pairs whose largest flow lies within one
token of the mover (``amflow_models.demo.flow_peak_on_mover``), beside chance.
"""

import argparse

from amflow_models.data.synthetic import CAMERAS, TASKS, dataset_clip
from amflow_models.demo import CLIP_FRAMES, NORMALISE, TINY_VIT, flow_peak_on_mover
from amflow_models.engine import load_checkpoint


def camera_checkpoint(text: str) -> tuple[str, str]:
    camera, _, checkpoint = text.partition("=")
    if camera not in CAMERAS or not checkpoint:
        raise argparse.ArgumentTypeError(f"expected CAMERA=CHECKPOINT with CAMERA one of {', '.join(CAMERAS)}, "
                                         f"got {text!r}")
    return camera, checkpoint


parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("runs", nargs="+", type=camera_checkpoint, metavar="CAMERA=CHECKPOINT")
parser.add_argument("--seed", type=int, default=0, help="the demo seed the checkpoints belong to (default: 0)")
parser.add_argument("--task", choices=tuple(TASKS), default="which", help="the demo's task (default: which)")
parser.add_argument("--clips", type=int, default=180, help="validation clips to measure on (default: 180)")
args = parser.parse_args()
for camera, checkpoint in args.runs:
    model, _ = load_checkpoint(checkpoint)
    clips = [dataset_clip("val", i, seed=args.seed, num_frames=CLIP_FRAMES, size=TINY_VIT["img_size"],
                          task=args.task, camera=camera, return_track=True) for i in range(args.clips)]
    rates, chance = flow_peak_on_mover(model, [(frames, track) for frames, _, track in clips], **NORMALISE)
    blocks = ", ".join(f"block {block} {rate:.2f}" for block, rate in rates.items())
    print(f"{camera} camera, {model.flow_kind} AM flow ({checkpoint}): {blocks}; chance {chance:.2f}")
