"""``amflow`` (also ``python -m amflow_models``): synth, train, eval, visualize, demo.

``train`` and ``eval`` also run as one process per GPU under torchrun:
``torchrun --nproc_per_node N $(which amflow) train …``.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import sys
from dataclasses import fields
from pathlib import Path

from amflow_kernels._dispatch import ACCEPTED as KERNEL_BACKENDS

from .adapters import ACTIVATIONS
from .build import VARIANTS, ModelConfig, format_report, parameter_report
from .data.annotations import FORMATS
from .data.dataset import SAMPLINGS
from .data.loader import DataConfig
from .data.synthetic import CAMERAS, TASKS
from .demo import VARIANTS as DEMO_VARIANTS
from .demo import run_demo
from .distributed import DIST_BACKENDS
from .flow import FLOW_NORMS
from .presets import PRESETS
from .tpm import TPM_KINDS
from .train_config import SELECT_BY, VAL_CROPS, TrainConfig

# the defaults of the flags: amflow train's are the configs' own, amflow demo's run_demo's
MODEL, DATA, TRAIN = ModelConfig(num_classes=1), DataConfig(), TrainConfig()
DEMO = {name: p.default for name, p in inspect.signature(run_demo).parameters.items()}


def _integers(example: str):
    """An argparse type: comma-separated integers (block numbers, frame offsets)."""
    def parse(text: str) -> list[int]:
        try:
            return [int(b) for b in text.split(",") if b.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected integers like {example}, got {text!r}") from None
    return parse


def _names(known):
    """An argparse type: comma-separated names, each one of ``known``."""
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in known]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"expected comma-separated names of {', '.join(known)}, got {text!r}")
        return names
    return parse


def _rand_augment(text: str) -> str:
    from .data.dataset import parse_rand_augment

    try:
        parse_rand_augment(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _backbone_arg(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value (e.g. img_size=224), got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _add_runtime(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=TRAIN.batch_size,
                        help="clips per step in each process: under torchrun the global batch is processes × this, "
                        "and nothing is scaled for it (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=2,
                        help="data loader processes per training process (default: %(default)s)")
    parser.add_argument("--device", default=None,
                        help="cuda or cpu; under torchrun each process takes GPU LOCAL_RANK (default: cuda when "
                        "available)")
    parser.add_argument("--dist-backend", default="auto", choices=DIST_BACKENDS,
                        help="torch.distributed backend under torchrun; auto: nccl on GPUs, gloo on CPU "
                        "(default: %(default)s)")
    parser.add_argument("--backend", default=None, choices=KERNEL_BACKENDS,
                        help="amflow_kernels backend inside the model (reference: the unfused PyTorch ops; "
                        "default: auto, or the checkpoint's)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser(train_defaults: dict | None = None) -> argparse.ArgumentParser:
    """The ``amflow`` parser; ``train_defaults`` (a preset's) replace ``train``'s own defaults."""
    parser = argparse.ArgumentParser(prog="amflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    synth = commands.add_parser("synth", help="write the synthetic motion dataset")
    synth.add_argument("out", help="folder to write videos/, train.txt, val.txt and classes.txt to")
    synth.add_argument("--train-per-class", type=int, default=100,
                       help="training clips per class (default: %(default)s)")
    synth.add_argument("--val-per-class", type=int, default=30,
                       help="validation clips per class (default: %(default)s)")
    synth.add_argument("--size", type=int, default=48, help="frame height and width in pixels (default: %(default)s)")
    synth.add_argument("--frames", type=int, default=8, help="frames per clip (default: %(default)s)")
    synth.add_argument("--task", default="which", choices=list(TASKS),
                       help="which: which of three shapes moves and how; direction: how one shape moves "
                            "(default: %(default)s)")
    synth.add_argument("--camera", default="static", choices=list(CAMERAS),
                       help="a still camera, or one panning over the scene (default: %(default)s)")
    synth.add_argument("--seed", type=int, default=0, help="random seed of the clips (default: %(default)s)")

    train = commands.add_parser("train", help="train a video model (checkpoints, metrics log)")
    train.add_argument("--preset", choices=PRESETS,
                       help="a paper's configuration as the defaults of the other flags, which still win when "
                       "given; `amflow presets` lists them")
    train.add_argument("--train-list", required=True, help="annotation file of the training clips")
    train.add_argument("--val-list", required=True, help="annotation file of the validation clips")
    train.add_argument("--format", default=DATA.format, choices=FORMATS,
                       help="annotation format: 'path label' lines, Kinetics CSV or SSv2 JSON (default: %(default)s)")
    train.add_argument("--root", default=DATA.root,
                       help="folder the annotation paths are relative to (default: %(default)s)")
    train.add_argument("--labels-file", help="class names: one per line (list, kinetics) or SSv2's labels.json")
    train.add_argument("--skip-missing", action="store_true", help="drop listed clips that do not exist")
    train.add_argument("--num-frames", type=int, default=DATA.num_frames,
                       help="frames sampled per clip (default: %(default)s)")
    train.add_argument("--sampling", default=DATA.sampling, choices=SAMPLINGS,
                       help="frames spread over the video, or consecutive at --frame-interval (default: %(default)s)")
    train.add_argument("--frame-interval", type=int, default=DATA.frame_interval,
                       help="for dense sampling (default: %(default)s)")
    train.add_argument("--image-size", type=int, help="default: the backbone's")
    train.add_argument("--min-scale", type=float, default=DATA.min_scale,
                       help="smallest area fraction of the training crop (default: %(default)s)")
    train.add_argument("--no-flip", action="store_true", help="no horizontal flips in training")
    train.add_argument("--rand-augment", type=_rand_augment, metavar="mM-nN",
                       help="RandAugment of training clips, the same ops on every frame, e.g. m7-n4 (ZeroI2V's "
                       "recipe); default: none")
    train.add_argument("--random-erasing", type=float, default=DATA.random_erasing,
                       help="probability of erasing a box, the same on every frame, of a training clip; ZeroI2V's "
                       "recipe uses 0.25 (default: %(default)s)")
    train.add_argument("--backbone", default=MODEL.backbone,
                       help="a timm ViT name, tag allowed; the default is the papers' DINOv2 ViT-B/14 (default: "
                       "%(default)s)")
    weights = train.add_mutually_exclusive_group()
    weights.add_argument("--pretrained", action="store_true",
                         help="load timm's pretrained weights for the tag (a download, cached)")
    weights.add_argument("--checkpoint-path", help="a local weights file for the backbone")
    weights.add_argument("--random-init", action="store_true",
                         help="freeze a randomly initialised backbone on purpose (tests, smoke runs); without one "
                         "of these three flags train refuses to start")
    train.add_argument("--backbone-arg", type=_backbone_arg, action="append", default=[], metavar="KEY=VALUE",
                       help="more timm.create_model arguments, e.g. depth=6 (repeatable; img_size=224 unless "
                       "given)")
    train.add_argument("--variant", default=MODEL.variant, choices=VARIANTS,
                       help="AM flow variant, none (adapters only) or the ZeroI2V baseline (default: %(default)s)")
    train.add_argument("--tpm", default=MODEL.tpm, choices=TPM_KINDS,
                       help="temporal processing module (default: %(default)s)")
    train.add_argument("--adapter-dim", type=int,
                       help="adapter bottleneck width (default: 64; zeroi2v: a quarter of the token width)")
    train.add_argument("--adapter-activation", default=MODEL.adapter_activation, choices=list(ACTIVATIONS),
                       help="the adapters' activation; relu is the papers' eq. 6 (default: %(default)s)")
    train.add_argument("--adapter-blocks", type=_integers("1,12"), help="1-based, e.g. 1,12 (default: all)")
    train.add_argument("--flow-blocks", type=_integers("1,12"),
                       help="1-based blocks with AM flow (default: all adapted)")
    train.add_argument("--tpm-blocks", type=_integers("1,12"),
                       help="1-based adapted blocks whose adapters feed TPMs; the AVSS paper's AM/2(1,12) is "
                       "--flow-blocks 1,12 --tpm-blocks 1,12 (default: all adapted)")
    train.add_argument("--temporal-heads", type=_integers("-1,1,2"), metavar="OFFSETS",
                       help="zeroi2v: STDHA's frame offset of heads 0, 1, …, e.g. --temporal-heads=-1,1,-2,2,3 "
                       "(default: -1,1 per 8 heads)")
    train.add_argument("--offset", type=int, default=MODEL.offset,
                       help="frame distance of AM flow (default: %(default)s)")
    train.add_argument("--aligner-dim", type=int, default=MODEL.aligner_dim,
                       help="aligning encoder width, aligned variant (default: %(default)s)")
    train.add_argument("--aligner-depth", type=int, default=MODEL.aligner_depth,
                       help="aligning encoder layers (default: %(default)s)")
    train.add_argument("--flow-norm", default=MODEL.flow_norm, choices=list(FLOW_NORMS),
                       help="AM flow as the adapters get it: none = the papers' scale, clip = each channel "
                            "standardised per clip (default: %(default)s)")
    train.add_argument("--flow-only", action="store_true",
                       help="diagnostic: the MHSA adapters read the AM flow alone, logits from their TPMs only")
    train.add_argument("--epochs", type=int, default=TRAIN.epochs, help="training epochs (default: %(default)s)")
    train.add_argument("--lr", type=float, default=TRAIN.lr,
                       help="AdamW peak learning rate, cosine schedule (default: %(default)s)")
    train.add_argument("--weight-decay", type=float, default=TRAIN.weight_decay,
                       help="AdamW weight decay (default: %(default)s)")
    train.add_argument("--label-smoothing", type=float, default=TRAIN.label_smoothing,
                       help="of the training cross-entropy; ZeroI2V's recipe uses 0.1 (default: %(default)s)")
    train.add_argument("--compile", action="store_true", help="torch.compile the model")
    train.add_argument("--val-clips", type=int, default=TRAIN.val_clips,
                       help="temporal clips per validation video, for best.pt by the test protocol (default: "
                       "%(default)s)")
    train.add_argument("--val-crops", type=int, default=TRAIN.val_crops, choices=VAL_CROPS,
                       help="spatial crops per validation clip (default: %(default)s)")
    train.add_argument("--select-by", default=TRAIN.select_by, choices=SELECT_BY,
                       help="the validation metric best.pt is chosen by (default: %(default)s)")
    train.add_argument("--resume", action="store_true",
                       help="continue from OUT/last.pt exactly where it stopped (after an epoch, or mid-epoch on "
                       "SIGTERM); same settings and global batch")
    train.add_argument("--max-bad-clips", type=int, default=TRAIN.max_bad_clips,
                       help="unreadable training clips tolerated (each logged and replaced by another clip) before "
                       "the run stops with their list (default: %(default)s)")
    train.add_argument("--seed", type=int, default=TRAIN.seed, help="random seed (default: %(default)s)")
    train.add_argument("--out", required=True, help="folder for checkpoints and metrics.jsonl")
    _add_runtime(train)

    evaluate = commands.add_parser("eval", help="evaluate a checkpoint (multi-view, confusion matrix)")
    evaluate.add_argument("checkpoint", help="a best.pt or last.pt written by amflow train")
    evaluate.add_argument("--list", help="annotation file (default: the checkpoint's val list)")
    evaluate.add_argument("--clips", type=int, default=1, help="temporal clips per video (default: %(default)s)")
    evaluate.add_argument("--crops", type=int, default=1, choices=VAL_CROPS,
                          help="spatial crops per clip (default: %(default)s)")
    evaluate.add_argument("--json", help="write the metrics here")
    _add_runtime(evaluate)

    visualize = commands.add_parser("visualize", help="AM flow of a clip as a PNG (paper Fig. 5)")
    visualize.add_argument("checkpoint", help="a best.pt or last.pt written by amflow train")
    visualize.add_argument("video", help="a video file or a folder of frames")
    visualize.add_argument("--out", default="amflow.png", help="PNG to write (default: %(default)s)")
    visualize.add_argument("--num-frames", type=int, help="default: the checkpoint's")
    visualize.add_argument("--backend", default=None, choices=KERNEL_BACKENDS,
                           help="amflow_kernels backend inside the model (default: the checkpoint's)")

    presets = commands.add_parser("presets", help="the papers' configurations for train --preset")
    presets.add_argument("name", nargs="?", choices=PRESETS,
                         help="one preset in full, with its model's parameter counts (default: list them all)")

    demo = commands.add_parser("demo", help="synthetic data → image model → video models, compared over seeds "
                                            "in both camera settings")
    demo.add_argument("--out", default=DEMO["out"],
                      help="folder for data, checkpoints and plots (default: %(default)s)")
    demo.add_argument("--seeds", type=int, default=DEMO["seeds"],
                      help="seeds 0..N-1, each a new dataset, image model and initialisation; the table gives "
                           "mean ± std over them (default: %(default)s)")
    demo.add_argument("--cameras", type=_names(CAMERAS), default=list(DEMO["cameras"]),
                      help=f"camera settings, comma-separated, of {', '.join(CAMERAS)} (default: both)")
    demo.add_argument("--variants", type=_names(DEMO_VARIANTS), default=list(DEMO["variants"]),
                      help=f"variants, comma-separated, of {', '.join(DEMO_VARIANTS)} "
                           f"(default: {','.join(DEMO['variants'])})")
    demo.add_argument("--task", default=DEMO["task"], choices=list(TASKS),
                      help="which: which shape moves and how; direction: how one shape moves (default: %(default)s)")
    demo.add_argument("--epochs", type=int, default=DEMO["epochs"],
                      help="epochs of each video model (default: %(default)s)")
    demo.add_argument("--lr", type=float, default=DEMO["lr"],
                      help="learning rate of every video model (default: %(default)s)")
    demo.add_argument("--flow-norm", default=DEMO["flow_norm"], choices=list(FLOW_NORMS),
                      help="AM flow as the adapters get it: clip = standardised per clip, none = the papers' scale "
                           "(default: %(default)s)")
    demo.add_argument("--image-epochs", type=int, default=DEMO["image_epochs"],
                      help="epochs of the image model (default: %(default)s)")
    demo.add_argument("--train-per-class", type=int, default=DEMO["train_per_class"],
                      help="training clips per class (default: %(default)s)")
    demo.add_argument("--val-per-class", type=int, default=DEMO["val_per_class"],
                      help="validation clips per class (default: %(default)s)")
    demo.add_argument("--tpm", default=DEMO["tpm"], choices=TPM_KINDS,
                      help="temporal processing module (default: %(default)s)")
    demo.add_argument("--workers", type=int, default=DEMO["workers"],
                      help="data loader processes (default: %(default)s)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    if train_defaults:
        train.set_defaults(**train_defaults)
    return parser


def model_config(args: argparse.Namespace, num_classes: int) -> ModelConfig:
    """The ``ModelConfig`` of ``amflow train``'s parsed arguments."""
    return ModelConfig(
        num_classes=num_classes, backbone=args.backbone, pretrained=args.pretrained,
        checkpoint_path=args.checkpoint_path, backbone_kwargs={**MODEL.backbone_kwargs, **dict(args.backbone_arg)},
        variant=args.variant, tpm=args.tpm, adapter_dim=args.adapter_dim, adapter_activation=args.adapter_activation,
        adapter_blocks=args.adapter_blocks, flow_blocks=args.flow_blocks, tpm_blocks=args.tpm_blocks,
        temporal_heads=args.temporal_heads, offset=args.offset, max_frames=max(MODEL.max_frames, args.num_frames),
        aligner_dim=args.aligner_dim, aligner_depth=args.aligner_depth, flow_norm=args.flow_norm,
        flow_only=args.flow_only, backend=args.backend or "auto",
    )


def data_config(args: argparse.Namespace) -> DataConfig:
    """The ``DataConfig`` of ``amflow train``'s parsed arguments."""
    return DataConfig(
        train_list=args.train_list, val_list=args.val_list, format=args.format, root=args.root,
        labels_file=args.labels_file, num_frames=args.num_frames, sampling=args.sampling,
        frame_interval=args.frame_interval, image_size=args.image_size, skip_missing=args.skip_missing,
        flip=not args.no_flip, min_scale=args.min_scale, rand_augment=args.rand_augment,
        random_erasing=args.random_erasing,
    )


def train_config(args: argparse.Namespace) -> TrainConfig:
    """The ``TrainConfig`` of ``amflow train``'s parsed arguments: its flags are its fields."""
    return TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig)})


