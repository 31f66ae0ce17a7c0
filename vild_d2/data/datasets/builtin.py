"""Registration of the built-in open-vocabulary datasets, rooted at $DETECTRON2_DATASETS."""
import os

from ..splits import load_split
from .coco_ovd import register_coco_ovd
from .lvis_ovd import register_lvis_ovd
from .ovd_voc import register_ovd_voc

# (name prefix, [(VOC folder, image set), ...], year used by the evaluator)
_VOC_SETS = [
    ("voc_ovd_2007_trainval", [("VOC2007", "trainval")], 2007),
    ("voc_ovd_2007_test", [("VOC2007", "test")], 2007),
    ("voc_ovd_2012_trainval", [("VOC2012", "trainval")], 2012),
    ("voc_ovd_0712_trainval", [("VOC2007", "trainval"), ("VOC2012", "trainval")], 2007),
]


def datasets_root() -> str:
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def register_all_voc_ovd(root: str, split_name: str = "voc_16_4") -> None:
    """Test sets hold all classes; training sets get a "_base" and an "_all" (oracle) variant."""
    split = load_split(split_name)
    for prefix, parts, year in _VOC_SETS:
        dirs = [os.path.join(root, folder) for folder, _ in parts]
        sets = [image_set for _, image_set in parts]
        if prefix.endswith("_test"):
            register_ovd_voc(prefix, dirs, sets, split, subset="all", year=year)
        else:
            for subset in ("base", "all"):
                register_ovd_voc(f"{prefix}_{subset}", dirs, sets, split, subset=subset, year=year)


def register_shapes_ovd(root: str, name: str = "shapes_ovd", split=None, prefix: str = None) -> None:
    """The embedded world (datasets/prepare_shapes_ovd.py) under ``root/name``, registered as
    ``<prefix>_trainval_base``, ``<prefix>_trainval_all`` and ``<prefix>_test`` (prefix = name).

    Its split is the one the generator wrote beside the tree, else the default 12/4 split.
    """
    prefix = prefix or name
    dirname = os.path.join(root, name)
    if split is None:
        written = os.path.join(dirname, "split.json")
        split = written if os.path.exists(written) else "shapes_ovd_12_4"
    split = load_split(split)
    for subset in ("base", "all"):
        register_ovd_voc(f"{prefix}_trainval_{subset}", dirname, "trainval", split, subset=subset)
    register_ovd_voc(f"{prefix}_test", dirname, "test", split, subset="all")


# name -> (image folder, annotation file, subset, images without a kept class left out), under root
_COCO_OVD_SETS = {
    "coco_ovd_train_base": ("coco/train2017", "coco/annotations/instances_train2017.json", "base", False),
    "coco_ovd_train_all": ("coco/train2017", "coco/annotations/instances_train2017.json", "all", False),
    "coco_ovd_val": ("coco/val2017", "coco/annotations/instances_val2017.json", "all", True),
}

# name -> (annotation file, subset); LVIS images are COCO's, found through each image's coco_url
_LVIS_OVD_SETS = {
    "lvis_v1_ovd_train_base": ("lvis/lvis_v1_train.json", "base"),
    "lvis_v1_ovd_val": ("lvis/lvis_v1_val.json", "all"),
}


def register_all_coco_ovd(root: str, split_name: str = "coco_48_17") -> None:
    """COCO 2017 under the 48/17 split: base training set, oracle training set, validation set."""
    split = load_split(split_name)
    for name, (images, json_file, subset, drop_empty) in _COCO_OVD_SETS.items():
        register_coco_ovd(name, os.path.join(root, json_file), os.path.join(root, images), split,
                          subset=subset, drop_empty_images=drop_empty)


def register_all_lvis_ovd(root: str) -> None:
    """LVIS v1 with its 337 rare categories novel: base training set and validation set."""
    for name, (json_file, subset) in _LVIS_OVD_SETS.items():
        register_lvis_ovd(name, os.path.join(root, json_file), os.path.join(root, "coco"), subset=subset)


_root = datasets_root()
register_all_voc_ovd(_root)
register_shapes_ovd(_root)
register_all_coco_ovd(_root)
register_all_lvis_ovd(_root)
