"""Region crops for CLIP on tensors: boxes grown about their centres, clipped to the image, then
cropped and resized, the boxes of several images in one ``grid_sample`` call per kind of crop.

Conventions (detectron2's boxes):
  * boxes are XYXY in the image's continuous pixel coordinates (detectron2's ``XYXY_ABS``);
  * a grown box is clipped to the image, so at a border it covers only the in-image part and is
    no longer centred on the object (a box touching the left edge grown 1.5x keeps x0 = 0);
  * every crop is resized to a square ``size x size``: the aspect ratio is stretched, not padded.

Resampling, per axis of each box:
  * a side of at most ``size`` pixels (enlarged): each output pixel is the bilinear sample at its
    bin's centre, pixel centres at i + 0.5, edge pixels extended by half a pixel; this is
    ``roi_align(aligned=True)`` exactly;
  * a longer side (shrunk): each output pixel is the exact mean of the image over its bin (a box
    filter, pixels taken as constant squares), read from cumulative sums of the image, two reads
    per bin edge. ``roi_align(sampling_ratio=0)`` approximates this mean with ceil(side / size)
    bilinear samples per bin and axis, five times as many reads for the usual proposal.
  The rules agree where they meet: for a bin of exactly one pixel both give the same blend of the
  two pixels it overlaps. Sampling runs in float64, in which the cumulative sums of a large image
  keep the precision of one pixel's value.

On a CPU, a compiled kernel (``crop_kernel.py``, C built on first use) repeats the torch operations'
arithmetic in one pass per crop, with the same bits; the torch operations run where it cannot be
built, and on other devices.
"""

from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from . import crop_kernel
from ..teacher.loader import ClipInfo, clip_normalize

# recorded in the embedding cache's key: a cache cut another way is computed again
CROP_RESAMPLING = "box filter on shrunk axes, bilinear on enlarged axes"
MAX_SAMPLES_PER_CALL = 1 << 21  # sample points per grid_sample call (memory, not results)
MAX_ATLAS_PIXELS = 1 << 22  # pixels of the images cut in one atlas (memory, not results)

__all__ = [
    "CROP_RESAMPLING",
    "clip_boxes_to_image",
    "crop_regions",
    "crop_regions_batch",
    "crops_for_clip",
    "expand_boxes",
    "grow_boxes",
    "grow_boxes_of_images",
    "normalize_for_clip",
]


def clip_boxes_to_image(boxes: torch.Tensor, image_size) -> torch.Tensor:
    """Boxes clipped to an image of ``(height, width)``, each at least one pixel wide and high
    (height and width: numbers, or one per box as tensors)."""
    h, w = (torch.as_tensor(v, dtype=boxes.dtype, device=boxes.device) for v in image_size)
    x0 = torch.minimum(boxes[:, 0].clamp(min=0), w - 1)
    y0 = torch.minimum(boxes[:, 1].clamp(min=0), h - 1)
    x1 = torch.maximum(torch.minimum(boxes[:, 2], w), x0 + 1)
    y1 = torch.maximum(torch.minimum(boxes[:, 3], h), y0 + 1)
    return torch.stack([x0, y0, x1, y1], dim=1)


