from .ovd_metrics import harmonic_mean, summarize_ovd
from .ovd_voc_evaluation import OVDPascalVOCEvaluator
