"""The lvis package (0.5.3, the last release) still calls ``np.float``, which NumPy 1.24 removed.

Importing this module restores the alias; vild_d2 imports it before anything runs lvis code.
"""
import numpy as np

if "float" not in np.__dict__:
    np.float = float
