"""Baselines the ViLD results are compared with."""
from . import clip_on_crops as _clip_on_crops  # noqa: F401  (registers CLIPOnCropsRCNN)
from .clip_on_crops import CLIPOnCropsRCNN, clip_on_crops_scores
