"""Precompute the ViLD-image targets: stage-1 proposals of every training image, their 1x and 1.5x
crops, and the CLIP embeddings of those crops, into an embedding cache.

Per image (the original document's recipe):
  1. the stage-1 detector (class-agnostic Faster R-CNN) runs in eval mode at detectron2's test-time
     resize; its *final detections* are the proposals: box-head scores and refined boxes, a score
     threshold of 0, NMS at ``MODEL.ROI_HEADS.NMS_THRESH_TEST``, no per-image cap; boxes come back
     in the original image's pixels (``do_postprocess``), clipped to the image;
  2. boxes with a side under ``min_box_size`` are dropped and the top ``num_proposals`` by
     score are kept (a multi-class stage-1 model gets one more, class-agnostic, NMS first);
  3. each box is grown about its centre by every crop scale and clipped to the image (at a border
     the crop is the in-image part, no longer centred on the object), cropped and resized to
     CLIP's input resolution on tensors (``vild_d2.teacher.region_crops``) and encoded in batches;
  4. each scale's embedding is L2-normalised, the scales are summed and the sum L2-normalised
     (``ensemble_crops`` off: the 1x embedding alone).

Work is cut into fixed chunks of consecutive images of the global dataset order; chunks still to
do are dealt round-robin to the processes, each finished chunk becomes a part file, and rank 0
assembles the parts into the cache (``vild_d2.data.cache_writer``). A chunk is computed the same
way whoever computes it, so the cache does not depend on the number of processes or on restarts.
"""

import hashlib
import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from clip.model import ModifiedResNet, convert_weights
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from torchvision.ops import nms
from tqdm import tqdm

from ..data.cache_writer import CacheWriter, Chunk, key_hash, make_chunks
from ..data.embedding_cache import CacheEntry, CacheError
from ..teacher.loader import ClipInfo, load_clip
from ..teacher.region_crops import (
    CROP_RESAMPLING,
    crop_regions_batch,
    grow_boxes_of_images,
    normalize_for_clip,
)

__all__ = [
    "ImageReader",
    "PrecomputeOptions",
    "RegionEncoder",
    "cast_for_precision",
    "resolve_precision",
    "load_images_list",
    "run_precompute",
    "select_proposals",
]

logger = logging.getLogger(__name__)

PROPOSAL_SOURCE = "stage1_box_head_detections"
PROPOSAL_SCORE_THRESH = 0.0


@dataclass(frozen=True)
class PrecomputeOptions:
    datasets: Tuple[str, ...]
    clip_model: str
    num_proposals: int = 300
    crop_scales: Tuple[float, ...] = (1.0, 1.5)
    min_box_size: float = 4.0
    ensemble_crops: bool = True
    batch_size: int = 256
    chunk_size: int = 32
    num_workers: int = 2
    config_file: str = ""
    output_dir: str = ""  # "" = <cfg.OUTPUT_DIR>/clip_cache/<datasets>-<short key hash>
    precision: str = "auto"  # the CLIP encoder's: see resolve_precision


# ---------------------------------------------------------------------------- images


def load_images_list(names: Sequence[str]) -> List[dict]:
    """The dataset dicts of ``names``, concatenated in order: the global order of the cache."""
    dicts = [d for name in names for d in DatasetCatalog.get(name)]
    seen = set()
    for d in dicts:
        image_id = str(d["image_id"])
        if image_id in seen:
            raise CacheError(
                f"image id '{image_id}' occurs twice in {list(names)}; the cache is keyed by image "
                "id, so precompute datasets without shared images"
            )
        seen.add(image_id)
    return dicts


