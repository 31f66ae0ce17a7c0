"""DefaultTrainer for ViLD: the distillation mapper, open-vocabulary evaluation with a vocabulary
per test dataset, and the model's own time per image."""
import contextlib
import json
import logging
import os
import weakref
from collections import OrderedDict

from detectron2.data import build_detection_test_loader, build_detection_train_loader
from detectron2.data.build import get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.engine import defaults as d2_defaults
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm

from ..checkpoint import VerifiedCheckpointer, checkpoint_damage
from ..data.checks import check_images_exist
from ..data.distill_mapper import DistillDatasetMapper
from ..evaluation import build_evaluator
from ..modeling.vocabulary import dataset_synonyms, dataset_vocabulary, set_model_vocabulary, vocabulary_owner
from ..utils import DEBUG_ENV, UserError, write_json
from .cpu_autocast import TrainingAutocast
from .optimizer import build_optimizer
from .timing import ModelTimer

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


def _not_a_user_error(record: logging.LogRecord) -> bool:
    """detectron2's training loop logs the traceback of any error before raising it; an error the
    user can fix is reported in one line by the tool instead ($VILD_D2_DEBUG keeps tracebacks)."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, UserError) or bool(os.environ.get(DEBUG_ENV))


class ViLDTrainer(DefaultTrainer):
    def __init__(self, cfg):
        logging.getLogger("detectron2.engine.train_loop").addFilter(_not_a_user_error)
        with _ddp_on_cpu():
            super().__init__(cfg)
        if cfg.SOLVER.CPU_BF16 and cfg.MODEL.DEVICE == "cpu":
            self._trainer.model = TrainingAutocast(self._trainer.model)

    def build_hooks(self):
        # before the hooks take it: the checkpointer that records and checks what it saves
        self.checkpointer = VerifiedCheckpointer(self.checkpointer.model, self.cfg.OUTPUT_DIR,
                                                 trainer=weakref.proxy(self))
        return super().build_hooks()

    def resume_or_load(self, resume=True):
        """detectron2's, through the checkpointer that skips damaged checkpoints; when the newest
        sound one is of the last iteration while model_final.pth is damaged, the final model is
        written again from it (a damaged final model is not taken for a finished training)."""
        super().resume_or_load(resume)
        final = os.path.join(self.cfg.OUTPUT_DIR, "model_final.pth")
        if resume and self.start_iter >= self.max_iter and comm.is_main_process():
            if checkpoint_damage(final) is not None:
                logger.warning(f"writing {final} again from the last iteration's checkpoint")
                self.checkpointer.save("model_final", iteration=self.start_iter - 1)

    @classmethod
    def build_optimizer(cls, cfg, model):
        return build_optimizer(cfg, model)

    @classmethod
    def build_train_loader(cls, cfg):
        """detectron2's loader over the distillation mapper; the training images are checked to
        exist first, so that a missing one stops the run at start-up, not hours in."""
        dicts = get_detection_dataset_dicts(cfg.DATASETS.TRAIN,
                                            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        check_images_exist(dicts, cfg.DATASETS.TRAIN)
        return build_detection_train_loader(cfg, mapper=DistillDatasetMapper(cfg, is_train=True),
                                            dataset=dicts)

    @classmethod
    def build_test_loader(cls, cfg, dataset_name):
        """detectron2's test loader, its images checked to exist first; an image that does not
        decode stops the evaluation in one line naming it."""
        dicts = get_detection_dataset_dicts([dataset_name], filter_empty=False)
        check_images_exist(dicts, [dataset_name])
        return build_detection_test_loader(dicts, mapper=DistillDatasetMapper(cfg, is_train=False),
                                           num_workers=cfg.DATALOADER.NUM_WORKERS)

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def test(cls, cfg, model, evaluators=None):
        """Evaluate each test dataset with its own vocabulary (its thing_classes, unless
        MODEL.VILD.TEST_VOCABULARY is set), restoring the training vocabulary afterwards, and add
        the model's seconds per image (data loading and evaluation left out) to the results and
        to ``<OUTPUT_DIR>/inference/ovd_results_<dataset>.json``."""
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        owner = vocabulary_owner(model)
        saved = None if owner is None else (owner.text_embeddings.clone(), owner.novel_class_mask.clone())
        results = OrderedDict()
        try:
            for idx, name in enumerate(cfg.DATASETS.TEST):
                if owner is not None:
                    names, novel = dataset_vocabulary(cfg, name)
                    set_model_vocabulary(model, cfg, names, novel, dataset_synonyms(cfg, name, names))
                    logger.info(f"Evaluating {name} with a {len(names)}-class vocabulary ({len(novel)} novel)")
                one = cfg.clone()
                one.defrost()
                one.DATASETS.TEST = (name,)
                timer = ModelTimer(model)
                summary = os.path.join(cfg.OUTPUT_DIR, "inference", f"ovd_results_{name}.json")
                if comm.is_main_process() and os.path.isfile(summary):
                    os.remove(summary)  # the evaluator writes this run's
                results[name] = super().test(one, timer, None if evaluators is None else [evaluators[idx]])
                if comm.is_main_process():
                    _add_model_time(results[name], summary, timer.seconds_per_image())
        finally:
            if saved is not None:
                owner.set_vocabulary(*saved)
        return list(results.values())[0] if len(results) == 1 else results


def _add_model_time(results: dict, summary_path: str, seconds: float) -> None:
    logger.info(f"model inference: {seconds:.4f} s/image (data loading and evaluation left out)")
    results["speed"] = {"model_s_per_image": seconds}
    if os.path.isfile(summary_path):
        with open(summary_path) as f:
            summary = json.load(f)
        write_json(summary_path, dict(summary, model_seconds_per_image=seconds))
