"""Checkpoints checked before they are trusted: each one's size and sha256 recorded when it is
saved, a resume that falls back to the newest checkpoint that is sound, and one-line errors for a
checkpoint that does not load."""
import json
import logging
import os
import re
from typing import List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer

from .utils import UserError, file_damage, file_record, write_json

logger = logging.getLogger(__name__)

DIGESTS = "checkpoint_digests.json"  # beside the checkpoints: {file name: {"bytes", "sha256"}}


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that is missing or does not load."""


def _records(save_dir: str) -> dict:
    try:
        with open(os.path.join(save_dir, DIGESTS)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def checkpoint_damage(path: str, records: Optional[dict] = None) -> Optional[str]:
    """Why the checkpoint ``path`` cannot be trusted, or None: against its recorded size and
    sha256 when it has a record, else by loading it."""
    records = _records(os.path.dirname(path)) if records is None else records
    record = records.get(os.path.basename(path))
    if record is not None:
        return file_damage(path, record)
    try:
        torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:  # torch raises many types for damaged files
        return f"does not load ({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})"
    return None


def _iteration(name: str) -> float:
    if name == "model_final.pth":
        return float("inf")
    match = re.fullmatch(r"model_(\d+)\.pth", name)
    return int(match.group(1)) if match else -1


def newest_sound_checkpoint(save_dir: str) -> Tuple[Optional[str], List[Tuple[str, str]]]:
    """The newest training checkpoint of ``save_dir`` that is sound, and the (path, reason) of
    each newer one skipped."""
    names = sorted((n for n in os.listdir(save_dir) if _iteration(n) >= 0), key=_iteration, reverse=True)
    records, skipped = _records(save_dir), []
    for name in names:
        path = os.path.join(save_dir, name)
        why = checkpoint_damage(path, records)
        if why is None:
            return path, skipped
        skipped.append((path, why))
    return None, skipped


class VerifiedCheckpointer(DetectionCheckpointer):
    """DetectionCheckpointer that records each saved file's size and sha256, resumes from the
    newest sound checkpoint, and refuses a damaged one in one line."""

    def save(self, name: str, **kwargs) -> None:
        super().save(name, **kwargs)
        if not self.save_to_disk:
            return
        path = os.path.join(self.save_dir, f"{name}.pth")
        records = _records(self.save_dir)
        records[os.path.basename(path)] = file_record(path)
        write_json(os.path.join(self.save_dir, DIGESTS), records)

    def resume_or_load(self, path: str, *, resume: bool = True):
        if resume and self.has_checkpoint():
            sound, skipped = newest_sound_checkpoint(self.save_dir)
            for bad, why in skipped:
                logger.warning(f"checkpoint {bad} {why}: skipped")
            if sound is None:
                logger.warning(f"no checkpoint in {self.save_dir} is sound: starting from MODEL.WEIGHTS")
                resume = False
            elif skipped:
                logger.warning(f"resuming from {sound}")
                self.tag_last_checkpoint(os.path.basename(sound))
        return super().resume_or_load(path, resume=resume)

    def load(self, path: str, checkpointables=None):
        if path and os.path.isfile(path):
            why = checkpoint_damage(path)
            if why:
                raise CheckpointError(f"checkpoint {path} {why}; point MODEL.WEIGHTS at a sound one "
                                      "(or retrain it)")
        elif path and "://" not in path:  # URLs are fetched by detectron2's path manager
            raise CheckpointError(f"checkpoint {path} does not exist; fix MODEL.WEIGHTS (or train "
                                  "the model first)")
        return super().load(path, checkpointables)