def _train(args) -> None:
    from .data.annotations import load_annotations
    from .engine import fit

    if not (args.pretrained or args.checkpoint_path or args.random_init):
        raise ValueError(
            f"the backbone {args.backbone!r} would start from random weights, and a frozen random backbone "
            "learns nothing: pass --pretrained (timm's weights for the tag, a download) or --checkpoint-path "
            "FILE (weights fetched elsewhere); --random-init if that is what you want (tests, smoke runs)"
        )
    data, train = data_config(args), train_config(args)
    _, classes = load_annotations(args.format, args.val_list, args.root, labels_file=args.labels_file,
                                  skip_missing=args.skip_missing)
    result = fit(model_config(args, len(classes)), data, train, args.out, workers=args.workers, device=args.device,
                 dist_backend=args.dist_backend, compile=args.compile, resume=args.resume,
                 progress=not args.no_progress)
    best = result["best"]
    if _is_main_process():
        print(f"best val top-1 {best['top1']:.4f}, top-5 {best['top5']:.4f} (epoch {best['epoch']}); "
              f"checkpoints in {args.out}")


def _eval(args) -> None:
    from .data.loader import make_loader
    from .distributed import session
    from .engine import evaluate, load_checkpoint

    with session(args.device, args.dist_backend) as runtime:
        model, checkpoint = load_checkpoint(args.checkpoint, backend=args.backend, device=runtime.device)
        data = DataConfig.from_dict(checkpoint["data_config"])
        annotation_file = args.list or data.val_list
        loader, classes = make_loader(data, annotation_file, train=False, batch_size=args.batch_size,
                                      workers=args.workers, world_size=runtime.world_size, rank=runtime.rank,
                                      num_clips=args.clips, num_crops=args.crops)
        metrics = evaluate(model, loader, runtime, progress=runtime.is_main and not args.no_progress)
    if not runtime.is_main:
        return
    print(format_report(parameter_report(model)))
    print(f"{annotation_file}: {metrics['clips']} clips, {args.clips}×{args.crops} views: top-1 "
          f"{metrics['top1']:.4f}, top-5 {metrics['top5']:.4f}, mean per-class top-1 "
          f"{metrics['mean_class_accuracy']:.4f}, loss {metrics['loss']:.4f}")
    if metrics["unscorable"]:
        print(f"{len(metrics['unscorable'])} clips could not be read and are not scored:")
        for clip in metrics["unscorable"]:
            print(f"  {clip['reason']}")
    width = max(len(c) for c in classes)
    print("confusion matrix (rows: true class, columns: predicted):")
    for name, row in zip(classes, metrics["confusion"]):
        print(f"  {name:<{width}} " + " ".join(f"{n:>4}" for n in row))
    if args.json:
        Path(args.json).write_text(json.dumps({"list": annotation_file, "classes": classes, **metrics}, indent=2))