def expand_boxes(boxes: torch.Tensor, scale: float, image_size) -> torch.Tensor:
    """Boxes with width and height multiplied by ``scale`` about their centres, then clipped."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]) * (scale / 2)
    return clip_boxes_to_image(torch.cat([centre - half, centre + half], dim=1), image_size)


def _axis_grid(lo: torch.Tensor, hi: torch.Tensor, size: int, area: bool) -> torch.Tensor:
    """Per box and axis [lo, hi] (tensors of any shape): the ``size + 1`` bin edges (area) or the
    ``size`` bin centres - 0.5 (bilinear), in pixel-index units of the image, on a new last dim."""
    steps = torch.arange(size + 1 if area else size, dtype=lo.dtype, device=lo.device)
    step = ((hi - lo) / size)[..., None]
    return lo[..., None] + (steps if area else steps + 0.5) * step - (0.0 if area else 0.5)


def _cumulative(table: torch.Tensor, dim: int) -> torch.Tensor:
    """Cumulative sums of ``table`` along ``dim``, preceded by a zero."""
    if (
        table.device.type == "cpu"
        and table.dtype == torch.float64
        and table.is_contiguous()
        and crop_kernel.kernel() is not None
    ):
        return crop_kernel.cumulative(table, dim)  # the same sums, in one pass
    shape = list(table.shape)
    shape[dim] += 1
    out = table.new_empty(shape)
    out.narrow(dim, 0, 1).zero_()
    torch.cumsum(table, dim, out=out.narrow(dim, 1, table.shape[dim]))
    return out


def crop_regions_batch(
    images: Sequence[torch.Tensor],
    boxes: Sequence[torch.Tensor],
    size: int,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Crops of ``boxes[i]`` (already clipped) from ``images[i]`` (float [C, H, W], one C for all),
    concatenated in order: [sum M_i, C, size, size], resampled as the module's docstring says;
    written into ``out`` (of any memory format) when given.

    The images sit side by side in one atlas, each with a one-pixel border that repeats its edge
    (so bilinear samples need no clamping and never reach a neighbour), and every table is sampled
    with one ``grid_sample`` call for the crops of all images (on a CPU split into one part per
    torch thread; results are the same for any count). On a CPU with float32 ``out`` the compiled
    kernel of ``crop_kernel`` does the tables' sums and the sampling instead, with the same bits.
    Memory sets two limits, which change results by rounding at most: an atlas holds at most
    ``MAX_ATLAS_PIXELS`` pixels (more images are cut in groups) and a ``grid_sample`` call samples
    at most ``MAX_SAMPLES_PER_CALL`` points.
    """
    channels = images[0].shape[0] if images and images[0].dim() == 3 else 3
    for image in images:
        if (
            image.dim() != 3
            or not image.is_floating_point()
            or image.shape[0] != channels
            or 0 in image.shape
        ):
            raise ValueError(
                f"expected float images [{channels}, H, W] with H, W > 0, got {image.dtype} "
                f"{tuple(image.shape)}"
            )
    device, dtype = images[0].device, images[0].dtype
    counts = [len(b) for b in boxes]
    if out is None:
        out = torch.empty(sum(counts), channels, size, size, device=device, dtype=dtype)
    elif out.shape != (sum(counts), channels, size, size) or out.device != device:
        raise ValueError(
            f"out must be [{sum(counts)}, {channels}, {size}, {size}] on {device}, got "
            f"{tuple(out.shape)} on {out.device}"
        )
    if not sum(counts):
        return out
    height = max(im.shape[1] for im in images)
    width = max(im.shape[2] for im in images)
    if len(images) > 1 and len(images) * (height + 2) * (width + 2) > MAX_ATLAS_PIXELS:
        # four float64 tables of the padded atlas would be held at once: cut in groups of images
        first, start = 0, 0
        for i in range(1, len(images) + 1):
            group = images[first : i + 1]
            h = max(im.shape[1] for im in group) + 2
            w = max(im.shape[2] for im in group) + 2
            if i == len(images) or len(group) * h * w > MAX_ATLAS_PIXELS:
                stop = start + sum(counts[first:i])
                crop_regions_batch(images[first:i], boxes[first:i], size, out[start:stop])
                first, start = i, stop
        return out
    nhwc = out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    work_dtype = torch.float32 if out.dtype in (torch.float16, torch.bfloat16) else out.dtype
    # float64: float32 grid coordinates are off by ~1e-6 pixel, and cumulative sums of a large
    # image would lose the precision of one pixel's value. Tables are laid out as the atlas,
    # [C, H, image, W], so that none is copied to be sampled.
    n = len(images)
    fast = device.type == "cpu" and crop_kernel.kernel() is not None  # the compiled kernel's
    padded = torch.empty(channels, height + 2, n, width + 2, device=device, dtype=torch.float64)
    for k, im in enumerate(images):
        if fast and im.dtype == torch.float32:
            crop_kernel.pad_replicate(im, padded[:, :, k])
        else:
            pad = (1, width - im.shape[2] + 1, 1, height - im.shape[1] + 1)
            padded[:, :, k].copy_(F.pad(im[None], pad, mode="replicate")[0])
    b = torch.cat(boxes).to(device, torch.float64)
    which = torch.from_numpy(np.repeat(np.arange(n, dtype=np.int64), counts)).to(device)
    side = b[:, 2:] - b[:, :2]
    shrunk = side > size  # per axis (x, y): box filter, else bilinear
    case = shrunk[:, 0].long() + 2 * shrunk[:, 1].long()
    threads = torch.get_num_threads() if device.type == "cpu" else 1
    cases = case.unique().tolist()
    tables = {0: padded}
    for c in cases:  # cumulative sums along the box-filtered axes, from 0 at the edge
        if c not in tables:
            table = tables[1] if c == 3 and 1 in tables else padded
            if c & 1 and table is padded:
                table = _cumulative(table, 3)
            if c & 2:
                table = _cumulative(table, 1)
            tables[c] = table
    atlases = {c: t.view(channels, t.shape[1], n * t.shape[3]) for c, t in tables.items()}
    if fast and out.dtype == torch.float32:
        # the same arithmetic, bit for bit, in one compiled pass per crop over `threads` threads
        # (with each crop's coordinates and scale below)
        crop_kernel.cut_crops(
            [atlases.get(c) if c in cases else None for c in range(4)],
            channels,
            b.contiguous(),
            which.contiguous(),
            n,
            case.contiguous(),
            size,
            out,
            threads,
        )
        return out
    # 1 / bin area of the box-filtered axes, by which the crops' bin sums are scaled
    wh = side / size
    scale = (
        1 / (torch.where(shrunk[:, 0], wh[:, 0], 1.0) * torch.where(shrunk[:, 1], wh[:, 1], 1.0))
    ).to(work_dtype)
    # every crop's sample coordinates under either rule along each axis, as grid_sample's
    # normalised coordinates (align_corners=False) in the table it reads, which has one more
    # column (row) when cumulative along x (y): pixel index in the atlas, +1 for the border (an
    # edge x of the image is column x + 1 of its cumulative table, a pixel centre x - 0.5 is
    # column x + 0.5 of the padded image), + the image's offset
    # (divisors stay Python numbers: CUDA divides by a scalar as a product with its reciprocal)
    grid_xy = {}  # area: ([N, points] along x, [N, points] along y)
    for area in (False, True):
        tw, th = width + 2 + area, height + 2 + area
        xy = _axis_grid(b[:, :2], b[:, 2:], size, area) + 1
        x = xy[:, 0] + (which * tw)[:, None]
        grid_xy[area] = ((2 * x + 1) / (n * tw) - 1, (2 * xy[:, 1] + 1) / th - 1)
    for c in cases:
        area_x, area_y = bool(c & 1), bool(c & 2)
        # grid_sample runs in parallel over its batch only: the atlas is repeated (a view) for as
        # many parts of the crops as there are threads
        atlas = atlases[c][None]
        # at most MAX_SAMPLES_PER_CALL lattice points per call: a batch of 224 px crops would
        # otherwise hold about 4 MB of float64 temporaries per crop at once
        # (less the copies that may fill the parts below)
        per_call = max(1, MAX_SAMPLES_PER_CALL // ((size + 1) ** 2) - threads + 1)
        for index in (case == c).nonzero()[:, 0].split(per_call):
            per_part = -(-len(index) // min(threads, len(index)))
            parts = -(-len(index) // per_part)
            # the last crop is repeated to fill the parts; its copies are not written to out
            filled = index
            if parts * per_part > len(index):
                filled = torch.cat([index, index[-1:].expand(parts * per_part - len(index))])
            x, y = grid_xy[area_x][0][filled], grid_xy[area_y][1][filled]
            gy, gx = y.shape[1], x.shape[1]
            grid = x.new_empty(len(filled), gy, gx, 2)
            grid[..., 0] = x[:, None, :]
            grid[..., 1] = y[:, :, None]
            samples = F.grid_sample(
                atlas.expand(parts, -1, -1, -1),
                grid.view(parts, per_part * gy, gx, 2),
                mode="bilinear",
                padding_mode="border",
                align_corners=False,
            ).view(parts, channels, per_part, gy, gx)
            # differences of the cumulative sums in float64, the last one written in work_dtype
            # straight into the crops, crop-major and in out's memory layout (bin sums are scaled
            # in float32 at least: they overflow float16)
            if area_x:  # along the flat buffer, which vectorises; each row's last one is unused
                flat = samples.view(-1)
                samples = (flat[1:] - flat[:-1]).as_strided(
                    (parts, channels, per_part, gy, gx - 1), samples.stride()
                )
            crops = torch.empty(
                parts, per_part, *((size, size, channels) if nhwc else (channels, size, size)),
                device=device, dtype=work_dtype,
            )
            if nhwc:
                crops = crops.permute(0, 1, 4, 2, 3)
            if area_y:
                torch.sub(samples[..., 1:, :], samples[..., :-1, :], out=crops.transpose(1, 2))
            else:
                crops.transpose(1, 2).copy_(samples)
            crops = crops.flatten(0, 1)[: len(index)]
            if area_x or area_y:
                crops.mul_(scale[index].view(-1, 1, 1, 1))
            out[index] = crops.to(out.dtype)
    return out


def crop_regions(image: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crops of ``boxes`` (already clipped) from one float image [C, H, W]: [M, C, size, size]."""
    return crop_regions_batch([image], [boxes], size)


def grow_boxes(
    boxes: torch.Tensor, scales: Sequence[float], image_size: Tuple[int, int]
) -> torch.Tensor:
    """``boxes`` [M, 4] grown by each of ``scales`` and clipped: [len(scales) * M, 4], scale-major
    (all boxes at scales[0] first)."""
    return grow_boxes_of_images([boxes], scales, [image_size])[0]


def grow_boxes_of_images(
    boxes: Sequence[torch.Tensor], scales: Sequence[float], image_sizes: Sequence[Tuple[int, int]]
) -> List[torch.Tensor]:
    """``grow_boxes`` of every image's boxes (``boxes[i]`` in an image of ``image_sizes[i]``), all
    images at once: the same values, one [len(scales) * M_i, 4] per image."""
    counts = [len(b) for b in boxes]
    flat = torch.cat([b.float() for b in boxes])
    sizes = np.repeat(np.asarray(image_sizes, dtype=np.float32).reshape(-1, 2), counts, axis=0)
    h, w = torch.from_numpy(sizes).to(flat.device).unbind(1)
    grown = torch.stack([expand_boxes(flat, float(s), (h, w)) for s in scales])  # [S, M, 4]
    return [g.reshape(-1, 4) for g in grown.split(counts, dim=1)]


def normalize_for_clip(image: torch.Tensor, info: ClipInfo) -> torch.Tensor:
    """A [0, 255] image [3, H, W] (uint8 or float) as a CLIP-normalised float image. A crop's
    pixels are weighted means of the image's, so cropping the normalised image equals normalising
    every crop, at a fraction of the cost."""
    if (
        image.dtype == torch.uint8
        and image.dim() == 3
        and image.shape[0] == len(info.mean)
        and image.device.type == "cpu"
        and crop_kernel.kernel() is not None
    ):
        return crop_kernel.normalize_u8(image, info.mean, info.std)  # the same values, one pass
    return clip_normalize(image[None].float() / 255.0, info)[0]


def crops_for_clip(image: torch.Tensor, boxes: torch.Tensor, info: ClipInfo) -> torch.Tensor:
    """CLIP inputs [M, 3, R, R] (R = the checkpoint's input resolution, CLIP-normalised) of clipped
    ``boxes`` in a [0, 255] image [3, H, W] (uint8 or float)."""
    return crop_regions(normalize_for_clip(image, info), boxes, info.input_resolution)
