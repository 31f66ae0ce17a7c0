"""The evaluator of a registered dataset, chosen by its metadata's ``evaluator_type``."""
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator

from .ovd_coco_evaluation import OVDCOCOEvaluator
from .ovd_lvis_evaluation import OVDLVISEvaluator
from .ovd_voc_evaluation import OVDPascalVOCEvaluator


def build_evaluator(cfg, dataset_name: str, output_folder: str = None):
    """OVD evaluators for the datasets vild_d2 registers (``ovd_voc``, ``ovd_coco``, ``ovd_lvis``;
    a ``pascal_voc`` dataset with ``novel_classes`` too), detectron2's VOC evaluator for a plain
    ``pascal_voc`` one. They write ``ovd_results_<dataset>.json`` to ``output_folder``
    (default ``<OUTPUT_DIR>/inference``)."""
    meta = MetadataCatalog.get(dataset_name)
    kind = meta.get("evaluator_type")
    output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
    if kind == "ovd_voc" or (kind == "pascal_voc" and meta.get("novel_classes")):
        return OVDPascalVOCEvaluator(dataset_name, output_dir=output_folder)
    if kind == "pascal_voc":
        return PascalVOCDetectionEvaluator(dataset_name)
    if kind == "ovd_coco":
        return OVDCOCOEvaluator(dataset_name, output_folder, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    if kind == "ovd_lvis":
        return OVDLVISEvaluator(dataset_name, output_folder, max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
    raise NotImplementedError(
        f"dataset '{dataset_name}' has evaluator_type {kind!r}, for which vild_d2 has no evaluator; "
        "register it with register_ovd_voc, register_coco_ovd or register_lvis_ovd"
    )
