#!/usr/bin/env python
"""Crops per second of three ways to embed proposal crops with CLIP, on the same model, images and
boxes (each box at scales 1x and 1.5x):

  naive     per crop: a PIL crop, CLIP's own preprocess (clip.clip._transform) and a one-crop
            encode_image in CLIP's own precision (fp32 on the CPU, fp16 on CUDA, as clip.load
            gives it; measured on the first --naive-crops crops);
  pipeline  tools/precompute_clip_embeddings.py's path from image files + boxes to embeddings:
            images decoded once, crops on tensors (vild_d2.teacher.region_crops), batched encode
            in --precision (auto: bf16 on a CPU with bfloat16 units), scale ensemble;
  encoder   encode_image alone on ready-made batches of the same size, in the same precision.

Models: "teacher" (the embedded world's CLIP teacher; a random-weight model of its architecture
when the checkpoint is absent) and "vit_b32" (a random-weight ViT-B/32).

  python benchmarks/precompute.py --models teacher,vit_b32 --json out.json
  python benchmarks/precompute.py --device cuda --images 8 --proposals 64
  python benchmarks/precompute.py --precision fp32      # the pipeline without bfloat16
"""

import argparse
import copy
import json
import os
import tempfile
import time

import clip
import numpy as np
import torch
from clip.model import CLIP
from PIL import Image

from vild_d2.shapes_world.generator import WorldConfig, ensure_world
from vild_d2.distill.images import ImageReader, image_loader
from vild_d2.distill.region_encoder import RegionEncoder
from vild_d2.shapes_world import TeacherConfig, build_teacher_model
from vild_d2.teacher import load_clip
from vild_d2.teacher.loader import CLIP_MEAN, CLIP_STD, ClipInfo
from vild_d2.distill.region_crops import expand_boxes

SCALES = (1.0, 1.5)


def _info(model: CLIP, source: str) -> ClipInfo:
    return ClipInfo(
        source,
        "",
        int(model.visual.input_resolution),
        int(model.text_projection.shape[1]),
        int(model.context_length),
        CLIP_MEAN,
        CLIP_STD,
        None,
    )


def _model(name: str, teacher_path: str):
    if name == "vit_b32":
        torch.manual_seed(0)
        model = CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).float().eval()
        return model, _info(model, "random ViT-B/32"), "random-weight ViT-B/32"
    if name == "teacher":
        if os.path.isfile(teacher_path):
            model, info = load_clip(teacher_path)
            return model, info, teacher_path
        torch.manual_seed(0)
        model = build_teacher_model(TeacherConfig()).eval()
        return model, _info(model, "random teacher"), "random-weight teacher architecture"
    raise ValueError(f"unknown model '{name}'; use teacher or vit_b32")


def _world(tmp: str, num_images: int, proposals: int, seed: int = 0):
    cfg = WorldConfig(
        seed=seed,
        num_trainval=max(num_images, 2),
        num_test=2,
        num_teacher=0,
        num_teacher_val=0,
        image_size=160,
    )
    world = ensure_world(os.path.join(tmp, "shapes_ovd"), cfg, progress=False)
    rng = np.random.default_rng(seed)
    dicts, boxes = [], []
    for k in range(num_images):
        dicts.append(
            {
                "file_name": os.path.join(world, "JPEGImages", f"trainval_{k:06d}.jpg"),
                "image_id": f"trainval_{k:06d}",
            }
        )
        xy = rng.uniform(0, 140, size=(proposals, 2))
        wh = rng.uniform(8, 100, size=(proposals, 2))
        boxes.append(
            torch.tensor(np.concatenate([xy, np.minimum(xy + wh, 160)], 1), dtype=torch.float32)
        )
    return dicts, boxes


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


@torch.no_grad()
def _naive(encoder, info, dicts, boxes, device, limit):
    preprocess = clip.clip._transform(info.input_resolution)
    done = 0
    _sync(device)
    start = time.perf_counter()
    for d, b in zip(dicts, boxes):
        image = Image.open(d["file_name"]).convert("RGB")
        size = (image.height, image.width)
        for s in SCALES:
            for box in expand_boxes(b, s, size).tolist():
                encoder.encode(preprocess(image.crop(tuple(box)))[None])
                done += 1
                if done >= limit:
                    _sync(device)
                    return done / (time.perf_counter() - start)
    _sync(device)
    return done / (time.perf_counter() - start)


def _pipeline(encoder, dicts, boxes, device, num_workers):
    _sync(device)
    start = time.perf_counter()
    # pinned on CUDA, as the tool loads them, so that their copies to the device do not block
    loader = image_loader(dicts, ImageReader(), num_workers, pin=device.type == "cuda")
    images = [item["rgb"] for item in loader]
    encoder(images, boxes)
    _sync(device)
    return sum(len(b) for b in boxes) * len(SCALES) / (time.perf_counter() - start)


