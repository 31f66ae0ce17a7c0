#!/usr/bin/env python
"""Precompute the CLIP embeddings of stage-1 proposals (1x and 1.5x crops) into an embedding cache
for ViLD-image training. Resumable: run the same command again after an interruption.

  tools/precompute_clip_embeddings.py --config-file configs/shapes_ovd/stage1_proposals.yaml \\
      MODEL.WEIGHTS output/shapes_ovd/stage1/model_final.pth
  tools/precompute_clip_embeddings.py --config-file ... --num-gpus 8     # one process per GPU
  tools/precompute_clip_embeddings.py --config-file ... --dataset voc_ovd_0712_trainval_base \\
      --clip-model ViT-B/32 --num-proposals 300 --crop-scales 1.0,1.5 --output-dir out/cache

Defaults: datasets DATASETS.TRAIN, CLIP model MODEL.VILD.CLIP_MODEL, the rest MODEL.VILD.DISTILL.
Then train with MODEL.VILD.DISTILL.CACHE_DIR set to the printed directory.

Images are processed in chunks of --chunk-size consecutive images, one part file each; a rerun
skips the finished ones, and the cache is the same whatever the number of processes or restarts
(for the same chunk and batch sizes, which decide how crops are batched through the encoder).
With several machines the output directory must be on a filesystem they share.
"""

import logging
import os
import sys

import torch
from detectron2.engine import default_argument_parser
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

import vild_d2  # noqa: F401  (registers datasets)
from vild_d2.engine import load_cfg
from vild_d2.engine.launch import launch
from vild_d2.utils import run_tool
from vild_d2.distill.precompute import PrecomputeOptions, run_precompute

logger = logging.getLogger("vild_d2")


def setup_cfg(args):
    cfg = load_cfg(args.config_file, args.opts)
    if not cfg.MODEL.WEIGHTS:
        trained = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if os.path.isfile(trained):
            logger.info(f"MODEL.WEIGHTS is empty: using the stage-1 model {trained}")
            cfg.MODEL.WEIGHTS = trained
    cfg.freeze()
    return cfg


def options(cfg, args) -> PrecomputeOptions:
    distill = cfg.MODEL.VILD.DISTILL
    datasets = args.dataset.split(",") if args.dataset else list(cfg.DATASETS.TRAIN)
    scales = args.crop_scales.split(",") if args.crop_scales else distill.CROP_SCALES
    return PrecomputeOptions(
        datasets=tuple(d.strip() for d in datasets if d.strip()),
        clip_model=args.clip_model or cfg.MODEL.VILD.CLIP_MODEL,
        num_proposals=args.num_proposals or distill.NUM_PROPOSALS,
        crop_scales=tuple(float(s) for s in scales),
        min_box_size=distill.MIN_BOX_SIZE if args.min_box_size is None else args.min_box_size,
        ensemble_crops=distill.ENSEMBLE_CROPS,
        batch_size=args.batch_size or distill.CROP_BATCH_SIZE,
        chunk_size=args.chunk_size,
        num_workers=cfg.DATALOADER.NUM_WORKERS if args.num_workers is None else args.num_workers,
        config_file=args.config_file,
        output_dir=args.output_dir,
        precision=args.precision or distill.PRECISION,
    )


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    setup_logger(distributed_rank=comm.get_rank(), name="detectron2", abbrev_name="d2")
    setup_logger(distributed_rank=comm.get_rank(), name="vild_d2")
    cfg = setup_cfg(args)
    result = run_precompute(cfg, options(cfg, args))
    if not comm.is_main_process():
        return
    if result["status"] == "complete":
        print(f"embedding cache already complete: {result['output_dir']}")
    else:
        s = max(result["seconds"], 1e-9)
        print(
            f"{result['images']} images, {result['proposals']} proposals, {result['crops']} crops "
            f"in {s:.1f} s: {result['images'] / s:.2f} images/s, {result['proposals'] / s:.1f} "
            f"proposals/s, {result['crops'] / s:.1f} crops/s; {result['bytes'] / 2**20:.2f} MiB "
            "written"
        )
        print(f"embedding cache: {result['output_dir']}")
    print(f"train with MODEL.VILD.DISTILL.CACHE_DIR {result['output_dir']}")


def argument_parser():
    parser = default_argument_parser()
    parser.add_argument(
        "--dataset", default="", help="dataset name(s), comma-separated (default: DATASETS.TRAIN)"
    )
    parser.add_argument(
        "--clip-model", default="", help="CLIP spec (default: MODEL.VILD.CLIP_MODEL)"
    )
    parser.add_argument(
        "--num-proposals",
        type=int,
        default=0,
        help="proposals M kept per image (default: MODEL.VILD.DISTILL.NUM_PROPOSALS)",
    )
    parser.add_argument(
        "--crop-scales",
        default="",
        help="comma-separated crop scales, e.g. 1.0,1.5 (default: MODEL.VILD.DISTILL.CROP_SCALES)",
    )
    parser.add_argument(
        "--min-box-size",
        type=float,
        default=None,
        help="drop proposals with a side under this many pixels "
        "(default: MODEL.VILD.DISTILL.MIN_BOX_SIZE)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="crops per CLIP encoder call (default: MODEL.VILD.DISTILL.CROP_BATCH_SIZE)",
    )
    parser.add_argument(
        "--chunk-size", type=int, default=32, help="images per resumable chunk (one part file each)"
    )
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="image-decoding worker processes per process (default: DATALOADER.NUM_WORKERS)",
    )
    parser.add_argument(
        "--output-dir",
        default="",
        help="cache directory (default: <OUTPUT_DIR>/clip_cache/<datasets>-<key hash>)",
    )
    parser.add_argument(
        "--precision",
        default="",
        choices=("", "auto", "fp32", "bf16", "fp16"),
        help="CLIP encoder arithmetic (default: MODEL.VILD.DISTILL.PRECISION; auto: fp16 on CUDA, "
        "bf16 on CPUs with bfloat16 units, else fp32)",
    )
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)"
    )
    return parser


if __name__ == "__main__":
    args = argument_parser().parse_args()
    sys.exit(run_tool(lambda: launch(main, args.num_gpus, num_machines=args.num_machines,
                                     machine_rank=args.machine_rank, dist_url=args.dist_url,
                                     args=(args,)), "precompute_clip_embeddings.py"))
