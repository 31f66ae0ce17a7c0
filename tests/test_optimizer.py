"""SOLVER.OPTIMIZER: SGD stays detectron2's; AdamW takes the same parameter groups."""
import pytest
import torch
from detectron2.config import get_cfg

from vild_d2 import add_vild_config
from vild_d2.engine.optimizer import build_optimizer


def _cfg(name):
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.SOLVER.OPTIMIZER = name
    cfg.SOLVER.BASE_LR = 0.001
    return cfg


def _model():
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                               torch.nn.LazyLinear(2))


def test_adamw_uses_sgds_parameter_groups_and_steps():
    model = _model()
    model(torch.zeros(1, 3, 5, 5))
    sgd, adamw = build_optimizer(_cfg("SGD"), model), build_optimizer(_cfg("AdamW"), model)
    assert isinstance(sgd, torch.optim.SGD) and isinstance(adamw, torch.optim.AdamW)
    assert [g["weight_decay"] for g in adamw.param_groups] == [g["weight_decay"] for g in sgd.param_groups]
    before = [p.detach().clone() for p in model.parameters()]
    model(torch.randn(2, 3, 5, 5)).sum().backward()
    adamw.step()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_an_unknown_optimizer_is_named_in_the_error():
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER is 'Adam'"):
        build_optimizer(_cfg("Adam"), _model())
