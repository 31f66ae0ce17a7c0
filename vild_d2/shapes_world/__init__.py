"""The embedded world: a procedurally generated VOC-format detection dataset and a small
CLIP-architecture teacher trained on it, so that the whole method runs on a CPU without any
download. Built on the method's public parts; nothing in the method imports it."""
from .archive import save_openai_archive
from .generator import CLASS_NAMES, WorldConfig, WorldError, ensure_world
from .teacher import TeacherError, ensure_teacher, evaluate_teacher, nearest_class_cosine
from .teacher_training import DEFAULT_TEMPLATES, TeacherConfig, build_teacher_model, train_teacher
