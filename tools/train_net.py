#!/usr/bin/env python
"""Train or evaluate a ViLD detector (or the stage-1 proposal detector) with detectron2.

  tools/train_net.py --config-file configs/shapes_ovd/vild.yaml
  tools/train_net.py --config-file configs/shapes_ovd/vild.yaml --eval-only MODEL.WEIGHTS out/model_final.pth
  tools/train_net.py --config-file ... --num-gpus 8            # one process per GPU (gloo on CPU)
"""
import sys

import torch
from detectron2.engine import default_argument_parser

import vild_d2  # noqa: F401  (registers datasets, heads and the meta-architecture)
from vild_d2.checkpoint import VerifiedCheckpointer
from vild_d2.engine import ViLDTrainer, setup_cfg
from vild_d2.engine.launch import launch
from vild_d2.utils import run_tool


def main(args):
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = setup_cfg(args)
    if args.eval_only:
        model = ViLDTrainer.build_model(cfg)
        VerifiedCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume
        )
        return ViLDTrainer.test(cfg, model)
    trainer = ViLDTrainer(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


if __name__ == "__main__":
    parser = default_argument_parser()
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    args = parser.parse_args()
    sys.exit(run_tool(lambda: launch(main, args.num_gpus, num_machines=args.num_machines,
                                     machine_rank=args.machine_rank, dist_url=args.dist_url,
                                     args=(args,)), "train_net.py"))
