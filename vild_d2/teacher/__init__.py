"""The CLIP teacher: loading any CLIP checkpoint, prompt templates and class text embeddings."""
from .loader import ClipInfo, ClipLoadError, checkpoint_fingerprint, clip_normalize, load_clip
from .templates import PromptEnsemble, check_templates, fill_templates, prompt_set, resolve_prompts
from .text_embeddings import encode_class_names, text_embeddings_for
