#!/usr/bin/env python
"""Generate the embedded world (colour x shape classes, VOC format) used by the shapes_ovd datasets.

Examples:
    python datasets/prepare_shapes_ovd.py --preview shapes_preview.png
    python datasets/prepare_shapes_ovd.py --novel-classes "red circle,blue star" --force

A tree that is already complete for the same options is left alone (use --force to rebuild).
"""

import argparse
import sys
import warnings

# Import-time deprecation notices of torch and detectron2's dependencies would bury the one-line
# errors this script prints.
warnings.filterwarnings(
    "ignore", message=".*torch.jit.script.* is deprecated", category=FutureWarning
)
warnings.filterwarnings("ignore", message=".*pkg_resources is deprecated.*", category=UserWarning)

from vild_d2.shapes_world.generator import (  # noqa: E402
    WorldConfig,
    WorldError,
    default_world_dir,
    ensure_world,
    parse_class_list,
    save_preview,
)
from vild_d2.data.splits import SplitError  # noqa: E402


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # One line, no usage dump: callers read the reason from the last line of stderr.
        self.exit(2, f"{self.prog}: error: {message}\n")


def get_parser() -> argparse.ArgumentParser:
    d = WorldConfig()
    parser = _Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--output-dir",
        default=default_world_dir(),
        help="VOC root to create (default: $DETECTRON2_DATASETS/shapes_ovd, "
        "else datasets/shapes_ovd)",
    )
    parser.add_argument("--seed", type=int, default=d.seed, help="random seed of the whole world")
    parser.add_argument(
        "--num-trainval", type=int, default=d.num_trainval, help="detector training images"
    )
    parser.add_argument("--num-test", type=int, default=d.num_test, help="detector test images")
    parser.add_argument(
        "--num-teacher",
        type=int,
        default=d.num_teacher,
        help="images that only train the CLIP teacher (0 for none)",
    )
    parser.add_argument(
        "--num-teacher-val",
        type=int,
        default=d.num_teacher_val,
        help="images that only validate the CLIP teacher (0 for none)",
    )
    parser.add_argument(
        "--image-size", type=int, default=d.image_size, help="side of the square images in pixels"
    )
    parser.add_argument(
        "--max-objects", type=int, default=d.max_objects, help="most class objects in one image"
    )
    parser.add_argument(
        "--novel-classes",
        default=None,
        help='comma-separated classes to hold out, e.g. "red circle,blue star" '
        "(default: the novel classes of datasets/metadata/shapes_ovd_12_4.json)",
    )
    parser.add_argument(
        "--force", action="store_true", help="regenerate even if a matching tree exists"
    )
    parser.add_argument(
        "--preview",
        metavar="PNG",
        default=None,
        help="also save a grid of test images with their boxes and class names to this PNG",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv=None) -> int:
    parser = get_parser()
    args = parser.parse_args(argv)
    cfg = WorldConfig(
        seed=args.seed,
        num_trainval=args.num_trainval,
        num_test=args.num_test,
        num_teacher=args.num_teacher,
        num_teacher_val=args.num_teacher_val,
        image_size=args.image_size,
        max_objects=args.max_objects,
    )
    novel = None if args.novel_classes is None else parse_class_list(args.novel_classes)
    try:
        root = ensure_world(args.output_dir, cfg, novel, progress=not args.quiet, force=args.force)
    except (SplitError, WorldError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    if args.preview:
        save_preview(root, args.preview)
        print(f"preview: {args.preview}")
    print(f"shapes_ovd world: {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
