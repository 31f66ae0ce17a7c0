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


IMAGE_EXTENSIONS = ("jpg", "jpeg", "png")


def names_from(spec: str, what: str):
    """Names given inline (comma-separated) or in a file of one name per line."""
    from vild_d2.utils import UserError

    if os.path.isfile(spec):
        with open(spec) as f:
            return [line.strip() for line in f if line.strip()]
    if os.sep in spec or spec.endswith(".txt"):
        raise UserError(f"{what} file {spec} does not exist; pass a file of one name per line, or the "
                        "names themselves separated by commas")
    return [n.strip() for n in spec.split(",") if n.strip()]


def list_images(inputs):
    """Every image of ``inputs`` (files, folders), each checked to decode before anything runs."""
    from PIL import Image

    from vild_d2.utils import UserError

    files = []
    for path in inputs:
        if os.path.isdir(path):
            found = sorted(f for ext in IMAGE_EXTENSIONS for f in glob.glob(os.path.join(path, f"*.{ext}")))
            if not found:
                raise UserError(f"input folder {path} holds no {'/'.join(IMAGE_EXTENSIONS)} image")
            files += found
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise UserError(f"input {path} does not exist; pass image files or folders")
    for path in files:
        try:
            with Image.open(path) as im:
                im.load()
        except Exception as e:  # PIL raises many types for files it cannot decode
            raise UserError(f"input {path} is not an image that decodes ({type(e).__name__}); "
                            "pass image files only") from None
    return files


def check_weights(path: str) -> None:
    """The checkpoint must hold a ViLD text head (a stage-1 detector's has none)."""
    from vild_d2.checkpoint import checkpoint_damage
    from vild_d2.utils import UserError

    if not os.path.isfile(path):
        raise UserError(f"weights {path} do not exist; train a model first")
    why = checkpoint_damage(path)
    if why:
        raise UserError(f"weights {path} {why}; pass a sound checkpoint")
    model = torch.load(path, map_location="cpu", weights_only=False).get("model", {})
    if "roi_heads.box_predictor.projection.weight" not in model:
        raise UserError(f"weights {path} hold no ViLD text head (a stage-1 or plain detector's?); "
                        "pass a model trained with a ViLD config (configs/*/vild*.yaml)")


def main(argv=None):
    args = parse_args(argv)
    from detectron2.data.detection_utils import read_image
    from detectron2.utils.visualizer import Visualizer

    import vild_d2  # noqa: F401
    from vild_d2.engine import OVDPredictor, load_cfg
    from vild_d2.utils import UserError

    torch.set_num_threads(2)
    vocabulary = names_from(args.vocabulary, "vocabulary")
    attributes = names_from(args.attributes, "attributes") if args.attributes else []
    novel = names_from(args.novel, "novel-class") if args.novel else []
    if not vocabulary:
        raise UserError("--vocabulary is empty; give at least one class name")
    unknown = [n for n in novel if n not in vocabulary]
    if unknown:
        raise UserError(f"--novel names {unknown} are not in the vocabulary; name classes of --vocabulary")
    images = list_images(args.input)[: args.max_images or None]
    cfg = load_cfg(args.config_file, ["MODEL.WEIGHTS", args.weights, *args.opts])
    check_weights(args.weights)
    predictor = OVDPredictor(cfg, vocabulary, novel, attributes)  # refuses names too long for CLIP
    os.makedirs(args.output, exist_ok=True)
    for path in images:
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
    from vild_d2.utils import run_tool

    sys.exit(run_tool(main, "demo.py"))
