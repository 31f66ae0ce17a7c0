"""DefaultTrainer for ViLD: the distillation mapper, open-vocabulary evaluation and a
per-dataset vocabulary at test time."""
import contextlib
import logging
import os
from collections import OrderedDict

import torch

from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.engine import defaults as d2_defaults
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger
from detectron2.evaluation import PascalVOCDetectionEvaluator

from ..config import add_vild_config
from ..evaluation import OVDCOCOEvaluator, OVDLVISEvaluator, OVDPascalVOCEvaluator
from ..data.distill_mapper import DistillDatasetMapper
from ..modeling.text_predictor import ViLDTextPredictor
from ..modeling.vocabulary import dataset_vocabulary, set_model_vocabulary
from .cpu_autocast import TrainingAutocast
from .optimizer import build_optimizer

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def _ddp_on_cpu():
    """detectron2's create_ddp_model always passes device_ids=[local rank], which DDP refuses for
    a CPU model; while the trainer is built, CPU models get device_ids=None (gloo)."""
    original = d2_defaults.create_ddp_model

    def create_ddp_model(model, **kwargs):
        if comm.get_world_size() > 1 and next(model.parameters()).device.type == "cpu":
            kwargs.setdefault("device_ids", None)
        return original(model, **kwargs)

    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = original


class ViLDTrainer(DefaultTrainer):
    def __init__(self, cfg):
        with _ddp_on_cpu():
            super().__init__(cfg)
        if cfg.SOLVER.CPU_BF16 and cfg.MODEL.DEVICE == "cpu":
            self._trainer.model = TrainingAutocast(self._trainer.model)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        return build_detection_train_loader(cfg, mapper=DistillDatasetMapper(cfg, is_train=True))

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        meta = MetadataCatalog.get(dataset_name)
        output_folder = output_folder or os.path.join(cfg.OUTPUT_DIR, "inference")
        if meta.get("evaluator_type") == "ovd_voc" or (
            meta.get("evaluator_type") == "pascal_voc" and meta.get("novel_classes")
        ):
            return OVDPascalVOCEvaluator(dataset_name, output_dir=output_folder)
        if meta.get("evaluator_type") == "pascal_voc":
            return PascalVOCDetectionEvaluator(dataset_name)
        if meta.get("evaluator_type") == "ovd_coco":
            return OVDCOCOEvaluator(dataset_name, output_folder,
                                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        if meta.get("evaluator_type") == "ovd_lvis":
            return OVDLVISEvaluator(dataset_name, output_folder,
                                    max_dets_per_image=cfg.TEST.DETECTIONS_PER_IMAGE)
        raise NotImplementedError(f"no evaluator for dataset '{dataset_name}'")

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate each test dataset with its own vocabulary (its thing_classes, unless
        MODEL.VILD.TEST_VOCABULARY is set); the training vocabulary is restored afterwards."""
        inner = model
        while isinstance(inner, (TrainingAutocast, torch.nn.parallel.DistributedDataParallel)):
            inner = inner.module
        predictor = getattr(getattr(inner, "roi_heads", None), "box_predictor", None)
        if not isinstance(predictor, ViLDTextPredictor):
            return super().test(cfg, model, evaluators)
        saved = (predictor.text_embeddings.clone(), predictor.novel_class_mask.clone())
        results = OrderedDict()
        try:
            for idx, name in enumerate(cfg.DATASETS.TEST):
                names, novel = dataset_vocabulary(cfg, name)
                set_model_vocabulary(model, cfg, names, novel)
                logger.info(f"Evaluating {name} with a {len(names)}-class vocabulary ({len(novel)} novel)")
                one = cfg.clone()
                one.defrost()
                one.DATASETS.TEST = (name,)
                one_eval = None if evaluators is None else [evaluators[idx]]
                results[name] = super().test(one, model, one_eval)
        finally:
            predictor.set_vocabulary(*saved)
        return list(results.values())[0] if len(results) == 1 else results


def load_cfg(config_file, opts=()):
    """get_cfg -> add_vild_config -> merge file and overrides; CPU when CUDA is absent. Unfrozen."""
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(list(opts))
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        logger.warning("CUDA is not available: running on the CPU (MODEL.DEVICE cpu)")
        cfg.MODEL.DEVICE = "cpu"
    return cfg


def setup_cfg(args):
    """load_cfg -> freeze -> default_setup, as detectron2's tools do."""
    cfg = load_cfg(args.config_file, args.opts)
    cfg.freeze()
    default_setup(cfg, args)
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="vild_d2")
    return cfg
