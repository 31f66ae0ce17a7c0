"""The embedded world's CLIP teacher on disk: trained once, reused while its manifest matches.

``<output_dir>/clip_teacher.pt`` is a TorchScript archive in OpenAI's format (``clip.load`` reads
it, jit or not) and ``<output_dir>/manifest.json`` describes it. The manifest is written last and
names the checkpoint's fingerprint, so an interrupted run never leaves a teacher that a later
call takes for complete.
"""

import json
import logging
import os
import time
from typing import Dict, Optional

import torch

from ..data.splits import load_split
from ..teacher.loader import TEACHER_CHECKPOINT, TEACHER_MANIFEST, file_fingerprint, load_clip
from ..teacher.text_embeddings import encode_class_names
from ..utils import UserError, digest, write_json
from .archive import save_openai_archive
from .generator import MANIFEST as WORLD_MANIFEST
from .generator import read_manifest as read_world_manifest
from .teacher_crops import add_unannotated_objects, fixed_crops, load_crop_bank
from .teacher_training import TeacherConfig, train_teacher
from .zero_shot import encode_crops, zero_shot_accuracy

__all__ = [
    "TeacherError",
    "ensure_teacher",
    "evaluate_teacher",
    "nearest_class_cosine",
    "read_teacher_manifest",
]

logger = logging.getLogger(__name__)

TRAIN_SET, VAL_SET = "teacher", "teacher_val"
_GENERATE_HINT = "generate it with datasets/prepare_shapes_ovd.py"


class TeacherError(UserError, ValueError):
    """A world or output folder the teacher cannot be trained from or written to."""


def _world_key(world_dir: str) -> dict:
    if not os.path.isdir(world_dir):
        raise TeacherError(f"world folder {world_dir} does not exist; {_GENERATE_HINT}")
    manifest = read_world_manifest(world_dir)
    if manifest is None:
        raise TeacherError(
            f"{world_dir} holds no readable {WORLD_MANIFEST}, so it is not a generated world; "
            f"{_GENERATE_HINT}"
        )
    counts = manifest.get("image_sets") or {}
    for image_set in (TRAIN_SET, VAL_SET):
        listed = os.path.isfile(os.path.join(world_dir, "ImageSets", "Main", f"{image_set}.txt"))
        if not listed or counts.get(image_set, 2) < 2:
            raise TeacherError(
                f"{world_dir} has no '{image_set}' images; {_GENERATE_HINT} "
                "with --num-teacher and --num-teacher-val above 1"
            )
    return {
        "fingerprint": digest(manifest),
        "generator_version": manifest.get("generator_version"),
        "config": manifest.get("config"),
    }


def read_teacher_manifest(output_dir: str) -> Optional[dict]:
    try:
        with open(os.path.join(output_dir, TEACHER_MANIFEST)) as f:
            manifest = json.load(f)
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def _is_complete(output_dir: str, cfg: TeacherConfig, world: dict) -> Optional[dict]:
    manifest = read_teacher_manifest(output_dir)
    if manifest is None:
        return None
    recorded = manifest.get("config")
    if not isinstance(recorded, dict) or manifest.get("world") != world:
        return None
    if {k: recorded.get(k) for k in cfg.cache_key()} != cfg.cache_key():
        return None
    checkpoint = os.path.join(output_dir, manifest.get("checkpoint", TEACHER_CHECKPOINT))
    if not os.path.isfile(checkpoint):
        return None
    return manifest if file_fingerprint(checkpoint) == manifest.get("fingerprint") else None


def _held_out(model, world_dir: str, templates):
    """What the held-out scores read, loaded once: the split, the ``teacher_val`` bank (its class
    objects first, then the world's objects of no class), the number of class boxes and the class
    text embeddings."""
    split = load_split(os.path.join(world_dir, "split.json"))
    bank = load_crop_bank(world_dir, VAL_SET, split.classes)
    num_class_boxes = len(bank)
    bank, _ = add_unannotated_objects(bank, world_dir, VAL_SET, len(split.classes))
    return split, bank, num_class_boxes, encode_class_names(model, split.classes, templates)


def _accuracy(model, held_out, crop_scales) -> Dict[float, dict]:
    split, bank, num_class_boxes, text = held_out
    index = torch.arange(num_class_boxes)
    results = {}
    for scale in crop_scales:
        crops = fixed_crops(bank, int(model.visual.input_resolution), scale, index)
        images = encode_crops(model, crops)
        results[scale] = zero_shot_accuracy(
            images, bank.labels[index], text, split.classes, split.novel_classes
        )
    return results


