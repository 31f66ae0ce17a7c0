"""Class text embeddings: a prompt ensemble through CLIP's text encoder, cached to .npy.

Each prompt's embedding is L2-normalised, the embeddings are averaged over the prompts (of every
template and, where a class has them, every synonym), and the mean is renormalised (the ViLD/CLIP
prompt ensemble).
"""
import json
import os
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ..utils import UserError, atomic_write, digest, write_json
from .templates import PromptEnsemble, resolve_prompts

Synonyms = Optional[Sequence[Sequence[str]]]  # per class: the names it also goes by


@torch.no_grad()
def encode_class_names(model, names: Sequence[str], prompts, synonyms: Synonyms = None,
                       batch_size: int = 256) -> torch.Tensor:
    """[len(names), D] float32 prompt-ensemble embeddings from a loaded CLIP model.

    Args:
        prompts: a PromptEnsemble, or templates read as written.
        synonyms: per class, the names whose prompts are averaged (default: the class name alone).
    """
    ensemble = prompts if isinstance(prompts, PromptEnsemble) else PromptEnsemble(tuple(prompts))
    device = next(model.parameters()).device
    out = []
    for k, name in enumerate(names):
        words = list(synonyms[k]) if synonyms is not None and synonyms[k] else [name]
        texts = [p for word in words for p in ensemble.prompts(word)]
        embs = []
        for i in range(0, len(texts), batch_size):
            tokens = _tokenize(texts[i : i + batch_size], name).to(device)
            embs.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
        out.append(F.normalize(torch.cat(embs).mean(0), dim=-1))
    return torch.stack(out).cpu() if out else torch.zeros(0, model.text_projection.shape[1])


class PromptError(UserError, ValueError):
    """A class name whose prompts do not fit CLIP's text encoder."""


class TextEmbeddingsError(UserError, ValueError):
    """A file of class text embeddings that does not serve the config's vocabulary or prompts."""


def _tokenize(texts: Sequence[str], name: str) -> torch.Tensor:
    import clip

    try:
        return clip.tokenize(list(texts))
    except RuntimeError:  # clip.tokenize: "Input ... is too long for context length 77"
        longest = max(texts, key=len)
        raise PromptError(f"class name {name!r} makes a prompt longer than CLIP's 77 tokens "
                          f"({longest[:60]!r}...); shorten the name") from None


def text_embedding_record(clip_model: str, names: Sequence[str], prompt_spec: Sequence[str] = (),
                          synonyms: Synonyms = None) -> Tuple[dict, Optional[torch.nn.Module]]:
    """What a file of class embeddings holds: the CLIP checkpoint and its fingerprint, the prompt
    ensemble ``prompt_spec`` means (``resolve_prompts``), the names and their synonyms; and the
    model, when finding them out loaded it."""
    from .loader import load_clip

    model, checkpoint_templates = None, None
    fingerprint = _fingerprint_without_loading(clip_model)
    if fingerprint is None or not list(prompt_spec):
        model, info = load_clip(clip_model)
        fingerprint, checkpoint_templates = info.fingerprint, info.templates
    ensemble = resolve_prompts(prompt_spec, checkpoint_templates)
    record = {"clip": clip_model, "fingerprint": fingerprint, **ensemble.key(), "names": list(names),
              "synonyms": None if synonyms is None else [list(s) for s in synonyms]}
    return record, model


def compute_text_embeddings(record: dict, model=None) -> np.ndarray:
    """The [K, D] embeddings a ``text_embedding_record`` describes."""
    if model is None:
        from .loader import load_clip

        model, _ = load_clip(record["clip"])
    ensemble = PromptEnsemble(tuple(record["templates"]), record["this_is"])
    return encode_class_names(model, record["names"], ensemble, record["synonyms"]).numpy()


