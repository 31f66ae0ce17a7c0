from .ovd_voc import DatasetError, load_ovd_voc_instances, register_ovd_voc
from .coco_ovd import filter_coco_ovd_json, load_coco_ovd_json, register_coco_ovd
from .lvis_ovd import filter_lvis_base_json, load_lvis_ovd_json, lvis_v1_class_names, register_lvis_ovd
from . import builtin as _builtin  # noqa: F401  (registers the built-in datasets)
from .builtin import (datasets_root, register_all_coco_ovd, register_all_lvis_ovd, register_all_voc_ovd,
                      register_shapes_ovd)
