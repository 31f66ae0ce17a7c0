#!/usr/bin/env python
"""Detect any vocabulary with a trained ViLD model, without retraining, and save pictures.

  python tools/demo.py --config-file configs/shapes_ovd/vild.yaml \
      --weights output/demo/vild/model_final.pth --input datasets/shapes_ovd/JPEGImages \
      --vocabulary "red circle,blue star,green triangle" --output output/demo_pictures
  # vocabulary expansion with attributes: objects x attributes, p(object) * p(attribute)
  python tools/demo.py ... --vocabulary "circle,square,triangle,star" --attributes "red,green,blue,yellow"
"""
import argparse
import glob
import os
import sys

import torch


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="the config the model was trained with")
    p.add_argument("--weights", required=True, help="trained model (.pth)")
    p.add_argument("--input", nargs="+", required=True, help="images, or folders of images")
    p.add_argument("--output", required=True, help="folder for the annotated pictures")
    p.add_argument("--vocabulary", required=True,
                   help='comma-separated class names, or a file with one name per line')
    p.add_argument("--novel", default="", help="comma-separated names of the vocabulary to treat as novel")
    p.add_argument("--attributes", default="",
                   help="comma-separated attributes (or a file): label detections '<attribute> <object>'")
    p.add_argument("--score-thresh", type=float, default=0.3, help="lowest score drawn")
    p.add_argument("--max-images", type=int, default=0, help="stop after this many images (0: all)")
    p.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides, KEY VALUE ...")
    return p.parse_args(argv)


def names_from(spec: str):
    if os.path.isfile(spec):
        with open(spec) as f:
            return [line.strip() for line in f if line.strip()]
    return [n.strip() for n in spec.split(",") if n.strip()]


def list_images(inputs):
    files = []
    for path in inputs:
        if os.path.isdir(path):
            files += sorted(f for ext in ("jpg", "jpeg", "png") for f in glob.glob(os.path.join(path, f"*.{ext}")))
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise FileNotFoundError(f"input {path} does not exist; pass image files or folders")
    return files


def main(argv=None):
    args = parse_args(argv)
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer

    import vild_d2  # noqa: F401
    from vild_d2.engine import OVDPredictor, load_cfg

    torch.set_num_threads(2)
    try:
        vocabulary = names_from(args.vocabulary)
        attributes = names_from(args.attributes) if args.attributes else []
        images = list_images(args.input)
        if not vocabulary:
            raise ValueError("--vocabulary is empty; give at least one class name")
        cfg = load_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
        if not os.path.isfile(args.weights):
            raise FileNotFoundError(f"weights {args.weights} do not exist; train a model first")
    except (ValueError, FileNotFoundError) as e:
        print(f"demo.py: error: {e}", file=sys.stderr)
        return 2
    predictor = OVDPredictor(cfg, vocabulary, names_from(args.novel) if args.novel else [], attributes)
    os.makedirs(args.output, exist_ok=True)
    for i, path in enumerate(images[: args.max_images or None]):
        image = read_image(path, format="BGR")  # DefaultPredictor's input
        out = predictor(image)
        inst = out["instances"].to("cpu")
        keep = (inst.scores >= args.score_thresh).nonzero().flatten().tolist()
        labels = [f"{out['labels'][k]} {inst.scores[k]:.2f}" for k in keep]
        vis = Visualizer(image[:, :, ::-1], scale=2.0)
        vis.overlay_instances(boxes=inst.pred_boxes[keep], labels=labels)
        target = os.path.join(args.output, os.path.splitext(os.path.basename(path))[0] + ".png")
        vis.get_output().save(target)
        print(f"{path}: {len(keep)} detections -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
