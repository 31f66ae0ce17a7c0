"""Region crops for CLIP on tensors: boxes grown about their centres, clipped to the image, then
cropped and resized with ``roi_align``, many boxes of one image per call.

Conventions (the same as the teacher's crops in ``crops.py``):
  * boxes are XYXY in the image's continuous pixel coordinates (detectron2's ``XYXY_ABS``);
  * a grown box is clipped to the image, so at a border it covers only the in-image part and is
    no longer centred on the object (a box touching the left edge grown 1.5x keeps x0 = 0);
  * every crop is resized to a square ``size x size``: the aspect ratio is stretched, not padded;
  * resampling is bilinear, pixel-aligned (``aligned=True``), with ``sampling_ratio=0``, i.e.
    ceil(box side / size) samples per output pixel, which averages instead of aliasing when a big
    box is shrunk.
"""

from typing import Sequence, Tuple

import torch
from torchvision.ops import roi_align

from .loader import ClipInfo, clip_normalize

__all__ = ["clip_boxes_to_image", "crop_regions", "crops_for_clip", "expand_boxes", "grow_boxes"]


def clip_boxes_to_image(boxes: torch.Tensor, image_size: Tuple[int, int]) -> torch.Tensor:
    """Boxes clipped to an image of ``(height, width)``, each at least one pixel wide and high."""
    h, w = float(image_size[0]), float(image_size[1])
    x0 = boxes[:, 0].clamp(0, w - 1)
    y0 = boxes[:, 1].clamp(0, h - 1)
    x1 = torch.maximum(boxes[:, 2].clamp(max=w), x0 + 1)
    y1 = torch.maximum(boxes[:, 3].clamp(max=h), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def expand_boxes(boxes: torch.Tensor, scale: float, image_size: Tuple[int, int]) -> torch.Tensor:
    """Boxes with width and height multiplied by ``scale`` about their centres, then clipped."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return clip_boxes_to_image(torch.cat([centre - half, centre + half], dim=1), image_size)


def crop_regions(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of ``boxes`` (already clipped) from one float image [3, H, W]: [M, 3, size, size]."""
    if image.dim() != 3 or not image.is_floating_point():
        raise ValueError(
            f"expected a float image [3, H, W], got {image.dtype} {tuple(image.shape)}"
        )
    rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], dim=1).to(image)
    return roi_align(
        image[None], rois, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True
    )


def grow_boxes(
    boxes: torch.Tensor, scales: Sequence[float], image_size: Tuple[int, int]
) -> torch.Tensor:
    """``boxes`` [M, 4] grown by each of ``scales`` and clipped: [len(scales) * M, 4], scale-major
    (all boxes at scales[0] first)."""
    boxes = boxes.float()
    return torch.cat([expand_boxes(boxes, float(s), image_size) for s in scales])


def crops_for_clip(image: torch.Tensor, boxes: torch.Tensor, info: ClipInfo) -> torch.Tensor:
    """CLIP inputs [M, 3, R, R] (R = the checkpoint's input resolution, CLIP-normalised) of clipped
    ``boxes`` in a [0, 255] float image [3, H, W] (a uint8 image is converted)."""
    if not image.is_floating_point():
        image = image.float()
    crops = crop_regions(
        image, boxes.to(device=image.device, dtype=image.dtype), info.input_resolution
    )
    return clip_normalize(crops.div_(255.0), info)
