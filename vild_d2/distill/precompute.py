"""Precompute the ViLD-image targets: stage-1 proposals of every training image, their 1x and 1.5x
crops, and the CLIP embeddings of those crops, into an embedding cache.

Per image (the original document's recipe):
  1. the stage-1 detector's final detections are the proposals (``proposals.py``);
  2. boxes with a side under ``min_box_size`` are dropped and the top ``num_proposals`` by
     score are kept;
  3. each box is grown about its centre by every crop scale and clipped to the image (at a border
     the crop is the in-image part, no longer centred on the object), cropped and resized to
     CLIP's input resolution on tensors (``region_crops.py``) and encoded in batches;
  4. each scale's embedding is L2-normalised, the scales are summed and the sum L2-normalised
     (``ensemble_crops`` off: the 1x embedding alone).

Work is cut into fixed chunks of consecutive images of the global dataset order; chunks still to
do are dealt round-robin to the processes, each finished chunk becomes a part file, and rank 0
assembles the parts into the cache (``cache_writer.py``). A chunk is computed the same
way whoever computes it, so the cache does not depend on the number of processes or on restarts.
"""

import logging
import os
import time
from dataclasses import dataclass
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from tqdm import tqdm

from ..teacher.loader import ClipInfo, load_clip
from ..utils import digest
from .cache_writer import CacheWriter, Chunk, make_chunks
from .embedding_cache import CacheEntry, CacheError
from .images import ImageReader, image_loader, load_images_list
from .precision import resolve_precision
from .proposals import PROPOSAL_SCORE_THRESH, PROPOSAL_SOURCE, build_stage1_model, select_proposals
from .proposals import stage1_inference_cfg
from .region_crops import CROP_RESAMPLING
from .region_encoder import RegionEncoder

__all__ = ["PrecomputeOptions", "cache_key", "run_precompute"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrecomputeOptions:
    datasets: Tuple[str, ...]
    clip_model: str
    num_proposals: int = 300
    crop_scales: Tuple[float, ...] = (1.0, 1.5)
    min_box_size: float = 0.0
    ensemble_crops: bool = True
    batch_size: int = 256
    chunk_size: int = 32
    num_workers: int = 2
    config_file: str = ""
    output_dir: str = ""  # "" = <cfg.OUTPUT_DIR>/clip_cache/<datasets>-<short key hash>
    precision: str = "auto"  # the CLIP encoder's: see resolve_precision


# ---------------------------------------------------------------------------- the run


def _config_sha256(cfg) -> str:
    """What of the config changes the proposals: the model (not its device, weights path or ViLD
    node) and the test-time input."""
    model = cfg.MODEL.clone()
    model.defrost()
    for k in ("DEVICE", "WEIGHTS", "VILD"):
        model.pop(k, None)
    return digest(model.dump() + cfg.INPUT.dump())


def cache_key(cfg, opts: PrecomputeOptions, image_ids: Sequence[str], info: ClipInfo) -> dict:
    """Everything that determines the cache's contents (compared with an existing cache)."""
    return {
        "datasets": list(opts.datasets),
        "image_ids_sha256": digest("\n".join(image_ids)),
        "proposal_source": PROPOSAL_SOURCE,
        "stage1_config_sha256": _config_sha256(cfg),
        "stage1_weights_sha256": digest(path=PathManager.get_local_path(cfg.MODEL.WEIGHTS)),
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
        cfg.OUTPUT_DIR, "clip_cache", f"{'+'.join(opts.datasets)}-{digest(key)[:8]}"
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
    if info.embed_dim != cfg.MODEL.VILD.EMBED_DIM:  # training would refuse the cache: stop before any work
        raise CacheError(
            f"CLIP model {opts.clip_model} embeds in {info.embed_dim} dimensions but the config's "
            f"MODEL.VILD.EMBED_DIM is {cfg.MODEL.VILD.EMBED_DIM}; set MODEL.VILD.EMBED_DIM "
            f"{info.embed_dim} (or pass the CLIP model the config names)"
        )
    key = cache_key(cfg, opts, image_ids, info)
    output_dir = opts.output_dir or default_output_dir(cfg, opts, key)
    writer = CacheWriter(output_dir, key, sources={"clip_fingerprint": opts.clip_model,
                                                   "stage1_weights_sha256": cfg.MODEL.WEIGHTS})
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
