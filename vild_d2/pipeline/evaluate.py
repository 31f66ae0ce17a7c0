"""Evaluate a trained detector in-process: open-vocabulary AP, seconds per image, and a few
images' detections for the pictures."""
import time
from typing import List, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_test_loader
from detectron2.evaluation import inference_on_dataset

from ..engine.trainer import ViLDTrainer
from ..evaluation import OVDPascalVOCEvaluator
from ..modeling.vocabulary import dataset_vocabulary, set_model_vocabulary


def evaluate_detector(cfg, weights: str, num_pictures: int = 6) -> Tuple[dict, float, List]:
    """(evaluator summary, inference seconds per image, predictions of the first test images)."""
    dataset = cfg.DATASETS.TEST[0]
    model = ViLDTrainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    names, novel = dataset_vocabulary(cfg, dataset)
    set_model_vocabulary(model, cfg, names, novel)
    return evaluate_model(model, cfg, num_pictures)


def evaluate_clip_on_crops(cfg, stage1_weights: str, num_pictures: int = 6):
    """The same numbers for the CLIP-on-cropped-regions baseline."""
    from ..baselines.clip_on_crops import build_clip_on_crops

    names, _ = dataset_vocabulary(cfg, cfg.DATASETS.TEST[0])
    return evaluate_model(build_clip_on_crops(cfg, stage1_weights, names).eval(), cfg, num_pictures)


def evaluate_model(model, cfg, num_pictures: int) -> Tuple[dict, float, List]:
    dataset = cfg.DATASETS.TEST[0]
    evaluator = OVDPascalVOCEvaluator(dataset)
    loader = build_detection_test_loader(cfg, dataset)
    start = time.perf_counter()
    inference_on_dataset(model, loader, evaluator)
    seconds = (time.perf_counter() - start) / max(len(loader.dataset), 1)
    return evaluator.last_summary, seconds, predict_first(model, cfg, dataset, num_pictures)


@torch.no_grad()
def predict_first(model, cfg, dataset: str, n: int) -> List:
    loader = build_detection_test_loader(cfg, dataset)
    out = []
    for inputs in loader:
        out.extend(o["instances"].to("cpu") for o in model(inputs))
        if len(out) >= n:
            break
    return out[:n]


def test_dicts(dataset: str, n: int) -> List[dict]:
    return DatasetCatalog.get(dataset)[:n]


def class_names(dataset: str) -> List[str]:
    return list(MetadataCatalog.get(dataset).thing_classes)