class ImageReader:
    """Reads an image once: the uint8 RGB tensor [3, H, W] for the crops and, optionally, the
    stage-1 input (the model's pixel format at the test-time resize, as DatasetMapper makes it)."""

    def __init__(self, cfg=None):
        self.format = cfg.INPUT.FORMAT if cfg is not None else None
        self.augmentations = (
            T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
            if cfg is not None
            else None
        )

    def __call__(self, d: dict) -> dict:
        fmt = self.format if self.format in ("RGB", "BGR") else "RGB"
        image = utils.read_image(d["file_name"], format=fmt)
        utils.check_image_size(d, image)
        rgb = image[:, :, ::-1] if fmt == "BGR" else image
        out = {
            "image_id": str(d["image_id"]),
            "rgb": torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))),
        }
        if self.augmentations is not None:
            if fmt != self.format:
                image = utils.read_image(d["file_name"], format=self.format)
            aug_input = T.AugInput(image)
            self.augmentations(aug_input)
            out["stage1"] = {
                "image": torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))),
                "height": image.shape[0],
                "width": image.shape[1],
            }
        return out


class _ReadDataset(torch.utils.data.Dataset):
    def __init__(self, dicts: Sequence[dict], reader: ImageReader):
        self.dicts, self.reader = dicts, reader

    def __len__(self):
        return len(self.dicts)

    def __getitem__(self, i):
        return self.reader(self.dicts[i])


def _single(batch):
    return batch[0]


def image_loader(dicts: Sequence[dict], reader: ImageReader, num_workers: int, pin: bool = False):
    """Images in order, decoded by ``num_workers`` processes ahead of the consumer."""
    return torch.utils.data.DataLoader(
        _ReadDataset(dicts, reader),
        batch_size=1,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=_single,
        pin_memory=pin,
        prefetch_factor=4 if num_workers else None,
    )


# ---------------------------------------------------------------------------- proposals


def stage1_inference_cfg(cfg):
    """The config the stage-1 model is built from: every detection kept for our own selection."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = PROPOSAL_SCORE_THRESH
    cfg.TEST.DETECTIONS_PER_IMAGE = -1
    cfg.freeze()
    return cfg


def build_stage1_model(cfg):
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def select_proposals(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    num_proposals: int,
    min_box_size: float,
    nms_thresh: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clip to the image, drop boxes with a side < ``min_box_size``, optionally NMS, then the top
    ``num_proposals`` by score (descending, ties in input order)."""
    h, w = image_size
    boxes = torch.stack(
        [
            boxes[:, 0].clamp(0, w),
            boxes[:, 1].clamp(0, h),
            boxes[:, 2].clamp(0, w),
            boxes[:, 3].clamp(0, h),
        ],
        dim=1,
    )
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh >= min_box_size).all(dim=1)
    boxes, scores = boxes[keep], scores[keep]
    if nms_thresh is not None and len(boxes):
        keep = nms(boxes, scores, nms_thresh)
        boxes, scores = boxes[keep], scores[keep]
    order = torch.sort(scores, descending=True, stable=True).indices[:num_proposals]
    return boxes[order], scores[order]


# ---------------------------------------------------------------------------- encoding


PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device) -> str:
    """The CLIP encoder's arithmetic: "auto" is fp16 on CUDA, bf16 on a CPU with bfloat16 units
    (AVX512-BF16 or AMX) and fp32 on other CPUs."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if device.type == "cpu" and cpu_bf16 else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, not {device}; use bf16 or fp32")
    return precision


def _matmul_weights_to_bfloat16(visual: torch.nn.Module) -> None:
    """The weights of a CLIP image tower that bfloat16 autocast casts on every call, cast once:
    those of convolutions, linear layers, attention's input projections and the output projection
    ``proj``. Everything else (norms, embeddings) stays float32, so under autocast the results are
    the same, bit for bit. The first convolution stays float32 too: CLIP takes its dtype for the
    model's (``CLIP.dtype``), which the text tower reads."""
    for m in visual.modules():
        if m is visual.conv1:
            continue
        names = []
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            names = ["weight", "bias"]
        elif isinstance(m, torch.nn.MultiheadAttention):
            names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias"]
        for name in names + ["proj"]:
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor):
                p.data = p.data.bfloat16()


