from .defaults import load_cfg, setup_cfg
from .predictor import OVDPredictor
from .trainer import ViLDTrainer
