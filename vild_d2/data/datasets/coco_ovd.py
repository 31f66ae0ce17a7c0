"""Open-vocabulary datasets in COCO format (the COCO 48/17 benchmark), read with detectron2's loader.

Only the split's classes are kept; a category is matched to a split class by its ``name``.
  - "base": annotations of the base classes only, category ids index the base classes. Every image
    is kept (images left empty still feed distillation; ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``
    decides whether they train).
  - "all": annotations of every split class, ids index all of them (test sets, oracle training).
``drop_empty_images`` leaves out images holding none of the kept classes, as the benchmark's
validation set does.

The metadata carries no ``json_file``: the source file has classes outside the split, so
detectron2's COCOEvaluator writes the filtered dataset in COCO format and evaluates against that.
"""
import os
from typing import Dict, List, Sequence, Union

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.coco import load_coco_json

from ..splits import OVDSplit, load_split
from .ovd_voc import DatasetError

SUBSETS = ("base", "all")


def subset_classes(split: OVDSplit, subset: str) -> List[str]:
    if subset not in SUBSETS:
        raise ValueError(f"subset must be one of {SUBSETS}, got '{subset}'")
    return list(split.base_classes if subset == "base" else split.classes)


def category_index(categories: Sequence[dict], classes: Sequence[str], where: str) -> Dict[int, int]:
    """{category id in the file: index in ``classes``}, matching categories by name."""
    by_name = {}
    for c in categories:
        if c["name"] in by_name:
            raise DatasetError(f"{where}: category name '{c['name']}' occurs twice; make names unique")
        by_name[c["name"]] = c["id"]
    missing = [n for n in classes if n not in by_name]
    if missing:
        raise DatasetError(
            f"{where}: the file has no category named {missing[:5]} ({len(missing)} missing); "
            "use the split that matches the file's category names or fix the split"
        )
    return {by_name[n]: i for i, n in enumerate(classes)}


def check_files(name: str, json_file: str, image_root: str) -> None:
    if not os.path.isfile(json_file):
        raise DatasetError(
            f"dataset '{name}': annotation file {json_file} does not exist; lay it out as "
            "datasets/README.md says or set $DETECTRON2_DATASETS to the folder holding it"
        )
    if not os.path.isdir(image_root):
        raise DatasetError(
            f"dataset '{name}': image folder {image_root} does not exist; lay it out as "
            "datasets/README.md says or set $DETECTRON2_DATASETS to the folder holding it"
        )


def load_coco_ovd_json(
    json_file: str,
    image_root: str,
    split: Union[str, dict, OVDSplit],
    subset: str = "all",
    drop_empty_images: bool = False,
    dataset_name: str = None,
) -> List[dict]:
    """detectron2's COCO dicts of ``json_file``, filtered and re-indexed for ``subset``.

    With ``dataset_name``, its metadata gets ``thing_dataset_id_to_contiguous_id`` (the file's
    category ids of the kept classes), as detectron2's ``load_coco_json`` does.
    """
    split = load_split(split)
    name = dataset_name or json_file
    check_files(name, json_file, image_root)
    # detectron2's loader records the file's own classes and ids in a scratch metadata entry
    scratch = f"{name}/coco_source"  # "coco" in the name: no warning about COCO's id gaps
    if scratch in MetadataCatalog.keys():
        MetadataCatalog.remove(scratch)
    dicts = load_coco_json(json_file, image_root, dataset_name=scratch)
    source = MetadataCatalog.get(scratch)
    file_ids = dict(source.thing_dataset_id_to_contiguous_id)
    categories = [{"id": i, "name": source.thing_classes[k]} for i, k in file_ids.items()]
    MetadataCatalog.remove(scratch)

    index = category_index(categories, subset_classes(split, subset), f"dataset '{name}' ({json_file})")
    by_loaded_id = {file_ids[i]: k for i, k in index.items()}
    out = []
    for d in dicts:
        anns = [dict(a, category_id=by_loaded_id[a["category_id"]]) for a in d["annotations"]
                if a["category_id"] in by_loaded_id]
        if drop_empty_images and not anns:
            continue
        d["annotations"] = anns
        out.append(d)
    if dataset_name:
        MetadataCatalog.get(dataset_name).thing_dataset_id_to_contiguous_id = index
    return out


def filter_coco_ovd_json(
    data: dict, split: Union[str, dict, OVDSplit], subset: str, drop_empty_images: bool = False,
    where: str = "COCO file",
) -> dict:
    """A COCO-format dict holding only ``subset``'s classes: the same rule as the loader, on the
    raw JSON (categories, annotations and, with ``drop_empty_images``, images filtered; ids kept)."""
    split = load_split(split)
    classes = subset_classes(split, subset)
    index = category_index(data["categories"], classes, where)
    anns = [a for a in data["annotations"] if a["category_id"] in index]
    images = data["images"]
    if drop_empty_images:
        kept = {a["image_id"] for a in anns}
        images = [im for im in images if im["id"] in kept]
    by_id = {c["id"]: c for c in data["categories"]}
    categories = [by_id[i] for i in sorted(index, key=index.get)]
    out = {k: v for k, v in data.items() if k not in ("images", "annotations", "categories")}
    out.update(images=images, annotations=anns, categories=categories)
    return out


def register_coco_ovd(
    name: str,
    json_file: str,
    image_root: str,
    split: Union[str, dict, OVDSplit] = "coco_48_17",
    subset: str = "all",
    drop_empty_images: bool = False,
) -> None:
    """Register a COCO-format dataset under an open-vocabulary split. Nothing is read until the
    dataset is used.

    Args:
        name: the name for DatasetCatalog/MetadataCatalog, e.g. "my_coco_ovd_train_base".
        json_file: COCO instances JSON; its category names must include the split's classes.
        image_root: folder the JSON's ``file_name`` entries are relative to.
        split: a split JSON path, a split name under datasets/metadata/, a dict or an OVDSplit.
        subset: "base" (only base annotations, ids over base classes) or "all".
        drop_empty_images: leave out images with no annotation of the kept classes.
    """
    split = load_split(split)
    classes = subset_classes(split, subset)
    DatasetCatalog.register(
        name, lambda: load_coco_ovd_json(json_file, image_root, split, subset, drop_empty_images, name)
    )
    MetadataCatalog.get(name).set(
        thing_classes=classes,
        base_classes=list(split.base_classes),
        novel_classes=list(split.novel_classes),
        ovd_split=split.name,
        ovd_subset=subset,
        source_json_file=json_file,
        image_root=image_root,
        evaluator_type="ovd_coco",
    )
