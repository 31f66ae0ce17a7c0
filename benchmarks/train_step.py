#!/usr/bin/env python
"""Seconds per training iteration, inference seconds per batch and peak memory of ViLD and
ViLD-ensemble against detectron2's stock Faster R-CNN with the same backbone, input and batch;
on the CPU also ViLD and ViLD-ensemble trained with SOLVER.CPU_BF16 (bfloat16 autocast) against
float32.

Each variant runs in its own process (so peak RSS is its own), on the same synthetic batch.

  python benchmarks/train_step.py --config-file configs/shapes_ovd/vild.yaml --iters 20
  python benchmarks/train_step.py ... --json out.json
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

VARIANTS = ("stock", "vild", "ensemble")
CPU_BF16_VARIANTS = ("vild_bf16", "ensemble_bf16")  # the training forward as SOLVER.CPU_BF16 runs it
NUM_CLASSES = 20


def _cfg(config_file, variant, text_path, num_classes, device):
    from detectron2.config import get_cfg

    from vild_d2 import add_vild_config

    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.MODEL.DEVICE = device
    cfg.MODEL.WEIGHTS = ""
    cfg.MODEL.VILD.TEXT_EMBEDDINGS_PATH = text_path
    # a 20-class vocabulary for every variant (the metadata of VOC's 20 classes; no data is read)
    cfg.DATASETS.TRAIN = ("voc_ovd_2007_trainval_all",)
    # Untrained heads score very differently: stock's near-uniform softmax leaves every box under
    # the default 0.05 threshold (no NMS work at all), ViLD's cosine / 0.01 logits do not. With no
    # threshold every variant post-processes the same boxes, so inference compares the models.
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = 0.0
    if variant == "stock":
        cfg.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
        cfg.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = num_classes
    else:
        cfg.MODEL.VILD.MODE = "vild" if variant.startswith("vild") else "ensemble"
    return cfg


def _batch(cfg, num_images, size, num_gt, num_distill, num_classes, dim, seed=0):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        image = (torch.rand(3, size, size, generator=g) * 255).to(torch.uint8)

        def boxes(n):
            xy = torch.rand(n, 2, generator=g) * size * 0.6
            wh = 8 + torch.rand(n, 2, generator=g) * size * 0.35
            return Boxes(torch.cat([xy, (xy + wh).clamp(max=size)], 1))

        inst = Instances((size, size))
        inst.gt_boxes = boxes(num_gt)
        inst.gt_classes = torch.randint(0, num_classes, (num_gt,), generator=g)
        distill = Instances((size, size))
        distill.proposal_boxes = boxes(num_distill)
        distill.clip_embeddings = torch.nn.functional.normalize(torch.randn(num_distill, dim, generator=g), dim=-1)
        distill.objectness = torch.rand(num_distill, generator=g)
        batch.append({"image": image, "height": size, "width": size, "instances": inst, "distill": distill})
    return batch


def _run_variant(args, variant, text_path):
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    import vild_d2  # noqa: F401
    from detectron2.modeling import build_model
    from detectron2.solver import build_optimizer
    from detectron2.utils.events import EventStorage

    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = _cfg(args.config_file, variant, text_path, NUM_CLASSES, args.device)
    model = build_model(cfg)
    optimizer = build_optimizer(cfg, model)
    dim = cfg.MODEL.VILD.EMBED_DIM
    batch = _batch(cfg, args.batch, args.size, 4, cfg.MODEL.VILD.DISTILL.NUM_PROPOSALS, NUM_CLASSES, dim)
    if variant == "stock":
        for x in batch:
            x.pop("distill")
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    model.train()
    train_model = model
    if variant.endswith("_bf16"):
        from vild_d2.engine.cpu_autocast import TrainingAutocast

        train_model = TrainingAutocast(model).train()
    times = []
    with EventStorage():
        for it in range(args.warmup + args.iters):
            sync()
            t0 = time.perf_counter()
            losses = train_model(batch)
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            sync()
            if it >= args.warmup:
                times.append(time.perf_counter() - t0)
    model.eval()
    inf = []
    with torch.no_grad():
        for it in range(args.warmup + args.iters):
            sync()
            t0 = time.perf_counter()
            model([{k: x[k] for k in ("image", "height", "width")} for x in batch])
            sync()
            if it >= args.warmup:
                inf.append(time.perf_counter() - t0)
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if args.device == "cuda"
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before) / 1024
    )
    return float(np.median(times)), float(np.median(inf)), peak


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", default="configs/shapes_ovd/vild.yaml", help="ViLD config whose backbone, input and heads are measured")
    p.add_argument("--iters", type=int, default=10, help="timed iterations per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed iterations first")
    p.add_argument("--batch", type=int, default=8, help="images per batch")
    p.add_argument("--size", type=int, default=160, help="image side in pixels")
    p.add_argument("--threads", type=int, default=2, help="torch threads")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--json", default="", help="write the ratios to this JSON file")
    p.add_argument("--child", nargs=2, metavar=("VARIANT", "TEXT_NPY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:  # one variant, in its own process so that its peak memory is its own
        print(json.dumps(_run_variant(args, *args.child)))
        return

    from detectron2.config import get_cfg

    from vild_d2 import add_vild_config

    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file(args.config_file)
    dim = cfg.MODEL.VILD.EMBED_DIM
    with tempfile.TemporaryDirectory() as tmp:
        text_path = os.path.join(tmp, "text.npy")
        rng = np.random.default_rng(0)
        np.save(text_path, rng.normal(size=(NUM_CLASSES, dim)).astype(np.float32))
        results = {}
        for name in VARIANTS + (CPU_BF16_VARIANTS if args.device == "cpu" else ()):
            out = subprocess.run(
                [sys.executable, __file__, *sys.argv[1:], "--child", name, text_path],
                check=True, stdout=subprocess.PIPE, text=True,
            ).stdout
            train_s, infer_s, peak = json.loads(out.strip().splitlines()[-1])
            results[name] = (train_s, infer_s, peak)
            print(f"{name:13s} train {train_s:.3f} s/iter   inference {infer_s:.3f} s/batch   peak +{peak:.0f} MiB", flush=True)
    stock = results["stock"]
    ratios = {
        "vild_over_stock": results["vild"][0] / stock[0],
        "ensemble_over_stock": results["ensemble"][0] / stock[0],
        "inference_vild_over_stock": results["vild"][1] / stock[1],
        "inference_ensemble_over_stock": results["ensemble"][1] / stock[1],
        "memory_vild_over_stock": results["vild"][2] / max(stock[2], 1e-6),
        "memory_ensemble_over_stock": results["ensemble"][2] / max(stock[2], 1e-6),
    }
    if args.device == "cpu":
        ratios["cpu_bf16_train_vild_over_fp32"] = results["vild_bf16"][0] / results["vild"][0]
        ratios["cpu_bf16_train_ensemble_over_fp32"] = results["ensemble_bf16"][0] / results["ensemble"][0]
    for k, v in ratios.items():
        print(f"{k:32s} {v:.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(ratios, f, indent=2)


if __name__ == "__main__":
    main()
