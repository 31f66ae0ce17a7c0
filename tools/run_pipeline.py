#!/usr/bin/env python
"""The main job on the embedded world (what `make demo` runs): build the world and its CLIP
teacher, train the stage-1 proposal detector, cache CLIP embeddings of its proposals, train
ViLD, ViLD-ensemble and an oracle, evaluate every method on base and novel classes, and write
results.json, results.md and pictures. A rerun skips every stage whose outputs are up to date.

  python tools/run_pipeline.py                      # the default world, output/demo
  python tools/run_pipeline.py --quick --output-dir output/quick
  python tools/run_pipeline.py --novel-classes "red circle,green square,blue star,yellow triangle"
"""
import argparse
import sys

from vild_d2.data.splits import SplitError
from vild_d2.pipeline.run import PipelineOptions, ShapesPipeline


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="output/demo", help="where results, models and logs go")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the teacher and training")
    p.add_argument("--novel-classes", default=None,
                   help='comma-separated world classes to hold out as novel (default: the 12/4 split '
                        'in datasets/metadata/shapes_ovd_12_4.json); each novel colour and shape must '
                        'appear in some base class')
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (minutes)")
    p.add_argument("--datasets-dir", default="datasets", help="cache folder of worlds and teachers")
    p.add_argument("--stage1-iters", type=int, default=None, help="stage-1 training iterations")
    p.add_argument("--iters", type=int, default=None, help="iterations of each ViLD training")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    novel = [c.strip() for c in args.novel_classes.split(",")] if args.novel_classes else None
    common = dict(output_dir=args.output_dir, seed=args.seed, novel_classes=novel,
                  datasets_dir=args.datasets_dir, threads=args.threads)
    opts = PipelineOptions.quick_sizes(**common) if args.quick else PipelineOptions(**common)
    if args.stage1_iters:
        opts.stage1_iters = args.stage1_iters
    if args.iters:
        opts.iters = args.iters
    try:
        pipeline = ShapesPipeline(opts)
    except (SplitError, ValueError) as e:
        print(f"run_pipeline.py: error: {e}", file=sys.stderr)
        return 2
    pipeline.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
