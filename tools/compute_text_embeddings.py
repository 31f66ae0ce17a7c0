#!/usr/bin/env python
"""Prompt-ensemble CLIP text embeddings for any class names, saved as .npy (+ a .json of names).

The file can be given to MODEL.VILD.TEXT_EMBEDDINGS_PATH; rows are looked up by class name, so
one file serves the base training vocabulary and the full test vocabulary. A file written before
for the same checkpoint, templates and names is kept as it is.

  python tools/compute_text_embeddings.py --clip-model ViT-B/32 --names "car,dog,sofa" --output voc.npy
  python tools/compute_text_embeddings.py --clip-model ViT-B/32 --names lvis --output lvis.npy
  python tools/compute_text_embeddings.py --clip-model datasets/shapes_ovd_teacher --names names.txt --output s.npy
"""
import argparse
import json
import os
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip-model", required=True, help="CLIP checkpoint: a model name, a .pt archive, a state dict or the teacher")
    p.add_argument("--names", required=True,
                   help="comma-separated class names, a file with one per line, or a preset: "
                        "coco (the 80 COCO classes), lvis (the 1203 LVIS v1 classes)")
    p.add_argument("--templates", default="", help='prompt templates separated by "|" (default: the checkpoint\'s or the project\'s list)')
    p.add_argument("--output", required=True, help="the .npy to write (a .json of the names is written beside it)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from vild_d2.data.vocabularies import preset_names
    from vild_d2.teacher import load_clip
    from vild_d2.teacher.templates import DEFAULT_TEMPLATES
    from vild_d2.teacher.text_embeddings import encode_class_names, save_text_embeddings

    if os.path.isfile(args.names):
        with open(args.names) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = preset_names(args.names) or [n.strip() for n in args.names.split(",") if n.strip()]
    if not names or not args.output.endswith(".npy"):
        print("compute_text_embeddings.py: error: give at least one name and an --output ending in .npy",
              file=sys.stderr)
        return 2
    model, info = load_clip(args.clip_model)
    templates = [t for t in args.templates.split("|") if t] or list(info.templates or DEFAULT_TEMPLATES)
    sidecar = args.output[:-4] + ".json"
    key = {"fingerprint": info.fingerprint, "templates": templates, "names": names}
    if os.path.isfile(args.output) and os.path.isfile(sidecar):
        with open(sidecar) as f:
            written = json.load(f)
        if all(written.get(k) == v for k, v in key.items()):
            print(f"{len(names)} classes: {args.output} is up to date")
            return 0
    emb = encode_class_names(model, names, templates).numpy()
    save_text_embeddings(args.output, emb, {"clip": args.clip_model, **key})
    print(f"{len(names)} classes x {emb.shape[1]} dims -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
