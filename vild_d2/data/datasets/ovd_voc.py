"""Open-vocabulary datasets in PASCAL VOC format, read with detectron2's own VOC loader.

A registered dataset is one of three subsets of a split:
  - "base": training set with every annotation of a novel class removed; category ids index the
    base classes (``thing_classes`` = base classes). Images left with no annotation are kept so
    their regions still feed distillation; ``DATALOADER.FILTER_EMPTY_ANNOTATIONS: True`` drops them.
  - "all": every annotation, ids index all classes (the oracle's training set, and test sets).
"""
import os
import re
import xml.etree.ElementTree as ET
from typing import List, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.pascal_voc import load_voc_instances

from ...utils import UserError
from ..splits import OVDSplit, load_split

SUBSETS = ("base", "all")


class DatasetError(UserError, RuntimeError):
    """A dataset on disk that does not match what its registration expects."""


def _check_tree(dirname: str, image_set: str, name: str) -> None:
    if not os.path.isdir(dirname):
        raise DatasetError(
            f"dataset '{name}': root {dirname} does not exist; lay it out as datasets/README.md says "
            "or set $DETECTRON2_DATASETS to the folder holding it"
        )
    list_file = os.path.join(dirname, "ImageSets", "Main", f"{image_set}.txt")
    if not os.path.isfile(list_file):
        raise DatasetError(
            f"dataset '{name}': image list {list_file} does not exist; add it (one image id per line) "
            "or register another image set"
        )


def _annotation_naming(dirname: str, image_set: str, class_name: str) -> str:
    """The first annotation file of ``image_set`` with an object named ``class_name``."""
    with open(os.path.join(dirname, "ImageSets", "Main", f"{image_set}.txt")) as f:
        ids = f.read().split()
    for fileid in ids:
        path = os.path.join(dirname, "Annotations", f"{fileid}.xml")
        names = [obj.findtext("name") for obj in ET.parse(path).findall("object")]
        if class_name in names:
            return path
    return os.path.join(dirname, "Annotations")


def load_ovd_voc_instances(dirname: str, image_set: str, split: OVDSplit, subset: str, name: str = "") -> List[dict]:
    """detectron2's VOC dicts for ``image_set``, filtered and re-indexed for ``subset``."""
    _check_tree(dirname, image_set, name or dirname)
    try:
        dicts = load_voc_instances(dirname, image_set, list(split.classes))
    except ValueError as e:
        match = re.match(r"'(.*)' is not in list", str(e))
        if not match:
            raise
        where = _annotation_naming(dirname, image_set, match.group(1))
        raise DatasetError(
            f"dataset '{name}': {where} names class '{match.group(1)}', which split '{split.name}' "
            "does not list; add it to the split's 'classes' or fix the annotation"
        ) from None
    except FileNotFoundError as e:  # an XML listed in the image set but absent
        raise DatasetError(f"dataset '{name}': {e.filename} does not exist, but {image_set}.txt lists "
                           "it; restore the file or take its id out of the list") from None
    if subset == "all":
        return dicts
    base_index = {c: i for i, c in enumerate(split.base_classes)}
    for d in dicts:
        kept = []
        for ann in d["annotations"]:
            cls = split.classes[ann["category_id"]]
            if cls in base_index:
                kept.append(dict(ann, category_id=base_index[cls]))
        d["annotations"] = kept
    return dicts


def register_ovd_voc(
    name: str,
    dirname: Union[str, List[str]],
    image_set: Union[str, List[str]],
    split: Union[str, dict, OVDSplit],
    subset: str = "all",
    year: int = 2012,
) -> None:
    """Register a VOC-format dataset (or a concatenation of several) under an open-vocabulary split.

    Args:
        name: the name for DatasetCatalog/MetadataCatalog, e.g. "my_ovd_train_base".
        dirname: VOC root (holding Annotations/, JPEGImages/, ImageSets/Main/), or a list of roots.
        image_set: image list under ImageSets/Main/ ("trainval", "test"), or one per root.
        split: a split JSON path, a split name under datasets/metadata/, a dict or an OVDSplit.
        subset: "base" (novel annotations removed, ids over base classes) or "all".
        year: 2007 selects the VOC07 11-point AP metric in detectron2's evaluator.
    """
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got '{subset}'")
    split = load_split(split)
    dirnames = [dirname] if isinstance(dirname, str) else list(dirname)
    image_sets = [image_set] * len(dirnames) if isinstance(image_set, str) else list(image_set)
    if len(image_sets) != len(dirnames):
        raise ValueError(f"dataset '{name}': {len(dirnames)} roots but {len(image_sets)} image sets")

    def load():
        dicts = []
        for d, s in zip(dirnames, image_sets):
            dicts.extend(load_ovd_voc_instances(d, s, split, subset, name))
        return dicts

    DatasetCatalog.register(name, load)
    MetadataCatalog.get(name).set(
        thing_classes=list(split.base_classes if subset == "base" else split.classes),
        base_classes=list(split.base_classes),
        novel_classes=list(split.novel_classes),
        ovd_split=split.name,
        ovd_subset=subset,
        dirname=dirnames[0],
        year=year,
        split=image_sets[0],
        evaluator_type="ovd_voc",
    )