def cast_for_precision(model, precision: str):
    """``model`` in float32; for fp16 the way CLIP's own loader makes it (convolutions, linear
    layers, attention and projections in float16, layer and batch norms in float32: CLIP's
    LayerNorm computes in float32 and needs float32 weights); for bf16, which runs under autocast,
    the image tower's weights that autocast casts are cast once here (ViT-B/32 encodes 7-17%
    faster on a CPU, where casting its 88M weights took that long on every batch)."""
    model = model.float()
    if precision == "fp16":
        convert_weights(model)
    elif precision == "bf16":
        _matmul_weights_to_bfloat16(model.visual)
    return model


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


# ---------------------------------------------------------------------------- the run


def _sha256_16(path: str) -> str:
    digest = hashlib.sha256()
    with PathManager.open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _config_sha256(cfg) -> str:
    """What of the config changes the proposals: the model (not its device, weights path or ViLD
    node) and the test-time input."""
    model = cfg.MODEL.clone()
    model.defrost()
    for k in ("DEVICE", "WEIGHTS", "VILD"):
        model.pop(k, None)
    text = model.dump() + cfg.INPUT.dump()
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_key(cfg, opts: PrecomputeOptions, image_ids: Sequence[str], info: ClipInfo) -> dict:
    """Everything that determines the cache's contents (compared with an existing cache)."""
    return {
        "datasets": list(opts.datasets),
        "image_ids_sha256": hashlib.sha256("\n".join(image_ids).encode()).hexdigest()[:16],
        "proposal_source": PROPOSAL_SOURCE,
        "stage1_config_sha256": _config_sha256(cfg),
        "stage1_weights_sha256": _sha256_16(cfg.MODEL.WEIGHTS),
        "clip_fingerprint": info.fingerprint,
        "embed_dim": info.embed_dim,
        "input_resolution": info.input_resolution,
        "crop_scales": [float(s) for s in opts.crop_scales],
        "num_proposals": int(opts.num_proposals),
        "min_box_size": float(opts.min_box_size),
        "ensemble_crops": bool(opts.ensemble_crops),
        "precision": resolve_precision(opts.precision, cfg.MODEL.DEVICE),
        "crop_resampling": CROP_RESAMPLING,
    }


def default_output_dir(cfg, opts: PrecomputeOptions, key: dict) -> str:
    return os.path.join(
        cfg.OUTPUT_DIR, "clip_cache", f"{'+'.join(opts.datasets)}-{key_hash(key)[:8]}"
    )


def _rank0_decision(writer: CacheWriter, chunks: Sequence[Chunk]) -> dict:
    """On rank 0: is the cache complete, or which chunks are done (or the error to raise)."""
    try:
        if writer.is_complete():
            writer.remove_parts()  # left over when a run was killed between manifest and clean-up
            return {"complete": True}
        writer.prepare()
        return {"complete": False, "done": writer.done(chunks)}
    except CacheError as e:
        return {"error": str(e)}


def _compute_chunks(cfg, opts, dicts, my_chunks, writer, encoder, stage1_model) -> Dict[str, int]:
    """Proposals, crops and embeddings of ``my_chunks``, one part file per chunk."""
    stats = {"images": 0, "proposals": 0, "crops": 0, "bytes": 0}
    if not my_chunks:
        return stats
    flat = [d for c in my_chunks for d in dicts[c.start : c.stop]]
    pin = encoder.device.type == "cuda"
    loader = iter(image_loader(flat, ImageReader(cfg), opts.num_workers, pin=pin))
    # a multi-class stage-1 model suppresses per class: one more, class-agnostic, NMS
    multi_class = cfg.MODEL.ROI_HEADS.NUM_CLASSES > 1
    nms_thresh = cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST if multi_class else None
    bar = tqdm(
        total=len(flat),
        unit="img",
        desc=f"CLIP embeddings (rank 0 of {comm.get_world_size()})",
        disable=not comm.is_main_process(),
        dynamic_ncols=True,
    )
    for chunk in my_chunks:
        ids, images, boxes, scores = [], [], [], []
        for _ in range(chunk.stop - chunk.start):
            item = next(loader)
            with torch.no_grad():
                inst = stage1_model([item["stage1"]])[0]["instances"].to("cpu")
            b, s = select_proposals(
                inst.pred_boxes.tensor,
                inst.scores,
                tuple(item["rgb"].shape[1:]),
                opts.num_proposals,
                opts.min_box_size,
                nms_thresh,
            )
            ids.append(item["image_id"])
            images.append(item["rgb"])
            boxes.append(b)
            scores.append(s)
        embeddings = encoder(images, boxes)
        entries = [
            CacheEntry(b.numpy().astype(np.float32), s.numpy().astype(np.float32), e)
            for b, s, e in zip(boxes, scores, embeddings)
        ]
        stats["bytes"] += writer.write_part(chunk, ids, entries)
        n = sum(len(b) for b in boxes)
        stats["images"] += len(ids)
        stats["proposals"] += n
        stats["crops"] += n * len(encoder.scales)
        bar.update(len(ids))
    bar.close()
    return stats