def _visualize(args) -> None:
    from .data.dataset import uniform_indices
    from .data.video_io import read_clip
    from .engine import load_checkpoint
    from .visualize import visualize_flow

    model, checkpoint = load_checkpoint(args.checkpoint, backend=args.backend)
    data = DataConfig.from_dict(checkpoint["data_config"])
    frames = args.num_frames or data.num_frames
    clip = read_clip(args.video, lambda total: uniform_indices(total, frames, train=False))
    path = visualize_flow(model, clip, args.out, image_size=data.image_size, mean=data.mean, std=data.std)
    print(f"wrote {path}")


def _demo(args) -> None:
    from .demo import run_demo

    run_demo(args.out, seeds=args.seeds, cameras=args.cameras, variants=args.variants, task=args.task,
             train_per_class=args.train_per_class, val_per_class=args.val_per_class,
             image_epochs=args.image_epochs, epochs=args.epochs, lr=args.lr, flow_norm=args.flow_norm, tpm=args.tpm,
             workers=args.workers, progress=not args.no_progress)


def _presets(args) -> None:
    from .build import build_model
    from .presets import describe

    if args.name is None:
        width = max(map(len, PRESETS))
        for preset in PRESETS.values():
            print(f"{preset.name:<{width}}  {preset.summary}")
        print("amflow presets NAME: what the paper specifies, what this package chose, the parameter counts")
        return
    preset = PRESETS[args.name]
    print(describe(preset))
    parsed = build_parser(preset.defaults).parse_args(["train", "--train-list", "-", "--val-list", "-", "--out", "-"])
    model = build_model(model_config(parsed, preset.num_classes))  # random weights: only the counts are wanted
    print(f"parameters of the preset's model with {preset.num_classes} classes (beside the reported size above):")
    print(format_report(parameter_report(model)))


