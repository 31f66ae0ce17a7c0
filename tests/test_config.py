import os

import pytest
import yaml
from detectron2.config import get_cfg

from vild_d2 import add_vild_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _leaf_keys(node, prefix=""):
    for k, v in node.items():
        if hasattr(v, "items"):
            yield from _leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def test_add_vild_config_merges_and_every_key_has_a_default():
    cfg = get_cfg()
    add_vild_config(cfg)
    keys = dict(_leaf_keys(cfg.MODEL.VILD))
    assert len(keys) >= 15
    assert all(v is not None for v in keys.values())
    assert cfg.MODEL.VILD.TEMPERATURE == 0.01
    assert cfg.MODEL.VILD.IMAGE_LOSS_WEIGHT == 0.5
    assert cfg.MODEL.VILD.DISTILL.NUM_PROPOSALS == 300
    assert list(cfg.MODEL.VILD.DISTILL.CROP_SCALES) == [1.0, 1.5]
    cfg.merge_from_list(["MODEL.VILD.TEMPERATURE", "0.05", "MODEL.VILD.LABEL_ASSIGNMENT", "iot"])
    assert cfg.MODEL.VILD.TEMPERATURE == 0.05 and cfg.MODEL.VILD.LABEL_ASSIGNMENT == "iot"


def test_every_config_key_carries_a_comment():
    import inspect

    import vild_d2.config as config_module

    lines = inspect.getsource(config_module).splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("_C.MODEL.VILD.") and "= CN()" not in line:
            above = lines[i - 1].strip()
            assert above.startswith("#"), f"no comment above: {line.strip()}"


def _own_leaf_keys(tree, prefix=""):
    for k, v in tree.items():
        if k in ("_BASE_", "VERSION"):  # VERSION marks the file format (detectron2 warns without it)
            continue
        if isinstance(v, dict):
            yield from _own_leaf_keys(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def _value(cfg, key):
    for part in key.split("."):
        cfg = cfg[part]
    return list(cfg) if isinstance(cfg, (list, tuple)) else cfg


CONFIGS = sorted(
    os.path.relpath(os.path.join(d, f), ROOT)
    for d, _, files in os.walk(os.path.join(ROOT, "configs")) for f in files if f.endswith(".yaml")
)


@pytest.mark.parametrize("path", CONFIGS)
def test_config_loads_and_sets_no_value_its_base_already_has(path):
    """Every key a config file writes changes the value it inherits (from its _BASE_ chain, or
    detectron2's and vild_d2's defaults): nothing is restated."""
    from vild_d2.engine import load_cfg

    full = os.path.join(ROOT, path)
    with open(full) as f:
        own = yaml.safe_load(f)
    cfg = load_cfg(full)
    if own.get("_BASE_"):
        base = load_cfg(os.path.join(os.path.dirname(full), own["_BASE_"]))
    else:
        base = get_cfg()
        add_vild_config(base)
    restated = [k for k in _own_leaf_keys(own) if _value(cfg, k) == _value(base, k)]
    assert not restated, f"{path} restates {restated}"
