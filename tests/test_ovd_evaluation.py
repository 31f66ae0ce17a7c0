import json
import uuid

import pytest
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.structures import Boxes, Instances

from vild_d2.data.datasets import register_ovd_voc
from vild_d2.evaluation import OVDPascalVOCEvaluator, harmonic_mean, summarize_ovd

from voc_fixtures import write_voc_tree

SPLIT = {"name": "tiny", "classes": ["apple", "kiwi", "pear", "plum"], "novel_classes": ["kiwi", "plum"]}


@pytest.fixture
def dataset(tmp_path):
    images = {
        "i1": (64, 64, [("apple", (1, 1, 20, 20)), ("kiwi", (30, 30, 60, 60))]),
        "i2": (64, 64, [("pear", (5, 5, 40, 30)), ("plum", (10, 35, 30, 60))]),
        "i3": (64, 64, [("apple", (20, 20, 50, 50))]),
    }
    root = write_voc_tree(str(tmp_path / "voc"), images, {"test": list(images)})
    name = f"ovd_eval_{uuid.uuid4().hex[:8]}"
    register_ovd_voc(name, root, "test", SPLIT, subset="all")
    return name


def _evaluate(name, keep, output_dir=None):
    evaluator = OVDPascalVOCEvaluator(name, output_dir=output_dir)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        anns = [a for a in d["annotations"] if keep(a["category_id"])]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.long)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    return evaluator.evaluate()["bbox"]


def test_perfect_predictions_score_100_everywhere(dataset, tmp_path):
    r = _evaluate(dataset, lambda c: True, output_dir=str(tmp_path / "out"))
    for key in ("AP50", "AP50_base", "AP50_novel", "AP50_hmean", "AP", "AP_base"):
        assert r[key] == pytest.approx(100.0), key
    saved = json.loads((tmp_path / "out" / f"ovd_results_{dataset}.json").read_text())
    assert saved["novel_classes"] == ["kiwi", "plum"]
    assert saved["per_class_ap50"]["plum"] == pytest.approx(100.0)


def test_all_novel_missed(dataset):
    novel_ids = {1, 3}
    r = _evaluate(dataset, lambda c: c not in novel_ids)
    assert r["AP50_base"] == pytest.approx(100.0)
    assert r["AP50_novel"] == pytest.approx(0.0)
    assert r["AP50"] == pytest.approx(50.0)
    assert r["AP50_hmean"] == pytest.approx(0.0)
    assert r["AP50-kiwi"] == 0.0 and r["AP50-apple"] == pytest.approx(100.0)


def test_harmonic_mean_and_summary():
    assert harmonic_mean(60.0, 30.0) == pytest.approx(40.0)
    assert harmonic_mean(0.0, 0.0) == 0.0
    s = summarize_ovd({"a": {50: 80.0, 75: 40.0}, "b": {50: 20.0, 75: 0.0}}, ["b"])["metrics"]
    assert s["AP50_base"] == 80.0 and s["AP50_novel"] == 20.0 and s["AP50_hmean"] == pytest.approx(32.0)
    assert s["AP"] == pytest.approx(35.0) and s["AP75"] == pytest.approx(20.0)
