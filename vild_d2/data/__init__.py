from . import datasets  # noqa: F401  (registration)
from .splits import OVDSplit, SplitError, load_split, save_split
