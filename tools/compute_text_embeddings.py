#!/usr/bin/env python
"""Prompt-ensemble CLIP text embeddings for any class names, saved as .npy (+ a .json record of the
names, prompts and checkpoint): the embeddings training computes for the same checkpoint, prompts
and names.

The file can be given to MODEL.VILD.TEXT_EMBEDDINGS_PATH; rows are looked up by class name, so
one file serves the base training vocabulary and the full test vocabulary. A file written before
for the same checkpoint, prompts and names is kept as it is.

  python tools/compute_text_embeddings.py --clip-model ViT-B/32 --names "car,dog,sofa" --output voc.npy
  python tools/compute_text_embeddings.py --clip-model ViT-B/32 --names lvis --synonyms --output lvis.npy
  python tools/compute_text_embeddings.py --clip-model datasets/shapes_ovd_teacher --names names.txt \
      --templates "" --output s.npy          # the teacher's own templates
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
    p.add_argument("--templates", default="vild",
                   help='MODEL.VILD.PROMPT_TEMPLATES as one string: a set ("vild", the default), '
                        'templates separated by "|", or "" for the checkpoint\'s own')
    p.add_argument("--synonyms", action="store_true",
                   help="average each class's synonyms into its embedding (the lvis preset has them; "
                        "MODEL.VILD.TEXT_SYNONYMS True)")
    p.add_argument("--output", required=True, help="the .npy to write (a .json record is written beside it)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from vild_d2.data.vocabularies import preset_names, preset_synonyms
    from vild_d2.teacher.text_embeddings import (compute_text_embeddings, save_text_embeddings,
                                                 text_embedding_record)

    synonyms = None
    if os.path.isfile(args.names):
        with open(args.names) as f:
            names = [line.strip() for line in f if line.strip()]
    else:
        names = preset_names(args.names) or [n.strip() for n in args.names.split(",") if n.strip()]
        synonyms = preset_synonyms(args.names) if args.synonyms else None
    if not names or not args.output.endswith(".npy"):
        print("compute_text_embeddings.py: error: give at least one name and an --output ending in .npy",
              file=sys.stderr)
        return 2
    if args.synonyms and synonyms is None:
        print(f"compute_text_embeddings.py: error: --synonyms needs a preset that has them (lvis), "
              f"not {args.names!r}", file=sys.stderr)
        return 2
    spec = [t for t in args.templates.split("|") if t]
    try:
        record, model = text_embedding_record(args.clip_model, names, spec, synonyms)
    except ValueError as e:
        print(f"compute_text_embeddings.py: error: {e}", file=sys.stderr)
        return 2
    sidecar = args.output[:-4] + ".json"
    if os.path.isfile(args.output) and os.path.isfile(sidecar):
        with open(sidecar) as f:
            written = json.load(f)
        if all(written.get(k) == v for k, v in record.items() if k != "clip"):
            print(f"{len(names)} classes: {args.output} is up to date")
            return 0
    emb = compute_text_embeddings(record, model)
    save_text_embeddings(args.output, emb, record)
    print(f"{len(names)} classes x {emb.shape[1]} dims -> {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
