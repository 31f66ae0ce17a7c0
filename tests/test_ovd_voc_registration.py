import json
import os
import uuid

import pytest
from detectron2.data import DatasetCatalog, MetadataCatalog, get_detection_dataset_dicts

from vild_d2.data import SplitError, load_split
from vild_d2.data.datasets import DatasetError, register_ovd_voc

from voc_fixtures import write_voc_tree

VOC_NOVEL = ["car", "dog", "sofa", "train"]


def _name(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
def voc_root(tmp_path):
    images = {
        "000001": (64, 48, [("dog", (1, 1, 20, 20)), ("person", (10, 10, 40, 40))]),
        "000002": (64, 48, [("car", (5, 5, 30, 30))]),  # only novel: empty in the base split
        "000003": (64, 48, [("cat", (2, 3, 50, 40)), ("sofa", (1, 1, 60, 45))]),
    }
    sets = {"trainval": ["000001", "000002"], "test": ["000001", "000002", "000003"]}
    return write_voc_tree(str(tmp_path / "VOC2007"), images, sets)


def test_builtin_voc_names_and_metadata():
    names = DatasetCatalog.list()
    for n in ["voc_ovd_2007_trainval_base", "voc_ovd_2007_test", "voc_ovd_2012_trainval_base",
              "voc_ovd_0712_trainval_base", "voc_ovd_0712_trainval_all"]:
        assert n in names
    meta = MetadataCatalog.get("voc_ovd_2007_test")
    assert meta.novel_classes == VOC_NOVEL
    assert len(meta.thing_classes) == 20 and len(meta.base_classes) == 16
    assert MetadataCatalog.get("voc_ovd_2007_trainval_base").thing_classes == meta.base_classes
    assert meta.ovd_split == "voc_16_4" and meta.year == 2007 and meta.split == "test"


def test_base_split_drops_novel_boxes_and_keeps_empty_images(voc_root):
    name = _name("t_base")
    register_ovd_voc(name, voc_root, "trainval", "voc_16_4", subset="base", year=2007)
    meta = MetadataCatalog.get(name)
    dicts = DatasetCatalog.get(name)
    assert [d["image_id"] for d in dicts] == ["000001", "000002"]
    classes = [[meta.thing_classes[a["category_id"]] for a in d["annotations"]] for d in dicts]
    assert classes == [["person"], []]
    assert meta.thing_classes == meta.base_classes and len(meta.thing_classes) == 16
    # detectron2's DATALOADER.FILTER_EMPTY_ANNOTATIONS decides whether empty images train.
    kept = get_detection_dataset_dicts([name], filter_empty=False)
    dropped = get_detection_dataset_dicts([name], filter_empty=True)
    assert len(kept) == 2 and [d["image_id"] for d in dropped] == ["000001"]


def test_test_split_keeps_novel_boxes(voc_root):
    name = _name("t_test")
    register_ovd_voc(name, voc_root, "test", "voc_16_4", subset="all", year=2007)
    meta = MetadataCatalog.get(name)
    dicts = DatasetCatalog.get(name)
    classes = sorted(meta.thing_classes[a["category_id"]] for d in dicts for a in d["annotations"])
    assert classes == ["car", "cat", "dog", "person", "sofa"]
    assert meta.novel_classes == VOC_NOVEL and len(meta.thing_classes) == 20


def test_user_split_from_json(tmp_path):
    images = {"a": (32, 32, [("apple", (1, 1, 10, 10)), ("kiwi", (5, 5, 20, 20))]),
              "b": (32, 32, [("pear", (2, 2, 30, 30))])}
    root = write_voc_tree(str(tmp_path / "fruit"), images, {"train": ["a", "b"]})
    split_file = tmp_path / "fruit.json"
    split_file.write_text(json.dumps({"name": "fruit", "classes": ["apple", "kiwi", "pear"],
                                      "novel_classes": ["kiwi"]}))
    name = _name("fruit")
    register_ovd_voc(name, root, "train", str(split_file), subset="base")
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == ["apple", "pear"] and meta.novel_classes == ["kiwi"]
    dicts = DatasetCatalog.get(name)
    assert [[a["category_id"] for a in d["annotations"]] for d in dicts] == [[0], [1]]
    assert load_split(str(split_file)).base_classes == ["apple", "pear"]


def test_missing_root_is_one_clear_line(tmp_path):
    name = _name("t_missing")
    missing = str(tmp_path / "nowhere")
    register_ovd_voc(name, missing, "trainval", "voc_16_4")
    with pytest.raises(DatasetError, match="does not exist") as e:
        DatasetCatalog.get(name)
    assert missing in str(e.value) and "\n" not in str(e.value)


def test_missing_image_set_file(voc_root):
    name = _name("t_noset")
    register_ovd_voc(name, voc_root, "val", "voc_16_4")
    with pytest.raises(DatasetError, match=r"ImageSets/Main/val.txt does not exist"):
        DatasetCatalog.get(name)


def test_unknown_class_in_annotation(tmp_path):
    images = {"x": (32, 32, [("unicorn", (1, 1, 10, 10))]), "y": (32, 32, [])}
    root = write_voc_tree(str(tmp_path / "odd"), images, {"trainval": ["x", "y"]})
    name = _name("t_unknown")
    register_ovd_voc(name, root, "trainval", "voc_16_4", subset="base")
    with pytest.raises(DatasetError, match="'unicorn'.*voc_16_4") as e:
        DatasetCatalog.get(name)
    assert "\n" not in str(e.value)


def test_bad_split_definitions(tmp_path):
    with pytest.raises(SplitError, match="not found"):
        load_split(str(tmp_path / "nope.json"))
    with pytest.raises(SplitError, match=r"\['plum'\] are not in its classes"):
        load_split({"name": "s", "classes": ["apple"], "novel_classes": ["plum"]})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(SplitError, match="not valid JSON"):
        load_split(str(bad))


def test_datasets_root_follows_environment(tmp_path):
    import subprocess
    import sys

    code = ("from detectron2.data import MetadataCatalog; import vild_d2; "
            "print(MetadataCatalog.get('voc_ovd_2007_test').dirname)")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         check=True).stdout.strip()
    assert out == os.path.join(str(tmp_path), "VOC2007")