def text_embeddings_for(
    clip_model: str,
    names: Sequence[str],
    prompt_spec: Sequence[str] = (),
    cache_dir: Optional[str] = None,
    precomputed_path: str = "",
    synonyms: Synonyms = None,
) -> np.ndarray:
    """Class embeddings [K, D] for ``names``: from a precomputed .npy, the cache, or CLIP.

    ``prompt_spec`` is a ``MODEL.VILD.PROMPT_TEMPLATES`` value (``resolve_prompts``).
    """
    if precomputed_path:
        return load_precomputed(precomputed_path, names, prompt_spec, synonyms)
    record, model = text_embedding_record(clip_model, names, prompt_spec, synonyms)
    path = None
    if cache_dir:
        key = digest({k: v for k, v in record.items() if k != "clip"}, length=20)
        path = os.path.join(cache_dir, f"{key}.npy")
        if os.path.isfile(path):
            return np.load(path)
    emb = compute_text_embeddings(record, model).astype(np.float32)
    if path:
        save_text_embeddings(path, emb, record)
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


def load_precomputed(path: str, names: Sequence[str], prompt_spec: Sequence[str] = (),
                     synonyms: Synonyms = None) -> np.ndarray:
    """Rows of a precomputed [N, D] .npy for ``names``.

    With a sidecar ``<path without .npy>.json`` (as this module and tools/compute_text_embeddings.py
    write it), the rows are looked up by name, so one file serves any sub-vocabulary (e.g. base
    classes for training, all classes for testing), and a file made with other prompts than
    ``prompt_spec`` names (or with other synonyms) is refused; without one, the file must hold
    exactly len(names) rows.
    """
    if not os.path.isfile(path):
        raise TextEmbeddingsError(
            f"text embeddings file {path} does not exist; write it with "
            "tools/compute_text_embeddings.py or clear MODEL.VILD.TEXT_EMBEDDINGS_PATH"
        )
    emb = np.load(path).astype(np.float32)
    sidecar = os.path.splitext(path)[0] + ".json"
    if emb.ndim == 2 and os.path.isfile(sidecar):
        with open(sidecar) as f:
            record = json.load(f)
        stored = record.get("names", [])
        _check_prompts(path, record, prompt_spec, synonyms is not None)
        row = {n: i for i, n in enumerate(stored)}
        missing = [n for n in names if n not in row]
        if missing or len(stored) != len(emb):
            raise TextEmbeddingsError(
                f"text embeddings file {path} lacks classes {missing[:5]} (its names are in "
                f"{sidecar}); recompute it for this vocabulary"
            )
        emb = emb[[row[n] for n in names]]
    elif emb.ndim != 2 or emb.shape[0] != len(names):
        raise TextEmbeddingsError(
            f"text embeddings file {path} has shape {tuple(emb.shape)} but the vocabulary has "
            f"{len(names)} classes; recompute it for this vocabulary"
        )
    return emb / np.linalg.norm(emb, axis=1, keepdims=True)


def _check_prompts(path: str, record: dict, prompt_spec: Sequence[str], with_synonyms: bool) -> None:
    """A file's prompts and synonyms against the config's (a set or templates it names)."""
    if "templates" not in record or not list(prompt_spec):
        return
    want = resolve_prompts(prompt_spec)
    if record["templates"] != list(want.templates) or record.get("this_is", False) != want.this_is:
        raise TextEmbeddingsError(
            f"text embeddings file {path} was made with other prompts than MODEL.VILD."
            f"PROMPT_TEMPLATES {list(prompt_spec)}; recompute it with tools/compute_text_embeddings.py "
            f"--templates {'|'.join(prompt_spec)}"
        )
    if bool(record.get("synonyms")) != with_synonyms:
        raise TextEmbeddingsError(
            f"text embeddings file {path} was made {'without' if with_synonyms else 'with'} the "
            "classes' synonyms, the config asks the opposite (MODEL.VILD.TEXT_SYNONYMS); recompute "
            "it with tools/compute_text_embeddings.py" + ("" if with_synonyms else " without --synonyms")
        )


def _fingerprint_without_loading(clip_model: str) -> Optional[str]:
    from .loader import checkpoint_fingerprint

    try:
        return checkpoint_fingerprint(clip_model)
    except Exception:
        return None
