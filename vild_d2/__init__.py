"""vild_d2: ViLD open-vocabulary object detection as a detectron2 extension."""
import warnings

# detectron2 and clip script a few helpers at import time; torch then warns on every import.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)

from .config import add_vild_config  # noqa: E402
from . import data  # noqa: F401,E402  (dataset registration)
from . import modeling  # noqa: F401,E402  (head and meta-architecture registration)
from . import baselines  # noqa: F401,E402  (the CLIP-on-crops meta-architecture)

__version__ = "0.1.0"
