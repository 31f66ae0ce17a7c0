from detectron2.config import get_cfg

from vild_d2 import add_vild_config


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
