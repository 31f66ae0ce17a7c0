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


@pytest.mark.parametrize("path", ["configs/voc_ovd/vild.yaml", "configs/coco_ovd/vild.yaml",
                                  "configs/lvis_ovd/vild.yaml", "configs/coco_ovd/vild_ensemble.yaml",
                                  "configs/lvis_ovd/vild_ensemble.yaml"])
def test_real_data_defaults_are_the_official_codes(path):
    """What the official ViLD code does (tensorflow/tpu projects/vild), read off the merged configs."""
    from vild_d2.engine import load_cfg

    cfg = load_cfg(os.path.join(ROOT, path), cpu_fallback=False)
    vild = cfg.MODEL.VILD
    assert list(vild.PROMPT_TEMPLATES) == ["vild"]  # the 63 templates and their rules
    assert vild.TEMPERATURE == 0.01 and vild.IMAGE_TEMPERATURE == 0.0
    assert vild.IMAGE_LOSS_WEIGHT == 0.5 and vild.DISTILL.NUM_PROPOSALS == 300
    assert list(vild.DISTILL.CROP_SCALES) == [1.0, 1.5] and vild.DISTILL.ENSEMBLE_CROPS
    assert vild.DISTILL.MIN_BOX_SIZE == 0  # no size filter on the cached proposals
    assert vild.ENSEMBLE_LAMBDA == pytest.approx(2 / 3)
    # nothing beyond the paper is on
    assert vild.OBJECTNESS_WEIGHT == 0 and vild.UNLABELLED_OBJECTNESS == 0
    assert vild.LABEL_ASSIGNMENT == "iou" and cfg.SOLVER.OPTIMIZER == "SGD" and not cfg.SOLVER.CPU_BF16
    # inference: every detection scored, NMS 0.5, up to 300 per image, 1000 test proposals
    assert cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST == 0.0 and cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST == 0.5
    assert cfg.TEST.DETECTIONS_PER_IMAGE == 300 and cfg.MODEL.RPN.POST_NMS_TOPK_TEST == 1000
    assert cfg.MODEL.ROI_BOX_HEAD.CLS_AGNOSTIC_BBOX_REG
    assert cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 512 and cfg.MODEL.ROI_HEADS.POSITIVE_FRACTION == 0.25
    assert cfg.DATALOADER.SAMPLER_TRAIN == "TrainingSampler"  # no repeat-factor sampling, LVIS included
    assert vild.TEXT_SYNONYMS == ("lvis" in path)
    if "voc_ovd" in path:
        return
    # the paper's recipe: from scratch in one stage, SyncBN, 4 conv + 2 fc head with BN, LSJ
    assert cfg.MODEL.WEIGHTS == "" and cfg.MODEL.BACKBONE.FREEZE_AT == 0
    assert cfg.MODEL.RESNETS.NORM == cfg.MODEL.FPN.NORM == cfg.MODEL.ROI_BOX_HEAD.NORM == "SyncBN"
    head = cfg.MODEL.ROI_BOX_HEAD
    assert (head.NAME, head.NUM_CONV, head.CONV_DIM, head.NUM_FC, head.FC_DIM) == ("ViLDConvFCHead", 4, 256, 2, 1024)
    lsj = cfg.INPUT.LSJ
    assert lsj.ENABLED and (lsj.IMAGE_SIZE, lsj.MIN_SCALE, lsj.MAX_SCALE) == (1024, 0.1, 2.0)
    s = cfg.SOLVER
    assert (s.IMS_PER_BATCH, s.BASE_LR, s.MOMENTUM, s.WEIGHT_DECAY, s.WEIGHT_DECAY_BIAS) == (256, 0.32, 0.9, 4e-5, 0.0)
    assert (s.WARMUP_ITERS, s.WARMUP_FACTOR, s.MAX_ITER, tuple(s.STEPS)) == (1000, 0.01, 180000, (162000, 171000))
    assert not s.CLIP_GRADIENTS.ENABLED
