"""SOLVER.OPTIMIZER: detectron2's SGD, or AdamW over the same parameter groups."""
import torch
from detectron2.solver import build_optimizer as build_sgd
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping

from ..utils import ConfigError

OPTIMIZERS = ("SGD", "AdamW")


def build_optimizer(cfg, model) -> torch.optim.Optimizer:
    name = cfg.SOLVER.OPTIMIZER
    if name == "SGD":
        return build_sgd(cfg, model)
    if name != "AdamW":
        raise ConfigError(f"SOLVER.OPTIMIZER is '{name}'; use one of {', '.join(OPTIMIZERS)}")
    params = get_default_optimizer_params(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
        weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
    )
    return maybe_add_gradient_clipping(
        cfg, torch.optim.AdamW(params, lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
    )
