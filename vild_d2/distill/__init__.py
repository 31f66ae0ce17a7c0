"""Distillation targets: stage-1 proposals -> region crops -> CLIP region encoder -> embedding
cache (written resumably, read memory-mapped by training). The compiled crop kernel is optional:
the torch operations in ``region_crops.py`` are the reference it matches bit for bit."""
from .embedding_cache import CacheEntry, CacheError, EmbeddingCache, write_cache
from .precompute import PrecomputeOptions, run_precompute
from .proposals import build_stage1_model, select_proposals, stage1_inference_cfg
from .region_encoder import RegionEncoder
