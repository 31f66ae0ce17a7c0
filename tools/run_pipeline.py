#!/usr/bin/env python
"""The main job on the embedded world (what `make demo` runs): build the world and its CLIP
teacher, train the stage-1 proposal detector, cache CLIP embeddings of its proposals, train
ViLD, ViLD-ensemble and an oracle, evaluate every method on base and novel classes, and write
results.json, results.md (with the command behind each row) and pictures. Each training, cache and
evaluation is a tools/train_net.py or tools/precompute_clip_embeddings.py command on a config of
configs/shapes_ovd/. A rerun skips every stage whose outputs are up to date.

  python tools/run_pipeline.py                      # the default world, output/shapes_ovd
  python tools/run_pipeline.py --quick --output-dir output/quick
  python tools/run_pipeline.py --seed 1 --novel-classes "red circle,green square,blue star,yellow triangle" \
      --output-dir output/shapes_ovd_s1
  python tools/run_pipeline.py --dataset voc --voc-root datasets --clip-model ViT-B/32 \
      --output-dir output/voc_pipeline                # Pascal VOC, the configs/voc_ovd recipe
Trailing KEY VALUE pairs override the config of every command.
"""
import argparse
import os
import sys

from detectron2.utils.logger import setup_logger

from vild_d2.utils import UserError, run_tool
from vild_d2.pipeline.run import PipelineOptions
from vild_d2.pipeline.shapes import ShapesPipeline
from vild_d2.pipeline.voc import VOCPipeline

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output-dir", default="output/shapes_ovd",
                   help="where results, models and logs go (default: the configs' own output folder)")
    p.add_argument("--seed", type=int, default=0, help="seed of the world, the teacher and training")
    p.add_argument("--novel-classes", default=None,
                   help='comma-separated world classes to hold out as novel (default: the 12/4 split '
                        'in vild_d2/data/metadata/shapes_ovd_12_4.json); each novel colour and shape '
                        'must appear in some base class')
    p.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (minutes)")
    p.add_argument("--datasets-dir", default="datasets", help="cache folder of worlds and teachers")
    p.add_argument("--stage1-iters", type=int, default=None,
                   help="shorten stage 1 to this many iterations (default: the config's schedule)")
    p.add_argument("--iters", type=int, default=None,
                   help="shorten each ViLD training to this many iterations (default: the config's)")
    p.add_argument("--teacher-other-objects", type=float, default=None, metavar="FRACTION",
                   help="share of the world teacher's batches taken from distractors captioned with "
                        "their own names (TeacherConfig.other_objects_fraction; default 0)")
    p.add_argument("--threads", type=int, default=2, help="CPU cores to use; parallel stages share them")
    p.add_argument("--parallel", type=int, default=3,
                   help="trainings run at once (each gets threads/parallel cores; 1: one by one)")
    p.add_argument("--dataset", choices=("shapes", "voc"), default="shapes",
                   help="shapes: the embedded world; voc: Pascal VOC under --voc-root")
    p.add_argument("--voc-root", default=None, help="folder holding VOC2007/ and VOC2012/ (--dataset voc)")
    p.add_argument("--voc-train", default="0712", help="VOC training images: 2007, 2012 or 0712 trainval")
    p.add_argument("--clip-model", default=None,
                   help="CLIP checkpoint for --dataset voc: an OpenAI name (ViT-B/32), an OpenAI .pt "
                        "archive or a state dict (the world always uses its own teacher)")
    p.add_argument("--configs-dir", default=os.path.join(os.path.dirname(HERE), "configs"),
                   help="the folder holding shapes_ovd/ and voc_ovd/ (default: the project's)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    novel = [c.strip() for c in args.novel_classes.split(",")] if args.novel_classes else None
    if len(args.opts) % 2:
        print(f"run_pipeline.py: error: config overrides come in KEY VALUE pairs, got {args.opts}",
              file=sys.stderr)
        return 2
    common = dict(output_dir=args.output_dir, seed=args.seed, novel_classes=novel,
                  datasets_dir=args.datasets_dir, threads=args.threads, parallel=args.parallel,
                  dataset=args.dataset, voc_root=args.voc_root, voc_train=args.voc_train,
                  clip_model=args.clip_model, opts=list(args.opts), tools_dir=HERE,
                  configs_dir=args.configs_dir)
    opts = PipelineOptions.quick_sizes(**common) if args.quick else PipelineOptions(**common)
    if args.stage1_iters:
        opts.stage1_iters = args.stage1_iters
    if args.iters:
        opts.iters = args.iters
    if args.teacher_other_objects is not None:
        opts.teacher = dict(opts.teacher, other_objects_fraction=args.teacher_other_objects)
    if args.dataset == "voc" and args.quick:
        opts.world, opts.teacher = {}, {}
    try:
        pipeline = (VOCPipeline if args.dataset == "voc" else ShapesPipeline)(opts)
    except ValueError as e:  # the world's and teacher's option checks
        raise UserError(str(e)) from None
    setup_logger(name="vild_d2", abbrev_name="vild")  # the teacher's progress lines
    pipeline.run()
    return 0


if __name__ == "__main__":
    sys.exit(run_tool(main, "run_pipeline.py"))
