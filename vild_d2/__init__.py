"""vild_d2: ViLD open-vocabulary object detection as a detectron2 extension."""
from .config import add_vild_config
from . import data  # noqa: F401  (dataset registration)
from . import modeling  # noqa: F401  (head and meta-architecture registration)

__version__ = "0.1.0"
