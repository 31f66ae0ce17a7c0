"""Open-vocabulary AP on a COCO-format dataset: novel, base and all AP50 (the COCO 48/17 numbers).

Extends detectron2's COCOEvaluator: predictions are gathered, converted and evaluated by COCOeval
exactly as there. What is added is reading each class's AP at every IoU threshold from the
precision array COCOeval accumulates (as ``_derive_coco_results`` does for the per-class AP) and
averaging them over the dataset's base and novel classes. A class with no ground truth in the
dataset has no AP and is left out of every mean, as COCOeval leaves it out of its own.
"""
import logging
from collections import OrderedDict
from typing import Dict, Sequence

import numpy as np
from detectron2.evaluation import COCOEvaluator

from .ovd_metrics import save_ovd_results, summarize_ovd

logger = logging.getLogger(__name__)

# the open-vocabulary keys added to COCOEvaluator's results, in the order they are reported
OVD_KEYS = ("AP50_novel", "AP50_base", "AP50_all", "AP50_hmean", "AP_novel", "AP_base")


def per_class_ap(precision: np.ndarray, iou_thresholds: Sequence[float], class_names: Sequence[str]
                 ) -> Dict[str, Dict[int, float]]:
    """{class: {IoU threshold in percent: AP in percent}} from COCOeval's ``eval["precision"]``
    ([IoU, recall, class, area range, max dets]; all areas, the largest max-dets), for the classes
    with ground truth."""
    assert precision.shape[2] == len(class_names), (precision.shape, len(class_names))
    out = OrderedDict()
    for k, name in enumerate(class_names):
        p = precision[:, :, k, 0, -1]
        if not (p > -1).any():
            continue
        out[name] = {int(round(100 * t)): float(100 * np.mean(row[row > -1]))
                     for t, row in zip(iou_thresholds, p)}
    return out


class OVDCOCOEvaluator(COCOEvaluator):
    def __init__(self, dataset_name, output_dir, *, max_dets_per_image=None, distributed=True):
        """
        Args:
            dataset_name: a registered COCO-format dataset whose metadata has ``novel_classes``.
            output_dir: where detectron2's files (the dataset in COCO format, the predictions) and
                ``ovd_results_<dataset>.json`` are written.
            max_dets_per_image: detections kept per image (None: COCO's 100).
        """
        # allow_cached_coco=False: the COCO-format copy of the dataset is rewritten each run, so a
        # changed split or annotation file is never evaluated against a stale copy.
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir,
                         max_dets_per_image=max_dets_per_image, allow_cached_coco=False)
        self._dataset_name = dataset_name
        self._novel = set(self._metadata.get("novel_classes", []))
        self.last_summary = None  # for in-process callers that want the per-class numbers

    def _derive_coco_results(self, coco_eval, iou_type, class_names=None):
        results = super()._derive_coco_results(coco_eval, iou_type, class_names=class_names)
        if coco_eval is None:  # no predictions at all: NaN, as detectron2 reports the rest
            results.update({key: float("nan") for key in OVD_KEYS})
            return results
        if not class_names:
            return results
        per_class = per_class_ap(coco_eval.eval["precision"], coco_eval.params.iouThrs, class_names)
        missing = len(class_names) - len(per_class)
        if missing:
            logger.info(f"{missing} of {len(class_names)} classes have no ground truth in "
                        f"{self._dataset_name}; they are left out of the means")
        summary = summarize_ovd(per_class, self._novel)
        m = summary["metrics"]
        m["AP50_all"] = m["AP50"]
        for key in OVD_KEYS:
            if key in m:
                results[key] = m[key]
        results.update({f"AP50-{name}": aps[50] for name, aps in per_class.items()})
        logger.info(
            f"{iou_type} AP50 on {self._dataset_name}: novel {m.get('AP50_novel', float('nan')):.1f}, "
            f"base {m.get('AP50_base', float('nan')):.1f}, all {m['AP50']:.1f}"
        )
        if iou_type == "bbox":
            self.last_summary = summary
            if self._output_dir:
                save_ovd_results(self._output_dir, self._dataset_name, self._novel, summary)
        return results
