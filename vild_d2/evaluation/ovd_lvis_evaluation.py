"""Open-vocabulary AP on LVIS: AP_r (the novel, rare categories), AP_c, AP_f and AP.

Wraps detectron2's LVISEvaluator: every number is the lvis package's (``LVISEval``, up to
``max_dets_per_image`` detections per image, the frequency groups read from the annotation file).
Box AP: the ViLD heads here predict boxes only, so this is box AP_r, not the mask AP_r the paper
reports for LVIS.
"""
from collections import OrderedDict

from detectron2.evaluation import LVISEvaluator
from detectron2.utils import comm

from . import lvis_compat  # noqa: F401  (before the lvis package runs)
from .ovd_metrics import save_ovd_results

# LVISEval's names -> the names reported here
_RENAMED = (("APr", "AP_r"), ("APc", "AP_c"), ("APf", "AP_f"))


class OVDLVISEvaluator(LVISEvaluator):
    def __init__(self, dataset_name, output_dir=None, *, max_dets_per_image=None, distributed=True):
        """
        Args:
            dataset_name: a registered LVIS dataset (``json_file``, ``novel_classes`` and
                ``thing_dataset_id_to_contiguous_id`` in its metadata).
            output_dir: where detectron2's files and ``ovd_results_<dataset>.json`` are written.
            max_dets_per_image: detections kept per image (None: LVIS's 300).
        """
        super().__init__(dataset_name, distributed=distributed, output_dir=output_dir,
                         max_dets_per_image=max_dets_per_image)
        self._dataset_name = dataset_name
        self._novel = list(self._metadata.get("novel_classes", []))
        self._check_rare_are_novel()

    def _check_rare_are_novel(self):
        """The file's rare categories must be the dataset's novel classes, or AP_r would be
        measured on other classes than the ones left out of training."""
        meta = self._metadata
        classes = meta.thing_classes
        by_index = {v: k for k, v in meta.thing_dataset_id_to_contiguous_id.items()}
        novel = set(self._novel)
        novel_ids = {by_index[i] for i, name in enumerate(classes) if name in novel}
        rare_ids = {c["id"] for c in self._lvis_api.cats.values() if c.get("frequency") == "r"}
        if novel_ids != rare_ids:
            diff = sorted(novel_ids ^ rare_ids)
            raise ValueError(
                f"{meta.json_file}: its rare categories differ from the novel classes of "
                f"'{self._dataset_name}' (category ids {diff[:5]}, {len(diff)} in all); register "
                "the file with its own categories (register_lvis_ovd(..., categories=...))"
            )

    def evaluate(self):
        results = super().evaluate()
        if not comm.is_main_process() or not results:
            return results
        for res in results.values():
            for old, new in _RENAMED:
                if old in res:
                    res[new] = res.pop(old)
        if "bbox" in results and self._output_dir:
            metrics = OrderedDict((k, results["bbox"][k]) for k in
                                  ("AP", "AP50", "AP75", "AP_r", "AP_c", "AP_f") if k in results["bbox"])
            save_ovd_results(self._output_dir, self._dataset_name, self._novel,
                             {"metrics": metrics, "iou_type": "bbox"})
        return results