def _nearest_class_cosine(model, held_out) -> Dict[str, float]:
    _, bank, num_class_boxes, text = held_out
    images = encode_crops(model, fixed_crops(bank, int(model.visual.input_resolution), 1.0))
    nearest = (images @ text.t()).max(dim=1).values
    others = nearest[num_class_boxes:]
    return {
        "class_objects": float(nearest[:num_class_boxes].mean()),
        "other_objects": float(others.mean()) if len(others) else float("nan"),
    }


def evaluate_teacher(model, world_dir: str, templates, crop_scales=(1.0,)) -> Dict[float, dict]:
    """Zero-shot accuracy ({"all", "novel"}) on the ``teacher_val`` class boxes, per crop scale."""
    return _accuracy(model, _held_out(model, world_dir, templates), crop_scales)


def nearest_class_cosine(model, world_dir: str, templates) -> Dict[str, float]:
    """Mean cosine of the ``teacher_val`` crops (1x) to their nearest class text, for the class
    objects and for the world's objects of no class (distractors).

    A teacher with no words for distractors puts them near some class, and a detector distilled
    from it learns to call them that class; ``other_objects`` well below ``class_objects`` says
    the teacher keeps them apart.
    """
    return _nearest_class_cosine(model, _held_out(model, world_dir, templates))


def ensure_teacher(
    world_dir: str, output_dir: str, cfg: Optional[TeacherConfig] = None, force: bool = False
) -> dict:
    """Train the teacher into ``output_dir`` unless one of this config and world is complete there.

    Returns:
        The teacher's manifest (a dict; ``load_clip(output_dir)`` loads the teacher).
    """
    cfg = cfg or TeacherConfig()
    world = _world_key(world_dir)
    if not force:
        manifest = _is_complete(output_dir, cfg, world)
        if manifest is not None:
            logger.info(f"teacher: {output_dir} is up to date; reusing it")
            return manifest
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise TeacherError(f"{output_dir} exists and is not a folder; choose another output folder")
    os.makedirs(output_dir, exist_ok=True)
    manifest_path = os.path.join(output_dir, TEACHER_MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)

    split = load_split(os.path.join(world_dir, "split.json"))
    start = time.perf_counter()
    bank = load_crop_bank(world_dir, TRAIN_SET, split.classes)
    num_class_boxes, other_names = len(bank), []
    if cfg.other_objects_fraction > 0:
        bank, other_names = add_unannotated_objects(bank, world_dir, TRAIN_SET, len(split.classes))
    logger.info(
        f"teacher: {num_class_boxes} class boxes and {len(bank) - num_class_boxes} boxes of "
        f"{len(other_names)} other concepts from {len(bank.images)} images"
    )
    model, stats = train_teacher(bank, split.classes, cfg, other_names)
    checkpoint = os.path.join(output_dir, TEACHER_CHECKPOINT)
    save_openai_archive(model, checkpoint)

    # Scored through the loader, so the numbers are those of what consumers load.
    loaded, info = load_clip(checkpoint)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        held_out = _held_out(loaded, world_dir, cfg.templates)
        heldout, context = _accuracy(loaded, held_out, (1.0, 1.5)).values()
        nearest = _nearest_class_cosine(loaded, held_out)
    finally:
        torch.set_num_threads(previous_threads)
    manifest = {
        "checkpoint": TEACHER_CHECKPOINT,
        "fingerprint": info.fingerprint,
        "config": cfg.to_dict(),
        "world": world,
        "architecture": cfg.architecture(),
        "input_resolution": info.input_resolution,
        "embed_dim": info.embed_dim,
        "templates": list(cfg.templates),
        "seed": cfg.seed,
        "steps": stats["steps"],
        "training_seconds": round(stats["training_seconds"], 1),
        "total_seconds": round(time.perf_counter() - start, 1),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "num_train_boxes": num_class_boxes,
        "num_other_boxes": len(bank) - num_class_boxes,
        "other_concepts": other_names,
        "train_accuracy": stats["train_accuracy"],
        "heldout_accuracy_all": heldout["all"],
        "heldout_accuracy_novel": heldout["novel"],
        "heldout_accuracy_all_1.5x": context["all"],
        "nearest_class_cosine": nearest,
        "classes": list(split.classes),
        "novel_classes": list(split.novel_classes),
    }
    write_json(manifest_path, manifest, indent=2)
    logger.info(
        f"teacher: held-out zero-shot accuracy {heldout['all']:.3f} (novel {heldout['novel']:.3f}, "
        f"1.5x crops {context['all']:.3f}); mean cosine to the nearest class text: class objects "
        f"{nearest['class_objects']:.2f}, other objects {nearest['other_objects']:.2f}; saved {checkpoint}"
    )
    return manifest
