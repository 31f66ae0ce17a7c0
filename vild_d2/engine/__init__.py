from .trainer import ViLDTrainer, setup_cfg
