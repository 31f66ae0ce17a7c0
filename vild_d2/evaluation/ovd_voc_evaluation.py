"""Open-vocabulary AP on a VOC-format dataset: base, novel, all and their harmonic mean.

Extends detectron2's PascalVOCDetectionEvaluator: predictions are gathered and written exactly
as there, and every AP comes from detectron2's ``voc_eval``; what is added is keeping the
per-class APs and grouping them by the dataset's ``novel_classes``.
"""
import logging
import os
import tempfile
from collections import OrderedDict, defaultdict

import numpy as np
from detectron2.data import MetadataCatalog
from detectron2.evaluation import PascalVOCDetectionEvaluator
from detectron2.evaluation.pascal_voc_evaluation import voc_eval
from detectron2.utils import comm

from .ovd_metrics import save_ovd_results, summarize_ovd

logger = logging.getLogger(__name__)


class OVDPascalVOCEvaluator(PascalVOCDetectionEvaluator):
    def __init__(self, dataset_name, output_dir=None, iou_thresholds=tuple(range(50, 100, 5))):
        """
        Args:
            dataset_name: a registered VOC-format dataset whose metadata has ``novel_classes``.
            output_dir: where ``ovd_results_<dataset>.json`` is written (None: not written).
            iou_thresholds: IoU thresholds in percent for AP; 50 must be among them.
        """
        super().__init__(dataset_name)
        meta = MetadataCatalog.get(dataset_name)
        self._novel = set(meta.get("novel_classes", []))
        self._output_dir = output_dir
        self._thresholds = tuple(iou_thresholds)
        assert 50 in self._thresholds, "AP50 needs the 50% IoU threshold"

    def evaluate(self):
        all_predictions = comm.gather(self._predictions, dst=0)
        if not comm.is_main_process():
            return
        predictions = defaultdict(list)
        for per_rank in all_predictions:
            for cls_id, lines in per_rank.items():
                predictions[cls_id].extend(lines)
        per_class = self._per_class_ap(predictions)
        # voc_eval's AP of a class with no ground truth here is NaN: left out of every mean, as
        # COCOeval leaves such classes out
        absent = [name for name, aps in per_class.items() if np.isnan(aps[50])]
        if absent:
            logger.info(f"{len(absent)} of {len(per_class)} classes have no ground truth in "
                        f"{self._dataset_name} ({', '.join(absent[:5])}); they are left out of the means")
            per_class = OrderedDict((k, v) for k, v in per_class.items() if k not in absent)
        summary = summarize_ovd(per_class, self._novel)
        self.last_summary = summary  # for in-process callers that want the per-class numbers
        if self._output_dir:
            save_ovd_results(self._output_dir, self._dataset_name, self._novel, summary)
        bbox = OrderedDict()
        for key in ("AP", "AP50", "AP75", "AP50_base", "AP50_novel", "AP50_hmean", "AP_base", "AP_novel"):
            if key in summary["metrics"]:
                bbox[key] = summary["metrics"][key]
        for name, aps in per_class.items():
            bbox[f"AP50-{name}"] = aps[50]
        return OrderedDict(bbox=bbox)

    def _per_class_ap(self, predictions):
        """{class name: {iou threshold: AP in percent}} through detectron2's voc_eval."""
        out = OrderedDict()
        with tempfile.TemporaryDirectory(prefix="ovd_voc_eval_") as dirname:
            template = os.path.join(dirname, "{}.txt")
            for cls_id, name in enumerate(self._class_names):
                with open(template.format(name), "w") as f:
                    f.write("\n".join(predictions.get(cls_id, [""])))
                out[name] = {
                    t: 100.0 * voc_eval(template, self._anno_file_template, self._image_set_path,
                                        name, ovthresh=t / 100.0, use_07_metric=self._is_2007)[2]
                    for t in self._thresholds
                }
        return out
