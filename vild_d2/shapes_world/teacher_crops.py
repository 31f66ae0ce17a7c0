"""Object crops for the teacher: a world's images held once in memory, cropped on tensors.

Boxes come from detectron2's VOC loader (``XYXY_ABS``, 0-based continuous pixel coordinates).
Crops are taken with ``roi_align`` (bilinear, pixel-aligned) and returned as float [0, 1] images.
"""

from dataclasses import dataclass, replace
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.data import detection_utils
from detectron2.data.datasets.pascal_voc import load_voc_instances
from torchvision.ops import roi_align

from .generator import WorldConfig, image_index, read_manifest, render_image

__all__ = [
    "CropBank",
    "add_background_boxes",
    "add_unannotated_objects",
    "fixed_crops",
    "load_crop_bank",
    "random_crops",
    "scale_boxes",
]


@dataclass
class CropBank:
    images: torch.Tensor  # uint8 [N, 3, H, W], zero-padded to the largest image
    image_sizes: torch.Tensor  # float [N, 2] (height, width) of each image before padding
    boxes: torch.Tensor  # float [M, 4] XYXY_ABS
    image_index: torch.Tensor  # long [M] image of each box
    labels: torch.Tensor  # long [M] class index of each box
    image_ids: Tuple[str, ...] = ()  # the dataset's image_id of each image

    def __len__(self):
        return int(self.boxes.shape[0])


def load_crop_bank(world_dir: str, image_set: str, classes: Sequence[str]) -> CropBank:
    """Every annotated box of ``image_set`` with its image, read once."""
    dicts = load_voc_instances(world_dir, image_set, list(classes))
    arrays: List[np.ndarray] = []
    boxes, image_index, labels, image_ids = [], [], [], []
    for d in dicts:
        if not d["annotations"]:
            continue
        image_ids.append(d["image_id"])
        for ann in d["annotations"]:
            boxes.append(ann["bbox"])
            labels.append(ann["category_id"])
            image_index.append(len(arrays))
        arrays.append(detection_utils.read_image(d["file_name"], format="RGB"))
    if not boxes:
        raise ValueError(
            f"image set '{image_set}' of {world_dir} holds no annotated box; regenerate the world "
            "with datasets/prepare_shapes_ovd.py"
        )
    height = max(a.shape[0] for a in arrays)
    width = max(a.shape[1] for a in arrays)
    images = torch.zeros((len(arrays), 3, height, width), dtype=torch.uint8)
    for i, a in enumerate(arrays):
        images[i, :, : a.shape[0], : a.shape[1]] = torch.from_numpy(np.array(a)).permute(2, 0, 1)
    return CropBank(
        images=images,
        image_sizes=torch.tensor([a.shape[:2] for a in arrays], dtype=torch.float32),
        boxes=torch.tensor(boxes, dtype=torch.float32),
        image_index=torch.tensor(image_index, dtype=torch.long),
        labels=torch.tensor(labels, dtype=torch.long),
        image_ids=tuple(image_ids),
    )


def add_unannotated_objects(
    bank: CropBank, world_dir: str, image_set: str, first_label: int
) -> Tuple[CropBank, List[str]]:
    """The bank plus the objects of no class that the world drew in its images but did not
    annotate (distractors such as "grey cross"), each labelled with its own name.

    The generator is deterministic, so the objects are re-drawn from the world's manifest.

    Returns:
        (bank, names): name ``names[i]`` has label ``first_label + i``; names are sorted.
    """
    manifest = read_manifest(world_dir)
    if manifest is None or "config" not in manifest:
        raise ValueError(
            f"{world_dir} holds no readable world manifest; regenerate the world with "
            "datasets/prepare_shapes_ovd.py"
        )
    cfg = WorldConfig(**manifest["config"])
    found = []  # (image, name, box)
    for i, iid in enumerate(bank.image_ids):
        _, objects = render_image(cfg, image_set, image_index(iid))
        for obj in objects:
            if obj.class_name is None:
                x0, y0, x1, y1 = obj.box  # VOC 1-based inclusive -> detectron2's XYXY_ABS
                found.append((i, obj.name, [x0 - 1.0, y0 - 1.0, float(x1), float(y1)]))
    names = sorted({name for _, name, _ in found})
    if not found:
        return bank, names
    return (
        replace(
            bank,
            boxes=torch.cat([bank.boxes, torch.tensor([b for _, _, b in found])]),
            image_index=torch.cat([bank.image_index, torch.tensor([i for i, _, _ in found])]),
            labels=torch.cat(
                [bank.labels, torch.tensor([first_label + names.index(n) for _, n, _ in found])]
            ),
        ),
        names,
    )


