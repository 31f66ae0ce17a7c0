"""CLIP embeddings of image regions: crops cut on tensors, encoded in batches that may span
images, one embedding per box (the per-scale embeddings L2-normalised, summed, L2-normalised)."""
from typing import List, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from clip.model import ModifiedResNet

from ..teacher.loader import ClipInfo
from .precision import cast_for_precision, resolve_precision
from .region_crops import crop_regions_batch, grow_boxes_of_images, normalize_for_clip

__all__ = ["RegionEncoder"]


class RegionEncoder:
    """CLIP embeddings of boxes: crops on tensors, encoded ``batch_size`` crops at a time, per-scale
    L2 norm, sum over scales, L2 norm. Takes over ``model``: it is moved to ``device`` in place
    (and cast by ``cast_for_precision``; bf16 runs the model under autocast)."""

    def __init__(
        self,
        model,
        info: ClipInfo,
        crop_scales: Sequence[float],
        ensemble_crops: bool = True,
        batch_size: int = 256,
        device="cpu",
        precision: str = "auto",
    ):
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.half = self.precision == "fp16"
        self.model = cast_for_precision(model, self.precision).to(self.device).eval()
        # A ResNet tower runs its convolutions faster on NHWC inputs (CPU and tensor cores).
        self.channels_last = isinstance(self.model.visual, ModifiedResNet)
        if self.channels_last:
            self.model.visual.to(memory_format=torch.channels_last)
        self.info = info
        self.scales = tuple(float(s) for s in crop_scales) if ensemble_crops else (1.0,)
        self.batch_size = int(batch_size)

    @torch.no_grad()
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``model.encode_image`` of normalised crops, converted to the model's dtype and layout."""
        x = x.to(self.device, torch.float16 if self.half else torch.float32)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        bf16 = self.precision == "bf16"
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=bf16):
            return self.model.encode_image(x)

    @torch.no_grad()
    def __call__(
        self, images: Sequence[torch.Tensor], boxes: Sequence[torch.Tensor]
    ) -> List[np.ndarray]:
        """float16 [M_i, D] embeddings of ``boxes[i]`` (XYXY pixels) in ``images[i]`` (uint8, CHW).

        Crops are laid out image by image (scale-major within an image) and encoded in batches that
        may span images, so a batch is full whatever the number of boxes per image.
        """
        if not images:
            return []
        grown = grow_boxes_of_images(boxes, self.scales, [tuple(im.shape[1:]) for im in images])
        sizes = [len(g) for g in grown]
        # all boxes go to the device in one copy: a copy from pageable memory waits for the device
        # to finish its queue, which per batch would stall the encoding (images come pinned)
        grown = list(torch.cat(grown).to(self.device).split(sizes))
        ends = np.cumsum(sizes).tolist()
        total = ends[-1]
        dim = self.info.embed_dim
        out = torch.empty(total, dim, device=self.device)
        r = self.info.input_resolution
        layout = torch.channels_last if self.channels_last else torch.contiguous_format
        last = (-1, None)  # the last image normalised, which the next batch may share
        for start in range(0, total, self.batch_size):
            stop = min(start + self.batch_size, total)
            pieces, piece_boxes = [], []
            i = int(np.searchsorted(ends, start, side="right"))
            while i < len(ends) and (ends[i] - len(grown[i])) < stop:
                first = ends[i] - len(grown[i])
                lo, hi = max(start, first) - first, min(stop, ends[i]) - first
                if hi > lo:
                    if last[0] != i:
                        image = images[i].to(self.device, non_blocking=True)
                        last = (i, normalize_for_clip(image, self.info))
                    pieces.append(last[1])
                    piece_boxes.append(grown[i][lo:hi])
                i += 1
            # crops are cut straight into the batch, in the layout the encoder runs in
            batch = torch.empty(stop - start, 3, r, r, device=self.device, memory_format=layout)
            crop_regions_batch(pieces, piece_boxes, r, out=batch)
            out[start:stop] = self.encode(batch).float()
        # per box: L2 norm of each scale's embedding, sum over scales, L2 norm; for all images at
        # once, the rows of each scale gathered in image order ([S, boxes, D])
        scales = len(self.scales)
        counts = [n // scales for n in sizes]
        rows = np.concatenate(
            [np.arange(scales * c).reshape(scales, c) + e - scales * c for c, e in zip(counts, ends)],
            axis=1,
        )
        emb = F.normalize(out, dim=-1)[torch.from_numpy(rows).to(self.device)]
        emb = F.normalize(emb.sum(0), dim=-1).cpu().numpy().astype(np.float16)
        return np.split(emb, np.cumsum(counts)[:-1])
