"""Open-vocabulary LVIS: base = frequent + common categories, novel = rare, by each category's
``frequency`` field; read with detectron2's LVIS loader.

The categories (id, name, frequency) are given at registration, so the vocabulary is known before
any file is read; the default is LVIS v1's list as detectron2 ships it (the ``categories`` of
``lvis_v1_val.json`` without the counts). The loader refuses a file whose annotations name other
category ids, and the evaluator checks that the file's rare categories are the novel ones.
  - "base": rare annotations removed, category ids index the base classes; every image is kept.
  - "all": every annotation, ids index all categories (the validation set).
Class names are LVIS names with "_" written as " " ("bow (weapon)"), the form prompts read.
"""
import os
from typing import Dict, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.lvis import load_lvis_json
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES as LVIS_V1_CATEGORIES

from ..splits import OVDSplit
from .coco_ovd import check_files, subset_classes
from .ovd_voc import DatasetError

FREQUENCIES = ("r", "c", "f")


def lvis_class_name(category: dict) -> str:
    return category["name"].replace("_", " ")


def lvis_v1_categories() -> List[dict]:
    return sorted(LVIS_V1_CATEGORIES, key=lambda c: c["id"])


def lvis_v1_class_names() -> List[str]:
    """The 1203 LVIS v1 class names in category-id order."""
    return [lvis_class_name(c) for c in lvis_v1_categories()]


def lvis_split(categories: Sequence[dict], where: str = "LVIS categories") -> OVDSplit:
    """The split a category list defines: every category, rare ones novel ("lvis_866_337" for
    LVIS v1)."""
    bad = [c.get("name") for c in categories if c.get("frequency") not in FREQUENCIES]
    if bad:
        raise DatasetError(
            f"{where}: categories {bad[:5]} have no 'frequency' in {FREQUENCIES}; give each "
            "category its LVIS frequency ('r' rare, 'c' common, 'f' frequent)"
        )
    classes = [lvis_class_name(c) for c in categories]
    novel = [n for n, c in zip(classes, categories) if c["frequency"] == "r"]
    return OVDSplit(f"lvis_{len(classes) - len(novel)}_{len(novel)}", classes, novel)


def lvis_id_map(categories: Sequence[dict], subset: str) -> Dict[int, int]:
    """{LVIS category id: contiguous index} of the categories ``subset`` keeps."""
    kept = [c for c in categories if subset == "all" or c["frequency"] != "r"]
    return {c["id"]: i for i, c in enumerate(kept)}


def load_lvis_ovd_json(
    json_file: str, image_root: str, categories: Sequence[dict], subset: str = "all", name: str = ""
) -> List[dict]:
    """detectron2's LVIS dicts of ``json_file``, filtered and re-indexed for ``subset``."""
    name = name or json_file
    check_files(name, json_file, image_root)
    known = {c["id"] for c in categories}
    id_map = lvis_id_map(categories, subset)
    dicts = load_lvis_json(json_file, image_root)
    for d in dicts:
        anns = []
        for a in d["annotations"]:
            file_id = a["category_id"] + 1  # detectron2's loader makes LVIS ids 0-based
            if file_id not in known:
                raise DatasetError(
                    f"dataset '{name}': {json_file} has an annotation of category id {file_id}, "
                    f"which is not among the {len(known)} registered categories; register the "
                    "file with its own categories (register_lvis_ovd(..., categories=...))"
                )
            if file_id in id_map:
                anns.append(dict(a, category_id=id_map[file_id]))
        d["annotations"] = anns
    return dicts


def filter_lvis_base_json(data: dict, where: str = "LVIS file") -> dict:
    """An LVIS-format dict without the annotations of its rare categories (by the file's own
    ``frequency`` fields); categories and images are kept as they are."""
    lvis_split(data["categories"], where)  # every category must carry its frequency
    rare = {c["id"] for c in data["categories"] if c["frequency"] == "r"}
    out = dict(data)
    out["annotations"] = [a for a in data["annotations"] if a["category_id"] not in rare]
    return out


def register_lvis_ovd(
    name: str,
    json_file: str,
    image_root: str,
    subset: str = "all",
    categories: Optional[Sequence[dict]] = None,
) -> None:
    """Register an LVIS-format dataset with rare categories as novel. Nothing is read until the
    dataset is used.

    Args:
        name: the name for DatasetCatalog/MetadataCatalog.
        json_file: LVIS-format JSON (images carry ``coco_url``, as LVIS v1's do).
        image_root: folder holding the ``train2017/`` and ``val2017/`` image folders.
        subset: "base" (rare annotations removed, ids over base classes) or "all".
        categories: [{"id", "name", "frequency"}, ...] of the file; default LVIS v1's 1203.
    """
    categories = sorted(categories or lvis_v1_categories(), key=lambda c: c["id"])
    split = lvis_split(categories)
    image_root = os.path.join(image_root, "")  # detectron2 appends "train2017/" to it as a string
    DatasetCatalog.register(
        name, lambda: load_lvis_ovd_json(json_file, image_root, categories, subset, name)
    )
    MetadataCatalog.get(name).set(
        thing_classes=subset_classes(split, subset),
        base_classes=list(split.base_classes),
        novel_classes=list(split.novel_classes),
        ovd_split=split.name,
        ovd_subset=subset,
        thing_dataset_id_to_contiguous_id=lvis_id_map(categories, subset),
        # per class, the names LVIS also gives it (MODEL.VILD.TEXT_SYNONYMS averages them in)
        class_synonyms=[list(c.get("synonyms") or [c["name"]]) for c in categories
                        if subset == "all" or c["frequency"] != "r"],
        json_file=json_file,
        image_root=image_root,
        evaluator_type="ovd_lvis",
    )
