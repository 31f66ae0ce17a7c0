"""The one place that loads a CLIP checkpoint.

Accepted specs: an OpenAI model name (``clip.available_models()``), a path to an OpenAI TorchScript
archive, a path to a state-dict file (a plain dict or ``{"state_dict": ...}``) or the embedded
teacher (its ``clip_teacher.pt`` or the directory holding its ``manifest.json``). Whatever the
source, the result is an eval-mode float32 ``clip.model.CLIP`` rebuilt with OpenAI's
``build_model``, plus a ``ClipInfo`` describing it.
"""

import json
import os
import urllib.error
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import clip
import torch
from clip.model import CLIP, build_model

from ..utils import UserError, digest

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ClipInfo",
    "ClipLoadError",
    "TEACHER_CHECKPOINT",
    "TEACHER_MANIFEST",
    "checkpoint_fingerprint",
    "clip_cache_dir",
    "clip_normalize",
    "file_fingerprint",
    "load_clip",
]

# The normalisation of OpenAI's preprocess (clip.clip._transform).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

TEACHER_CHECKPOINT = "clip_teacher.pt"
TEACHER_MANIFEST = "manifest.json"

# Buffers OpenAI's archives carry beside the weights; build_model drops them.
_ARCHIVE_EXTRA_KEYS = ("input_resolution", "context_length", "vocab_size")
_REQUIRED_KEYS = ("text_projection", "positional_embedding", "token_embedding.weight")


class ClipLoadError(UserError, ValueError):
    """A CLIP spec that does not resolve to a loadable CLIP checkpoint."""


@dataclass(frozen=True)
class ClipInfo:
    source: str  # the model name, or the path of the checkpoint file that was loaded
    fingerprint: str  # first 16 hex digits of the sha256 of the checkpoint file's bytes
    input_resolution: int
    embed_dim: int
    context_length: int
    mean: Tuple[float, float, float]
    std: Tuple[float, float, float]
    templates: Optional[Tuple[str, ...]]  # the teacher manifest's templates, else None


def clip_cache_dir() -> str:
    """Where OpenAI model names resolve: $VILD_CLIP_CACHE, else clip.load's ~/.cache/clip."""
    return os.path.expanduser(os.getenv("VILD_CLIP_CACHE") or os.path.join("~", ".cache", "clip"))


def file_fingerprint(path: str) -> str:
    """A stable id of a checkpoint: the first 16 hex digits of its bytes' sha256."""
    return digest(path=path)


def _resolve_model_name(name: str) -> str:
    url = clip.clip._MODELS[name]
    root = clip_cache_dir()
    target = os.path.join(root, os.path.basename(url))
    # OpenAI's URLs carry the file's sha256, as clip.load checks it.
    present = os.path.isfile(target)
    if present and digest(path=target, length=64) == url.split("/")[-2]:
        return target
    try:
        return clip.clip._download(url, root)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        reason = str(getattr(e, "reason", e)).splitlines()[0]
        state = "fails its sha256 check" if present else "is missing"
        raise ClipLoadError(
            f"CLIP model '{name}': {target} {state} and the download failed ({reason}); put "
            f"{url} at {target}, or set $VILD_CLIP_CACHE to the folder holding it"
        ) from None


def _read_teacher_manifest(directory: str) -> Optional[dict]:
    path = os.path.join(directory, TEACHER_MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ClipLoadError(f"teacher manifest {path} is unreadable ({e}); retrain the teacher")
    return manifest if isinstance(manifest, dict) else None


def _resolve(spec: str) -> str:
    if spec in clip.available_models():
        return _resolve_model_name(spec)
    if os.path.isdir(spec):
        manifest = _read_teacher_manifest(spec)
        if manifest is None:
            raise ClipLoadError(
                f"CLIP directory {spec} holds no {TEACHER_MANIFEST}; pass the checkpoint file "
                "itself, or train the teacher there (tools/train_clip_teacher.py)"
            )
        path = os.path.join(spec, manifest.get("checkpoint", TEACHER_CHECKPOINT))
        if not os.path.isfile(path):
            raise ClipLoadError(
                f"teacher directory {spec} lacks its checkpoint {path}; retrain it with "
                "tools/train_clip_teacher.py --force"
            )
        return path
    if os.path.isfile(spec):
        return spec
    raise ClipLoadError(
        f"CLIP checkpoint '{spec}' not found: it is neither a file, a teacher directory nor one "
        f"of {clip.available_models()}; fix the path or the name"
    )


def _read_state_dict(path: str) -> dict:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return dict(torch.jit.load(path, map_location="cpu").state_dict())
    except RuntimeError:
        pass  # not a TorchScript archive: try a state-dict file below
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch raises many types for files it cannot read
        raise ClipLoadError(
            f"{path} is neither a TorchScript archive nor a state-dict file that "
            "torch.load(weights_only=True) reads; pass an OpenAI CLIP .pt archive or a "
            "torch.save'd CLIP state dict"
        ) from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):
        data = data["state_dict"]
    if not isinstance(data, dict):
        raise ClipLoadError(
            f"{path} holds a {type(data).__name__}, not a state dict; save model.state_dict() "
            "(or {'state_dict': model.state_dict()}) instead"
        )
    return data