@torch.no_grad()
def _encoder(encoder, info, total, batch_size, device):
    dtype = torch.float16 if encoder.half else torch.float32
    layout = torch.channels_last if encoder.channels_last else torch.contiguous_format
    r = info.input_resolution
    batches = [
        torch.randn(min(batch_size, total - s), 3, r, r, device=device, dtype=dtype).contiguous(
            memory_format=layout
        )
        for s in range(0, total, batch_size)
    ]
    _sync(device)
    start = time.perf_counter()
    for x in batches:
        encoder.encode(x)
    _sync(device)
    return total / (time.perf_counter() - start)


def _batch_size(spec: str, model: str) -> int:
    """``spec`` is "256" or "teacher=256,vit_b32=32" (a model left out gets 256)."""
    if "=" not in spec:
        return int(spec)
    sizes = dict(item.split("=") for item in spec.split(",") if item)
    return int(sizes.get(model, 256))


def measure(name, args, dicts, boxes):
    device = torch.device(args.device)
    model, info, source = _model(name, args.teacher)
    # pipeline and encoder run the model as the tool does (NHWC for a ResNet tower, weights cast
    # for bf16); the naive way a copy in the precision clip.load gives
    batch_size = _batch_size(args.batch_size, name)
    naive = RegionEncoder(copy.deepcopy(model), info, SCALES, True, 1, device,
                          "fp16" if device.type == "cuda" else "fp32")
    encoder = RegionEncoder(model, info, SCALES, True, batch_size, device, args.precision)
    total = sum(len(b) for b in boxes) * len(SCALES)
    # one untimed pass of each warms up allocators and kernels
    _naive(naive, info, dicts[:1], boxes, device, 4)
    _pipeline(encoder, dicts[:1], boxes[:1], device, 0)
    results = {"naive": [], "pipeline": [], "encoder": []}
    for _ in range(args.repeats):
        results["naive"].append(_naive(naive, info, dicts, boxes, device, args.naive_crops))
        results["pipeline"].append(_pipeline(encoder, dicts, boxes, device, args.num_workers))
        results["encoder"].append(_encoder(encoder, info, total, batch_size, device))
    out = {k: float(np.median(v)) for k, v in results.items()}
    out["pipeline_over_naive"] = out["pipeline"] / out["naive"]
    out["pipeline_over_encoder"] = out["pipeline"] / out["encoder"]
    # each repeat's crops/s and its pipeline / encoder, taken back to back
    out["repeats"] = results
    out["pipeline_over_encoder_per_repeat"] = [
        p / e for p, e in zip(results["pipeline"], results["encoder"])
    ]
    out["precision"] = {"naive": naive.precision, "pipeline": encoder.precision}
    out["batch_size"] = batch_size
    print(f"{name} ({source}, {info.input_resolution} px, {args.device}, {total} crops; naive "
          f"{naive.precision}, pipeline and encoder {encoder.precision} in batches of "
          f"{batch_size}):")
    for k in ("naive", "pipeline", "encoder"):
        print(f"  {k:9s} {out[k]:10.1f} crops/s")
    print(f"  pipeline / naive   {out['pipeline_over_naive']:.2f}x")
    per_repeat = out["pipeline_over_encoder_per_repeat"]
    print(
        f"  pipeline / encoder {out['pipeline_over_encoder']:.2f}x (repeats "
        f"{min(per_repeat):.2f}x-{max(per_repeat):.2f}x)",
        flush=True,
    )
    return out


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="teacher,vit_b32", help="comma-separated: teacher, vit_b32")
    p.add_argument(
        "--teacher",
        default="datasets/shapes_ovd_teacher/clip_teacher.pt",
        help="the teacher checkpoint",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where to run")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="the pipeline's and bare encoder's (auto: fp16 on cuda, bf16 on a CPU with bfloat16 "
        "units, else fp32)",
    )
    p.add_argument(
        "--images", type=int, default=32, help="world images (160 px; the tool encodes 32 per chunk)"
    )
    p.add_argument("--proposals", type=int, default=64, help="random boxes per image")
    p.add_argument(
        "--batch-size",
        default="256",
        help="crops per encoder call: one number, or per model, e.g. teacher=256,vit_b32=32",
    )
    p.add_argument("--naive-crops", type=int, default=256, help="crops timed for the naive way")
    p.add_argument(
        "--num-workers", type=int, default=0, help="image-decoding workers of the pipeline"
    )
    p.add_argument("--repeats", type=int, default=3, help="timed repeats; the median is reported")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument(
        "--json",
        default="",
        help="write {model: {naive, pipeline, encoder, ratios, precision, repeats}} here",
    )
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        dicts, boxes = _world(tmp, args.images, args.proposals)
        results = {
            name: measure(name, args, dicts, boxes) for name in args.models.split(",") if name
        }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