def run_precompute(cfg, opts: PrecomputeOptions) -> dict:
    """Compute (or finish) the cache; every process calls it.

    Returns {"output_dir", "status": "complete" (found finished) or "computed", "seconds", and the
    totals over all processes of this run: "images", "proposals", "crops", "bytes" written}.
    """
    start_time = time.perf_counter()
    cfg = stage1_inference_cfg(cfg)
    if not cfg.MODEL.WEIGHTS:
        raise CacheError(
            "the stage-1 model has no weights: pass MODEL.WEIGHTS <stage-1 model_final.pth> "
            "(trained with configs/*/stage1_proposals.yaml)"
        )
    dicts = load_images_list(opts.datasets)
    image_ids = [str(d["image_id"]) for d in dicts]
    clip_model, info = load_clip(opts.clip_model, device="cpu")
    key = cache_key(cfg, opts, image_ids, info)
    output_dir = opts.output_dir or default_output_dir(cfg, opts, key)
    writer = CacheWriter(output_dir, key)
    chunks = make_chunks(len(dicts), opts.chunk_size)
    result = {
        "output_dir": output_dir,
        "status": "complete",
        "images": 0,
        "proposals": 0,
        "crops": 0,
        "bytes": 0,
        "seconds": 0.0,
    }

    decision = _rank0_decision(writer, chunks) if comm.is_main_process() else None
    decision = comm.all_gather(decision)[0]
    if "error" in decision:
        raise CacheError(decision["error"])
    if decision["complete"]:
        logger.info(f"embedding cache {output_dir} is already complete; nothing to do")
        return result
    done = set(decision["done"])
    pending = [c for c in chunks if c.index not in done]
    my_chunks = pending[comm.get_rank() :: comm.get_world_size()]
    if comm.is_main_process():
        logger.info(
            f"{len(dicts)} images of {list(opts.datasets)} in {len(chunks)} chunks: {len(done)} "
            f"done before, {len(pending)} to compute by {comm.get_world_size()} process(es); "
            f"output {output_dir}"
        )

    stage1_model = build_stage1_model(cfg)
    encoder = RegionEncoder(
        clip_model, info, opts.crop_scales, opts.ensemble_crops, opts.batch_size, cfg.MODEL.DEVICE,
        opts.precision,
    )
    stats = _compute_chunks(cfg, opts, dicts, my_chunks, writer, encoder, stage1_model)

    all_stats = comm.all_gather(stats)  # also the barrier before finalize
    result.update({k: sum(s[k] for s in all_stats) for k in stats}, status="computed")
    error = None
    if comm.is_main_process():
        manifest = {
            "stage1_config": opts.config_file,
            "stage1_weights": cfg.MODEL.WEIGHTS,
            "clip_model": opts.clip_model,
            "proposal_score_thresh": PROPOSAL_SCORE_THRESH,
            "proposal_nms_thresh": cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            "chunk_size": opts.chunk_size,
        }
        try:
            writer.finalize(chunks, image_ids, info.embed_dim, manifest)
        except (CacheError, OSError, ValueError) as e:
            error = f"finalizing {output_dir} failed: {e}"
        result["bytes"] += writer.cache_bytes()
    # the other processes return once the cache is complete, or fail with rank 0
    error = comm.all_gather(error)[0]
    if error:
        raise CacheError(error)
    result["seconds"] = time.perf_counter() - start_time
    return result
