from . import box_head as _box_head  # noqa: F401  (registration)
from . import meta_arch as _meta_arch  # noqa: F401  (registration)
from . import roi_heads as _roi_heads  # noqa: F401  (registration)
from .box_head import ViLDConvFCHead
from .roi_heads import ViLDROIHeads, image_distillation_loss
from .text_predictor import ViLDTextPredictor
from .vocabulary import dataset_vocabulary, set_model_vocabulary, vocabulary_owner
