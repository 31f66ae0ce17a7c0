"""Which class names the detector scores against, and their text embeddings."""
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from detectron2.data import MetadataCatalog

from ..teacher.text_embeddings import text_embeddings_for
from ..utils import ConfigError


def class_embeddings(cfg, names: Sequence[str], synonyms=None) -> torch.Tensor:
    """[K, D] frozen class embeddings for ``names`` (and, per class, the ``synonyms`` averaged into
    it) under ``cfg``'s CLIP model and prompts."""
    vild = cfg.MODEL.VILD
    emb = text_embeddings_for(
        vild.CLIP_MODEL,
        list(names),
        prompt_spec=list(vild.PROMPT_TEMPLATES),
        cache_dir=vild.TEXT_EMBEDDINGS_CACHE_DIR or None,
        precomputed_path=vild.TEXT_EMBEDDINGS_PATH,
        synonyms=synonyms,
    )
    if emb.shape[1] != vild.EMBED_DIM:
        raise ConfigError(
            f"CLIP model '{vild.CLIP_MODEL}' embeds in {emb.shape[1]} dimensions but "
            f"MODEL.VILD.EMBED_DIM is {vild.EMBED_DIM}; set MODEL.VILD.EMBED_DIM {emb.shape[1]}"
        )
    return torch.as_tensor(emb)


def novel_mask(names: Sequence[str], novel: Sequence[str]) -> torch.Tensor:
    novel = set(novel)
    return torch.tensor([n in novel for n in names], dtype=torch.bool)


def dataset_vocabulary(cfg, dataset_name: str) -> Tuple[List[str], List[str]]:
    """(class names, novel names) the detector uses on ``dataset_name``.

    MODEL.VILD.TEST_VOCABULARY / TEST_NOVEL_CLASSES override the dataset's metadata.
    """
    meta = MetadataCatalog.get(dataset_name)
    names = list(cfg.MODEL.VILD.TEST_VOCABULARY) or list(meta.thing_classes)
    novel = list(cfg.MODEL.VILD.TEST_NOVEL_CLASSES) or list(meta.get("novel_classes", []))
    return names, novel


def dataset_synonyms(cfg, dataset_name: str, names: Sequence[str]) -> Optional[List[List[str]]]:
    """Per class of ``names``, the synonyms ``dataset_name``'s metadata gives it (LVIS does), when
    MODEL.VILD.TEXT_SYNONYMS asks for them; None otherwise."""
    meta = MetadataCatalog.get(dataset_name)
    given = meta.get("class_synonyms", None)
    if not cfg.MODEL.VILD.TEXT_SYNONYMS or given is None:
        return None
    by_name = dict(zip(meta.thing_classes, given))
    return [list(by_name.get(n) or [n]) for n in names]


def resolve_class_embeddings(cfg, training: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Embeddings and novel mask of the training vocabulary (training=True) or the first test
    dataset's vocabulary."""
    if training:
        dataset = cfg.DATASETS.TRAIN[0]
        names = list(MetadataCatalog.get(dataset).thing_classes)
        return class_embeddings(cfg, names, dataset_synonyms(cfg, dataset, names)), novel_mask(names, [])
    dataset = cfg.DATASETS.TEST[0]
    names, novel = dataset_vocabulary(cfg, dataset)
    return class_embeddings(cfg, names, dataset_synonyms(cfg, dataset, names)), novel_mask(names, novel)


def vocabulary_owner(model: nn.Module) -> Optional[nn.Module]:
    """The part of ``model`` that holds its class embeddings and swaps them (``set_vocabulary``,
    ``text_embeddings``, ``novel_class_mask``): the ViLD box predictor, or a model that scores
    classes itself (CLIP on crops); None for a model of fixed classes. Wrappers (DDP, autocast,
    timers) are looked through by their ``module`` / ``model`` attribute."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        for owner in (model, getattr(getattr(model, "roi_heads", None), "box_predictor", None)):
            if callable(getattr(owner, "set_vocabulary", None)):
                return owner
        inner = getattr(model, "module", None) or getattr(model, "model", None)
        if not isinstance(inner, nn.Module):
            return None
        model = inner
    return None


def set_model_vocabulary(model, cfg, names: Sequence[str], novel: Optional[Sequence[str]] = None,
                         synonyms=None):
    """Point a built ViLD model (or CLIP on crops) at another vocabulary, without retraining."""
    owner = vocabulary_owner(model)
    if owner is None:
        raise ConfigError(
            f"{type(model).__name__} has no text classifier to take a vocabulary; build it from a "
            "ViLD config (MODEL.ROI_HEADS.NAME ViLDROIHeads) or the CLIP-on-crops one"
        )
    owner.set_vocabulary(class_embeddings(cfg, names, synonyms), novel_mask(names, novel or []))
    return model
