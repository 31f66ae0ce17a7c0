"""Named class lists for tools that take a vocabulary: "coco" (80 classes) and "lvis" (1203)."""
from typing import Callable, Dict, List, Optional

from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .datasets.lvis_ovd import lvis_v1_categories, lvis_v1_class_names


def coco_class_names() -> List[str]:
    """The 80 COCO thing classes in category-id order (COCO 2017's names)."""
    return [c["name"] for c in COCO_CATEGORIES if c["isthing"]]


PRESETS: Dict[str, Callable[[], List[str]]] = {"coco": coco_class_names, "lvis": lvis_v1_class_names}


def preset_names(name: str) -> Optional[List[str]]:
    """The class names of preset ``name``; None if there is no such preset."""
    make = PRESETS.get(name)
    return make() if make else None


def preset_synonyms(name: str) -> Optional[List[List[str]]]:
    """Per class of preset ``name``, the names it also goes by (LVIS's synonyms); None if the
    preset has none."""
    if name != "lvis":
        return None
    return [list(c.get("synonyms") or [c["name"]]) for c in lvis_v1_categories()]
