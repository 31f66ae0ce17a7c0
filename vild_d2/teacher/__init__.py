"""The CLIP teacher: loading any CLIP checkpoint, prompt templates, the embedded world's teacher."""

from .ensure import TeacherError, ensure_teacher, evaluate_teacher, read_teacher_manifest
from .export import save_openai_archive
from .loader import ClipInfo, ClipLoadError, checkpoint_fingerprint, clip_normalize, load_clip
from .templates import DEFAULT_TEMPLATES, fill_templates
from .train_teacher import TeacherConfig, build_teacher_model, train_teacher
from .zero_shot import encode_crops, prompt_ensemble_embeddings, zero_shot_accuracy

__all__ = [
    "ClipInfo",
    "ClipLoadError",
    "DEFAULT_TEMPLATES",
    "TeacherConfig",
    "TeacherError",
    "build_teacher_model",
    "checkpoint_fingerprint",
    "clip_normalize",
    "encode_crops",
    "ensure_teacher",
    "evaluate_teacher",
    "fill_templates",
    "load_clip",
    "prompt_ensemble_embeddings",
    "read_teacher_manifest",
    "save_openai_archive",
    "train_teacher",
    "zero_shot_accuracy",
]
