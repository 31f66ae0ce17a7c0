#!/usr/bin/env python
"""Write the open-vocabulary annotation files of COCO 48/17 and LVIS v1 (base = frequent + common).

The registered datasets (coco_ovd_*, lvis_v1_ovd_*) filter the original files when loaded; this
tool writes the same filtering to files, for users who prefer files (other tools, inspection).
Category and annotation ids are the original ones.

  tools/prepare_ovd_annotations.py coco     # coco/annotations/instances_{train2017_ovd_base,
                                            #   train2017_ovd_all,val2017_ovd}.json
  tools/prepare_ovd_annotations.py lvis     # lvis/lvis_v1_train_ovd_base.json
  tools/prepare_ovd_annotations.py coco --root /data --output-dir /tmp/ovd --split my_split.json

COCO files hold only the split's classes (base file: the 48 base classes; the others: all 65); the
validation file leaves out images with none of them. The LVIS base file is lvis_v1_train.json
without the annotations of rare categories (by the file's own ``frequency`` fields); its
categories and images are unchanged.
"""
import argparse
import json
import os
import sys

# (source under root, output name, subset, images without a kept class left out)
COCO_FILES = [
    ("coco/annotations/instances_train2017.json", "instances_train2017_ovd_base.json", "base", False),
    ("coco/annotations/instances_train2017.json", "instances_train2017_ovd_all.json", "all", False),
    ("coco/annotations/instances_val2017.json", "instances_val2017_ovd.json", "all", True),
]
LVIS_FILES = [("lvis/lvis_v1_train.json", "lvis_v1_train_ovd_base.json")]


class PrepareError(RuntimeError):
    pass


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("benchmark", choices=("coco", "lvis"), help="which files to write")
    p.add_argument("--root", default=os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")),
                   help="the folder holding coco/ and lvis/ (default: $DETECTRON2_DATASETS or datasets)")
    p.add_argument("--output-dir", default="", help="where to write (default: beside each source file)")
    p.add_argument("--split", default="coco_48_17",
                   help="COCO split: a name under datasets/metadata/ or a JSON path")
    return p.parse_args(argv)


def read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise PrepareError(f"{path} does not exist; lay out COCO and LVIS as datasets/README.md says, "
                           "or pass --root (or set $DETECTRON2_DATASETS) to the folder holding them")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise PrepareError(f"{path} is not valid JSON ({e}); download the file again") from None


def _destination(source: str, name: str, output_dir: str) -> str:
    return os.path.join(output_dir or os.path.dirname(source), name)


def prepare_coco(root: str, output_dir: str, split: str):
    from vild_d2.data.datasets import filter_coco_ovd_json
    from vild_d2.utils import write_json

    loaded = {}
    for rel, name, subset, drop_empty in COCO_FILES:
        source = os.path.join(root, rel)
        if source not in loaded:
            loaded = {source: read_json(source)}  # one source in memory at a time
        out = filter_coco_ovd_json(loaded[source], split, subset, drop_empty, where=source)
        path = _destination(source, name, output_dir)
        write_json(path, out, indent=None)
        yield path, out


def prepare_lvis(root: str, output_dir: str):
    from vild_d2.data.datasets import filter_lvis_base_json
    from vild_d2.utils import write_json

    for rel, name in LVIS_FILES:
        source = os.path.join(root, rel)
        out = filter_lvis_base_json(read_json(source), where=source)
        path = _destination(source, name, output_dir)
        write_json(path, out, indent=None)
        yield path, out


def main(argv=None):
    args = parse_args(argv)
    from vild_d2.data.datasets import DatasetError
    from vild_d2.data.splits import SplitError

    try:
        if args.benchmark == "coco":
            written = prepare_coco(args.root, args.output_dir, args.split)
        else:
            written = prepare_lvis(args.root, args.output_dir)
        for path, data in written:
            print(f"{path}: {len(data['images'])} images, {len(data['annotations'])} annotations, "
                  f"{len(data['categories'])} categories")
    except (PrepareError, DatasetError, SplitError) as e:
        print(f"prepare_ovd_annotations.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
