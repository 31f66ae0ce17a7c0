"""The CLIP teacher: loading any CLIP checkpoint, prompt templates and class text embeddings."""
from .loader import ClipInfo, ClipLoadError, checkpoint_fingerprint, clip_normalize, load_clip
from .templates import DEFAULT_TEMPLATES, check_templates, fill_templates
from .text_embeddings import encode_class_names, text_embeddings_for
