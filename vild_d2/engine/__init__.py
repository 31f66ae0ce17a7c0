from .trainer import ViLDTrainer, load_cfg, setup_cfg
