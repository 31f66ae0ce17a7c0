#!/usr/bin/env python
"""Read every image and annotation of registered datasets once and report every problem, with the
file it is in, in one summary: a missing or undecodable image, an image whose size is not the
annotated one, an empty box or one outside its image, an annotation file the registration refuses.

  python tools/check_dataset.py --config-file configs/voc_ovd/vild.yaml      # DATASETS.TRAIN and TEST
  python tools/check_dataset.py --config-file configs/coco_ovd/vild.yaml --dataset coco_ovd_val

Exit status: 0 when nothing is wrong, 1 when something is, 2 for a bad command line or config.
"""
import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="a config naming the datasets (DATASETS.TRAIN, TEST)")
    p.add_argument("--dataset", default="", help="dataset name(s), comma-separated (default: the config's)")
    p.add_argument("--max-listed", type=int, default=50, help="problems listed one by one (all are counted)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from detectron2.data import DatasetCatalog
    from tqdm import tqdm

    import vild_d2  # noqa: F401  (registers the datasets)
    from vild_d2.data.checks import image_problems
    from vild_d2.engine import load_cfg
    from vild_d2.utils import UserError

    cfg = load_cfg(args.config_file, args.opts)
    names = [n.strip() for n in args.dataset.split(",") if n.strip()] or [*cfg.DATASETS.TRAIN, *cfg.DATASETS.TEST]
    problems, images = [], 0
    for name in dict.fromkeys(names):
        if name not in DatasetCatalog.list():
            problems.append(f"{name}: not a registered dataset")
            continue
        try:
            dicts = DatasetCatalog.get(name)
        except UserError as e:  # the registration's own one-line refusal (an annotation file, a tree)
            problems.append(f"{name}: {e}")
            continue
        images += len(dicts)
        for d in tqdm(dicts, desc=name, unit="img", file=sys.stderr):
            problems.extend(image_problems(d))
    for line in problems[: args.max_listed]:
        print(line)
    if len(problems) > args.max_listed:
        print(f"... and {len(problems) - args.max_listed} more")
    print(f"{images} images of {', '.join(dict.fromkeys(names))}: "
          f"{len(problems)} problem(s)" + ("" if problems else ", all good"))
    return 1 if problems else 0


if __name__ == "__main__":
    from vild_d2.utils import run_tool

    sys.exit(run_tool(main, "check_dataset.py"))
