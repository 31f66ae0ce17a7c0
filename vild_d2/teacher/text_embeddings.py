"""Class text embeddings: a prompt ensemble through CLIP's text encoder, cached to .npy.

Each template's embedding is L2-normalised, the embeddings are averaged over templates, and the
mean is renormalised (the ViLD/CLIP prompt ensemble).
"""
import json
import os
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import atomic_write, digest, write_json


@torch.no_grad()
def encode_class_names(model, names: Sequence[str], templates: Sequence[str], batch_size: int = 256):
    """[len(names), D] float32 prompt-ensemble embeddings from a loaded CLIP model."""
    import clip

    if not templates:
        raise ValueError("at least one prompt template is needed, e.g. 'a photo of a {}.'")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ValueError(f"prompt templates {bad} have no '{{}}' for the class name")
    device = next(model.parameters()).device
    out = []
    for name in names:
        prompts = [t.format(name) for t in templates]
        embs = []
        for i in range(0, len(prompts), batch_size):
            tokens = clip.tokenize(prompts[i : i + batch_size], truncate=True).to(device)
            embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        out.append(F.normalize(torch.cat(embs).mean(0), dim=-1))
    return torch.stack(out).cpu() if out else torch.zeros(0, model.text_projection.shape[1])


def cache_key(fingerprint: str, templates: Sequence[str], names: Sequence[str]) -> str:
    return digest({"clip": fingerprint, "templates": list(templates), "names": list(names)}, length=20)


def text_embeddings_for(
    clip_model: str,
    names: Sequence[str],
    templates: Optional[Sequence[str]] = None,
    cache_dir: Optional[str] = None,
    precomputed_path: str = "",
) -> np.ndarray:
    """Class embeddings [K, D] for ``names``: from a precomputed .npy, the cache, or CLIP.

    ``templates`` None means the checkpoint's own templates (the embedded teacher's manifest)
    or the project's default list.
    """
    if precomputed_path:
        return load_precomputed(precomputed_path, names)
    from .loader import load_clip
    from .templates import DEFAULT_TEMPLATES

    model, info = None, None
    fingerprint = _fingerprint_without_loading(clip_model)
    if fingerprint is None or templates is None:
        model, info = load_clip(clip_model)
        fingerprint = info.fingerprint
        if templates is None:
            templates = info.templates or DEFAULT_TEMPLATES
    path = None
    if cache_dir:
        path = os.path.join(cache_dir, f"{cache_key(fingerprint, templates, names)}.npy")
        if os.path.isfile(path):
            return np.load(path)
    if model is None:
        model, info = load_clip(clip_model)
    emb = encode_class_names(model, names, templates).numpy().astype(np.float32)
    if path:
        save_text_embeddings(path, emb, {"clip": clip_model, "fingerprint": fingerprint,
                                         "templates": list(templates), "names": list(names)})
    return emb


def save_text_embeddings(path: str, embeddings: np.ndarray, record: dict) -> None:
    """``embeddings`` as ``path`` (.npy) and ``record`` (names, templates, checkpoint) as the
    sidecar ``<path without .npy>.json``, each atomically. The sidecar, which says what the file
    holds, is removed first and written last, so a run killed half-way never leaves a pair that
    looks complete."""
    sidecar = os.path.splitext(path)[0] + ".json"
    if os.path.isfile(sidecar):
        os.remove(sidecar)
    with atomic_write(path, "wb") as f:
        np.save(f, np.asarray(embeddings, np.float32))
    write_json(sidecar, record)


def load_precomputed(path: str, names: Sequence[str]) -> np.ndarray:
    """Rows of a precomputed [N, D] .npy for ``names``.

    With a sidecar ``<path without .npy>.json`` holding {"names": [...]} (as this module writes),
    the rows are looked up by name, so one file serves any sub-vocabulary (e.g. base classes for
    training, all classes for testing); without one, the file must hold exactly len(names) rows.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"text embeddings file {path} does not exist; write it with "
            "tools/compute_text_embeddings.py or clear MODEL.VILD.TEXT_EMBEDDINGS_PATH"
        )
    emb = np.load(path).astype(np.float32)
    sidecar = os.path.splitext(path)[0] + ".json"
    if emb.ndim == 2 and os.path.isfile(sidecar):
        with open(sidecar) as f:
            stored = json.load(f).get("names", [])
        row = {n: i for i, n in enumerate(stored)}
        missing = [n for n in names if n not in row]
        if missing or len(stored) != len(emb):
            raise ValueError(
                f"text embeddings file {path} lacks classes {missing[:5]} (its names are in "
                f"{sidecar}); recompute it for this vocabulary"
            )
        emb = emb[[row[n] for n in names]]
    elif emb.ndim != 2 or emb.shape[0] != len(names):
        raise ValueError(
            f"text embeddings file {path} has shape {tuple(emb.shape)} but the vocabulary has "
            f"{len(names)} classes; recompute it for this vocabulary"
        )
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _fingerprint_without_loading(clip_model: str) -> Optional[str]:
    from .loader import checkpoint_fingerprint

    try:
        return checkpoint_fingerprint(clip_model)
    except Exception:
        return None
