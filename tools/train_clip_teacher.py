#!/usr/bin/env python
"""Train the embedded world's CLIP teacher (OpenAI's CLIP architecture, trained from scratch).

Examples:
    python tools/train_clip_teacher.py
    python tools/train_clip_teacher.py --steps 200 --output-dir output/teacher_200 --force

The result, <output-dir>/clip_teacher.pt, loads with clip.load() and vild_d2.teacher.load_clip().
A teacher that is already complete for the same options and world is left alone (--force retrains).
"""

import argparse
import os
import sys
import warnings

# Import-time deprecation notices would bury the one-line errors this script prints.
warnings.filterwarnings("ignore", message=".*torch.jit.* is deprecated", category=FutureWarning)
warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*", category=UserWarning)

from detectron2.utils.logger import setup_logger  # noqa: E402

from vild_d2.data.datasets.builtin import datasets_root  # noqa: E402
from vild_d2.shapes_world import TeacherConfig, TeacherError, ensure_teacher  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_parser() -> argparse.ArgumentParser:
    d = TeacherConfig()
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add(
        "--world-dir",
        default=os.path.join(datasets_root(), "shapes_ovd"),
        help="the generated world (default: $DETECTRON2_DATASETS/shapes_ovd, else "
        "datasets/shapes_ovd)",
    )
    add(
        "--output-dir",
        default=os.path.join(datasets_root(), "shapes_ovd_teacher"),
        help="where clip_teacher.pt and manifest.json go (default: "
        "$DETECTRON2_DATASETS/shapes_ovd_teacher, else datasets/shapes_ovd_teacher)",
    )
    add("--seed", type=int, default=d.seed, help="random seed of initialisation and sampling")
    add("--steps", type=int, default=d.steps, help="training steps")
    add(
        "--max-seconds",
        type=float,
        default=d.max_seconds,
        help="stop training after this many seconds even if steps remain (default: no limit)",
    )
    add("--batch-size", type=int, default=d.batch_size, help="crops per step")
    add(
        "--crop-size",
        type=int,
        default=d.crop_size,
        help="crop side in pixels = the model's input resolution (a multiple of 32)",
    )
    add("--embed-dim", type=int, default=d.embed_dim, help="joint image-text embedding size")
    add(
        "--vision-layers",
        type=int,
        nargs=4,
        default=list(d.vision_layers),
        metavar="N",
        help="blocks in each of the 4 stages of CLIP's ResNet image tower",
    )
    add("--vision-width", type=int, default=d.vision_width, help="ResNet base width")
    add(
        "--text-width",
        type=int,
        default=d.text_width,
        help="text transformer width (a multiple of 64; one head per 64)",
    )
    add("--text-layers", type=int, default=d.text_layers, help="text transformer layers")
    add("--lr", type=float, default=d.lr, help="peak AdamW learning rate (cosine decay)")
    add("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay")
    add("--warmup-steps", type=int, default=d.warmup_steps, help="linear learning-rate warmup")
    add(
        "--box-jitter",
        type=float,
        default=d.box_jitter,
        help="random box shift and rescale, as a fraction of the box side",
    )
    add(
        "--context-range",
        type=float,
        nargs=2,
        default=list(d.context_range),
        metavar=("LO", "HI"),
        help="range of the random factor a training box is grown by around its centre",
    )
    add(
        "--templates",
        nargs="+",
        default=list(d.templates),
        help='caption templates, each with one "{}" for the class name',
    )
    add(
        "--background-name",
        default=d.background_name,
        help='caption name of the "none of the classes" concept learnt from random boxes off '
        'every object ("" disables it)',
    )
    add("--background-per-image", type=int, default=d.background_per_image,
        help="background boxes drawn per training image")
    add("--background-fraction", type=float, default=d.background_fraction,
        help="share of each batch's crops that are background")
    add("--other-objects-fraction", type=float, default=d.other_objects_fraction,
        help="share of each batch's crops taken from the world's objects of no class, captioned "
        "with their own names (0, the default: the classes only; 0.25 is the measured setting)")
    add("--num-threads", type=int, default=d.num_threads, help="torch CPU threads")
    add("--log-every", type=int, default=d.log_every, help="steps between progress lines")
    add("--force", action="store_true", help="retrain even if a matching teacher exists")
    return parser


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    setup_logger(name="vild_d2", abbrev_name="vild")
    try:
        cfg = TeacherConfig(
            seed=args.seed,
            steps=args.steps,
            max_seconds=args.max_seconds,
            batch_size=args.batch_size,
            crop_size=args.crop_size,
            embed_dim=args.embed_dim,
            vision_layers=tuple(args.vision_layers),
            vision_width=args.vision_width,
            text_width=args.text_width,
            text_layers=args.text_layers,
            lr=args.lr,
            weight_decay=args.weight_decay,
            warmup_steps=args.warmup_steps,
            box_jitter=args.box_jitter,
            context_range=tuple(args.context_range),
            templates=tuple(args.templates),
            background_name=args.background_name,
            background_per_image=args.background_per_image,
            background_fraction=args.background_fraction,
            other_objects_fraction=args.other_objects_fraction,
            num_threads=args.num_threads,
            log_every=args.log_every,
        )
        manifest = ensure_teacher(args.world_dir, args.output_dir, cfg, force=args.force)
    except (TeacherError, ValueError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    print(
        f"teacher: {os.path.join(args.output_dir, manifest['checkpoint'])}  held-out zero-shot "
        f"accuracy {manifest['heldout_accuracy_all']:.3f} (novel "
        f"{manifest['heldout_accuracy_novel']:.3f}) after {manifest['steps']} steps, "
        f"{manifest['training_seconds']:.0f}s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