def _synth(args) -> None:
    from .data.synthetic import generate_synthetic

    root = generate_synthetic(args.out, train_per_class=args.train_per_class, val_per_class=args.val_per_class,
                              num_frames=args.frames, size=args.size, task=args.task, camera=args.camera,
                              seed=args.seed)
    print(f"wrote the synthetic motion dataset to {root} (train.txt, val.txt, classes.txt)")


def _is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0"


# the exit status of a run stopped by SIGTERM (128 + 15, as a shell reports a process killed by it)
PREEMPTED_EXIT = 143


def main(argv: list[str] | None = None) -> int:
    from .data.video_io import ClipReadError
    from .preemption import Preempted

    args = build_parser().parse_args(argv)
    if args.command == "train" and args.preset:
        args = build_parser(PRESETS[args.preset].defaults).parse_args(argv)
    handlers = {"synth": _synth, "train": _train, "eval": _eval, "visualize": _visualize, "demo": _demo,
                "presets": _presets}
    try:
        handlers[args.command](args)
    except Preempted as stop:
        if _is_main_process():
            print(f"amflow {args.command}: {stop}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ValueError, TypeError, FileNotFoundError, ClipReadError) as error:
        where = f" (rank {os.environ['RANK']})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"amflow {args.command}{where}: error: {error}", file=sys.stderr)
        return 2
    return 0
