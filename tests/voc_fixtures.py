"""Small VOC-format trees written inside tests."""
import os

import numpy as np
from PIL import Image

_OBJECT = """  <object>
    <name>{name}</name>
    <pose>Unspecified</pose>
    <truncated>0</truncated>
    <difficult>0</difficult>
    <bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax><ymax>{y1}</ymax></bndbox>
  </object>
"""


def write_voc_tree(root, images, image_sets, seed=0):
    """Write a VOC tree.

    Args:
        images: {image_id: (width, height, [(class_name, (x0, y0, x1, y1)), ...])}, 1-based boxes.
        image_sets: {set_name: [image_id, ...]}.
    """
    rng = np.random.default_rng(seed)
    for sub in ("Annotations", "JPEGImages", os.path.join("ImageSets", "Main")):
        os.makedirs(os.path.join(root, sub), exist_ok=True)
    for image_id, (w, h, objects) in images.items():
        pixels = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(root, "JPEGImages", f"{image_id}.jpg"))
        body = "".join(
            _OBJECT.format(name=n, x0=b[0], y0=b[1], x1=b[2], y1=b[3]) for n, b in objects
        )
        xml = (
            f"<annotation>\n  <folder>test</folder>\n  <filename>{image_id}.jpg</filename>\n"
            f"  <size><width>{w}</width><height>{h}</height><depth>3</depth></size>\n"
            f"{body}</annotation>\n"
        )
        with open(os.path.join(root, "Annotations", f"{image_id}.xml"), "w") as f:
            f.write(xml)
    for name, ids in image_sets.items():
        with open(os.path.join(root, "ImageSets", "Main", f"{name}.txt"), "w") as f:
            f.write("".join(f"{i}\n" for i in ids))
    return root