def add_background_boxes(
    bank: CropBank,
    label: int,
    per_image: int,
    generator: torch.Generator,
    max_iou: float = 0.3,
    side_range: Tuple[float, float] = (0.1, 0.6),
) -> CropBank:
    """The bank plus up to ``per_image`` random boxes per image, labelled ``label``, that overlap
    no box of the bank by more than ``max_iou``: background, texture, and the unannotated
    distractors unless ``add_unannotated_objects`` put them in the bank.

    Box sides are drawn as fractions ``side_range`` of the image side, like the world's objects.
    """
    from torchvision.ops import box_iou

    boxes, image_index = [], []
    tries = per_image * 4
    for i, (h, w) in enumerate(bank.image_sizes.tolist()):
        side = min(h, w)
        wh = side * (side_range[0] + (side_range[1] - side_range[0]) * torch.rand(tries, 2, generator=generator))
        x0 = torch.rand(tries, generator=generator) * (w - wh[:, 0]).clamp(min=0)
        y0 = torch.rand(tries, generator=generator) * (h - wh[:, 1]).clamp(min=0)
        cand = torch.stack([x0, y0, x0 + wh[:, 0], y0 + wh[:, 1]], dim=1)
        gt = bank.boxes[bank.image_index == i]
        if len(gt):
            cand = cand[box_iou(cand, gt).max(dim=1).values <= max_iou]
        cand = cand[:per_image]
        boxes.append(cand)
        image_index.append(torch.full((len(cand),), i, dtype=torch.long))
    boxes, image_index = torch.cat(boxes), torch.cat(image_index)
    return replace(
        bank,
        boxes=torch.cat([bank.boxes, boxes]),
        image_index=torch.cat([bank.image_index, image_index]),
        labels=torch.cat([bank.labels, torch.full((len(boxes),), label, dtype=torch.long)]),
    )


def _crop(bank: CropBank, index: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of ``boxes`` (one per ``index`` entry), clipped to their images, as [0, 1] floats."""
    image_index = bank.image_index[index]
    hw = bank.image_sizes[image_index]
    boxes = torch.stack(
        [
            boxes[:, 0].clamp(min=0).minimum(hw[:, 1] - 1),
            boxes[:, 1].clamp(min=0).minimum(hw[:, 0] - 1),
            boxes[:, 2].minimum(hw[:, 1]),
            boxes[:, 3].minimum(hw[:, 0]),
        ],
        dim=1,
    )
    boxes[:, 2:] = torch.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    # Only the images in use are converted to float.
    used, local = torch.unique(image_index, return_inverse=True)
    images = bank.images[used].float().div_(255.0)
    rois = torch.cat([local[:, None].float(), boxes], dim=1)
    crops = roi_align(images, rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return crops.clamp_(0.0, 1.0)


def scale_boxes(boxes: torch.Tensor, scale) -> torch.Tensor:
    """Boxes grown (or shrunk) about their centres by ``scale`` (a number or a [M] tensor)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) / 2
    if torch.is_tensor(scale):
        scale = scale.view(-1, 1)
    return torch.cat([centre - half * scale, centre + half * scale], dim=1)


def fixed_crops(
    bank: CropBank, size: int, scale: float = 1.0, index: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Crops of the bank's boxes (all, or ``index``) grown by ``scale``, [M, 3, size, size]."""
    if index is None:
        index = torch.arange(len(bank))
    return _crop(bank, index, scale_boxes(bank.boxes[index], scale), size)


def random_crops(
    bank: CropBank,
    index: torch.Tensor,
    size: int,
    generator: torch.Generator,
    box_jitter: float = 0.1,
    context_range: Tuple[float, float] = (1.0, 1.6),
    flip: bool = True,
) -> torch.Tensor:
    """Augmented crops: jittered boxes, grown by a random context factor, randomly flipped.

    ``box_jitter`` shifts the centre by up to that fraction of the box side and rescales each
    side by up to ``exp(+-box_jitter)``.
    """
    boxes = bank.boxes[index]
    n = boxes.shape[0]
    size_wh = boxes[:, 2:] - boxes[:, :2]
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    centre = centre + (torch.rand(n, 2, generator=generator) * 2 - 1) * box_jitter * size_wh
    size_wh = size_wh * torch.exp((torch.rand(n, 2, generator=generator) * 2 - 1) * box_jitter)
    lo, hi = context_range
    size_wh = size_wh * (lo + (hi - lo) * torch.rand(n, 1, generator=generator))
    crops = _crop(bank, index, torch.cat([centre - size_wh / 2, centre + size_wh / 2], 1), size)
    if flip:
        flipped = torch.rand(n, generator=generator) < 0.5
        crops[flipped] = crops[flipped].flip(-1)
    return crops
