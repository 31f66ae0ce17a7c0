from . import lvis_compat  # noqa: F401  (first: restores np.float for the lvis package)
from .ovd_metrics import harmonic_mean, save_ovd_results, summarize_ovd
from .ovd_voc_evaluation import OVDPascalVOCEvaluator
from .ovd_coco_evaluation import OVDCOCOEvaluator
from .ovd_lvis_evaluation import OVDLVISEvaluator
from .build import build_evaluator
