"""Checks of a registered dataset's files: that every image exists (cheap, at training start-up),
and that every image decodes at its annotated size with its boxes inside it (tools/check_dataset.py
reads them all once)."""
import os
from typing import Iterable, List, Sequence

from detectron2.structures import BoxMode
from PIL import Image

from .datasets.ovd_voc import DatasetError

BAD_IMAGE_POLICIES = ("stop", "skip")


def check_images_exist(dicts: Sequence[dict], names: Iterable[str]) -> None:
    """DatasetError naming the missing image files of ``dicts`` (the datasets ``names``), if any."""
    missing = [d["file_name"] for d in dicts if not os.path.isfile(d["file_name"])]
    if missing:
        raise DatasetError(
            f"{len(missing)} of the {len(dicts)} images of {', '.join(names)} are missing, e.g. "
            f"{missing[0]}; restore them or take them out of the dataset's image list "
            "(tools/check_dataset.py lists every problem)"
        )


def image_problems(d: dict) -> List[str]:
    """What is wrong with one dataset dict's image and boxes, each as '<file>: <problem>'."""
    path = d["file_name"]
    if not os.path.isfile(path):
        return [f"{path}: missing"]
    try:
        with Image.open(path) as im:
            im.load()  # decodes every byte: a truncated or corrupt file fails here
            width, height = im.size
    except Exception as e:  # PIL raises many types for files it cannot decode
        return [f"{path}: does not decode ({type(e).__name__}: {e})"]
    out = []
    if (d.get("width"), d.get("height")) not in ((None, None), (width, height)):
        out.append(f"{path}: is {width}x{height} but annotated as {d.get('width')}x{d.get('height')}")
    for k, ann in enumerate(d.get("annotations", [])):
        x0, y0, x1, y1 = BoxMode.convert(list(ann["bbox"]), ann["bbox_mode"], BoxMode.XYXY_ABS)
        if not (x1 > x0 and y1 > y0):
            out.append(f"{path}: box {k} {ann['bbox']} is empty")
        elif x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
            out.append(f"{path}: box {k} {ann['bbox']} lies outside the {width}x{height} image")
    return out