def _build(state_dict: dict, path: str) -> CLIP:
    has_visual = "visual.proj" in state_dict or "visual.attnpool.positional_embedding" in state_dict
    missing = [k for k in _REQUIRED_KEYS if k not in state_dict]
    if missing or not has_visual:
        missing = missing or ["visual.proj or visual.attnpool.positional_embedding"]
        raise ClipLoadError(
            f"{path} is not a CLIP checkpoint (no {missing[0]}); pass an OpenAI CLIP archive, a "
            "clip.model.CLIP state dict or the teacher's directory"
        )
    weights = {
        k: v for k, v in state_dict.items() if k not in _ARCHIVE_EXTRA_KEYS and torch.is_tensor(v)
    }
    try:
        model = build_model(dict(weights)).float()
        # build_model stores the weights in fp16; loading them again keeps fp32 ones exact.
        model.load_state_dict(weights)
    except (RuntimeError, KeyError, AssertionError, IndexError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ClipLoadError(
            f"{path} does not rebuild as clip.model.CLIP ({reason}); pass a checkpoint of "
            "OpenAI's CLIP architecture"
        ) from None
    return model.eval()


def _teacher_templates(path: str, fingerprint: str) -> Optional[Tuple[str, ...]]:
    """The templates of the teacher manifest beside ``path``, if it describes this very file."""
    try:
        manifest = _read_teacher_manifest(os.path.dirname(os.path.abspath(path)))
    except ClipLoadError:
        return None
    if not manifest or manifest.get("fingerprint") != fingerprint:
        return None
    templates = manifest.get("templates")
    return tuple(templates) if templates else None


def checkpoint_fingerprint(spec: str) -> str:
    """The fingerprint ``load_clip(spec)`` reports, without loading (or downloading) the model."""
    spec = os.fspath(spec)
    if spec in clip.available_models():
        # load_clip only accepts the file whose sha256 is the one in OpenAI's URL.
        return clip.clip._MODELS[spec].split("/")[-2][:16]
    return file_fingerprint(_resolve(spec))


def load_clip(spec: str, device="cpu") -> Tuple[CLIP, ClipInfo]:
    """Load any CLIP checkpoint as an eval-mode float32 ``clip.model.CLIP`` (never a jit module).

    Args:
        spec: an OpenAI model name ("ViT-B/32"; resolved under ``clip_cache_dir()``), the path of
            an OpenAI TorchScript archive or of a state-dict file, or the embedded teacher (its
            checkpoint or its directory).
        device: where to put the model.

    Returns:
        (model, ClipInfo). Raises ClipLoadError on a spec that is not a loadable CLIP checkpoint.
    """
    spec = os.fspath(spec)
    path = _resolve(spec)
    fingerprint = file_fingerprint(path)
    model = _build(_read_state_dict(path), path).to(device)
    info = ClipInfo(
        source=spec if spec in clip.available_models() else path,
        fingerprint=fingerprint,
        input_resolution=int(model.visual.input_resolution),
        embed_dim=int(model.text_projection.shape[1]),
        context_length=int(model.context_length),
        mean=CLIP_MEAN,
        std=CLIP_STD,
        templates=_teacher_templates(path, fingerprint),
    )
    return model, info


def clip_normalize(images_0_1: torch.Tensor, info: ClipInfo) -> torch.Tensor:
    """Normalise float images ``[N, 3, H, W]`` in [0, 1] with CLIP's mean and std."""
    if images_0_1.dim() != 4 or images_0_1.shape[1] != 3:
        raise ValueError(f"expected images of shape [N, 3, H, W], got {tuple(images_0_1.shape)}")
    if not images_0_1.is_floating_point():
        raise ValueError(f"expected float images in [0, 1], got {images_0_1.dtype}")
    mean = images_0_1.new_tensor(info.mean).view(1, 3, 1, 1)
    std = images_0_1.new_tensor(info.std).view(1, 3, 1, 1)
    return (images_0_1 - mean) / std
