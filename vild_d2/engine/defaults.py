"""The config of a run, as detectron2's tools make it: get_cfg -> add_vild_config -> file ->
overrides (-> freeze -> default_setup)."""
import logging

import torch
from detectron2.config import get_cfg
from detectron2.engine import default_setup
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_vild_config
from ..utils import ConfigError

logger = logging.getLogger(__name__)


def load_cfg(config_file, opts=(), cpu_fallback: bool = True):
    """get_cfg -> add_vild_config -> merge file and overrides; with ``cpu_fallback``, CPU when
    CUDA is absent. Unfrozen."""
    cfg = get_cfg()
    add_vild_config(cfg)
    try:
        cfg.merge_from_file(config_file)
        cfg.merge_from_list(list(opts))
    except (AssertionError, KeyError) as e:  # how yacs refuses a key the config does not have
        reason = e.args[0] if e.args else type(e).__name__
        raise ConfigError(f"{config_file}: {reason}; check its spelling against vild_d2/config.py "
                          "and detectron2's defaults") from None
    if cpu_fallback and cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.info("CUDA is not available: running on the CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def setup_cfg(args):
    """load_cfg -> freeze -> default_setup, as detectron2's tools do."""
    cfg = load_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="vild_d2")
    return cfg
