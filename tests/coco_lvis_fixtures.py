"""A tiny COCO 2017 + LVIS v1 tree written inside tests: real category lists, a few random images.

Layout as under $DETECTRON2_DATASETS:
  coco/{train2017,val2017}/*.jpg, coco/annotations/instances_{train,val}2017.json,
  lvis/lvis_v1_{train,val}.json (the same images, found through coco_url).
"""
import json
import os

import numpy as np
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from PIL import Image

W, H = 96, 80

# image id -> [(class name, (x, y, w, h))]; COCO names, LVIS names (with "_") below
COCO_TRAIN = {
    1: [("person", (5, 5, 30, 50)), ("dog", (40, 30, 40, 40)), ("stop sign", (70, 2, 20, 20))],
    2: [("car", (10, 40, 50, 30)), ("umbrella", (60, 5, 30, 30))],
    3: [("dog", (20, 20, 50, 40))],  # only novel: empty in the base set
    4: [("person", (50, 10, 30, 60)), ("bicycle", (5, 30, 40, 40))],
}
COCO_VAL = {
    11: [("person", (5, 5, 30, 50)), ("dog", (45, 25, 40, 45))],
    12: [("car", (2, 40, 50, 30)), ("umbrella", (55, 5, 30, 30)), ("bicycle", (50, 45, 40, 30))],
    13: [("stop sign", (30, 20, 30, 30))],  # none of the 65 classes: not in the validation set
}
LVIS_TRAIN = {
    1: [("apple", (5, 5, 30, 30)), ("applesauce", (40, 30, 40, 40))],
    2: [("aerosol_can", (10, 40, 20, 30)), ("alarm_clock", (60, 5, 30, 30))],
    3: [("apricot", (20, 20, 50, 40))],
    4: [("apple", (50, 10, 30, 30)), ("aerosol_can", (5, 30, 40, 40))],
}
LVIS_VAL = {
    11: [("apple", (5, 5, 30, 50)), ("applesauce", (45, 25, 40, 45))],
    12: [("aerosol_can", (2, 40, 50, 30)), ("apricot", (55, 5, 30, 30)), ("alarm_clock", (50, 45, 40, 30))],
    13: [("apple", (30, 20, 30, 30))],
}
LVIS_FREQUENCY = {c["name"]: c["frequency"] for c in LVIS_CATEGORIES}


def _box_polygon(x, y, w, h):
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _images(root, folder, ids, rng):
    os.makedirs(os.path.join(root, "coco", folder), exist_ok=True)
    out = []
    for i in ids:
        name = f"{i:012d}.jpg"
        pixels = rng.integers(0, 255, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "coco", folder, name))
        out.append({"id": i, "file_name": name, "width": W, "height": H,
                    "coco_url": f"http://images.cocodataset.org/{folder}/{name}",
                    "neg_category_ids": [], "not_exhaustive_category_ids": []})
    return out


def _annotations(images, categories):
    ids = {c["name"]: c["id"] for c in categories}
    anns = []
    for image_id, objects in images.items():
        for name, (x, y, w, h) in objects:
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": ids[name],
                         "bbox": [x, y, w, h], "area": float(w * h), "iscrowd": 0,
                         "segmentation": _box_polygon(x, y, w, h)})
    return anns


def _write(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def write_coco_lvis_tree(root, seed=0):
    """Write the tree under ``root``; returns ``root``."""
    rng = np.random.default_rng(seed)
    coco_cats = [{"id": c["id"], "name": c["name"], "supercategory": "thing"}
                 for c in COCO_CATEGORIES if c["isthing"]]
    lvis_cats = [dict(c, image_count=1, instance_count=1) for c in LVIS_CATEGORIES]
    for folder, coco, lvis in (("train2017", COCO_TRAIN, LVIS_TRAIN), ("val2017", COCO_VAL, LVIS_VAL)):
        images = _images(root, folder, sorted(coco), rng)
        coco_images = [{k: v for k, v in im.items() if "category_ids" not in k} for im in images]
        _write(os.path.join(root, "coco", "annotations", f"instances_{folder}.json"),
               {"images": coco_images, "annotations": _annotations(coco, coco_cats),
                "categories": coco_cats})
        _write(os.path.join(root, "lvis", f"lvis_v1_{folder[:-4]}.json"),
               {"images": images, "annotations": _annotations(lvis, lvis_cats),
                "categories": lvis_cats})
    return root
