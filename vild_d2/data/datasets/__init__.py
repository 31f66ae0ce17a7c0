from .ovd_voc import DatasetError, load_ovd_voc_instances, register_ovd_voc
from . import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from .builtin import datasets_root, register_all_voc_ovd, register_shapes_ovd
