"""A DatasetMapper that attaches each training image's cached proposals and CLIP embeddings.

The cached boxes get exactly the augmentation the image gets (resize, flip, crop); the cached
embeddings are not recomputed. They arrive as ``dataset_dict["distill"]``: an Instances with
``proposal_boxes``, ``clip_embeddings`` and ``objectness`` (the stage-1 scores).
"""

import logging

import torch
from detectron2.config import configurable
from detectron2.data import DatasetMapper
from detectron2.data import transforms as T
from detectron2.data.detection_utils import SizeMismatchError
from detectron2.structures import Boxes, Instances

from ..distill.embedding_cache import EmbeddingCache
from ..teacher import loader
from ..utils import UserError
from .checks import BAD_IMAGE_POLICIES
from .datasets.ovd_voc import DatasetError

logger = logging.getLogger(__name__)


def _clip_fingerprint(spec: str):
    """The fingerprint load_clip would report for ``spec``; None when the checkpoint is not here."""
    try:
        return loader.checkpoint_fingerprint(spec)
    except loader.ClipLoadError:
        return None


def check_cache_matches_config(cache: EmbeddingCache, cfg) -> None:
    """CacheError (one line, both values) when the cache was made for another CLIP model, embedding
    dimension or crop scales than the config's; keys absent from the manifest are not compared."""
    vild = cfg.MODEL.VILD
    expected = {
        "embed_dim": vild.EMBED_DIM,
        "crop_scales": list(vild.DISTILL.CROP_SCALES),
        "ensemble_crops": vild.DISTILL.ENSEMBLE_CROPS,
    }
    if "clip_fingerprint" in cache.manifest:
        fingerprint = _clip_fingerprint(vild.CLIP_MODEL)
        if fingerprint is None:
            logger.warning(
                f"MODEL.VILD.CLIP_MODEL {vild.CLIP_MODEL} is not here: cannot check that embedding "
                f"cache {cache.cache_dir} was made with it"
            )
        else:
            expected["clip_fingerprint"] = fingerprint
    cache.check_compatible(sources={"clip_fingerprint": f"MODEL.VILD.CLIP_MODEL {vild.CLIP_MODEL}"},
                           **{k: v for k, v in expected.items() if k in cache.manifest})


class DistillDatasetMapper(DatasetMapper):
    @configurable
    def __init__(
        self,
        is_train: bool,
        *,
        cache: EmbeddingCache = None,
        num_proposals: int = 300,
        class_agnostic: bool = False,
        bad_images: str = "stop",
        **kwargs,
    ):
        """
        Args:
            cache: the embedding cache; None attaches nothing.
            num_proposals: how many cached proposals (highest objectness first) per image.
            class_agnostic: every ground-truth box becomes class 0 (the stage-1 detector).
            bad_images: an image that does not decode: "stop" (DatasetError naming it) or, in
                training, "skip" it (detectron2 then draws another).
            kwargs: DatasetMapper's arguments.
        """
        super().__init__(is_train, **kwargs)
        if bad_images not in BAD_IMAGE_POLICIES:
            raise DatasetError(f"DATALOADER.BAD_IMAGES is '{bad_images}'; use one of {', '.join(BAD_IMAGE_POLICIES)}")
        self.bad_images = bad_images
        self.cache = cache
        self.num_proposals = num_proposals
        self.class_agnostic = class_agnostic

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        ret = super().from_config(cfg, is_train)
        lsj = cfg.INPUT.LSJ
        if is_train and lsj.ENABLED:
            size = lsj.IMAGE_SIZE
            ret["augmentations"] = [
                T.ResizeScale(lsj.MIN_SCALE, lsj.MAX_SCALE, size, size),
                T.FixedSizeCrop((size, size)),
                T.RandomFlip(horizontal=True),
            ]
        cache_dir = cfg.MODEL.VILD.DISTILL.CACHE_DIR
        # ViLD-text (and a zero image-loss weight) trains without the cache
        distills = cfg.MODEL.VILD.MODE != "text" and cfg.MODEL.VILD.IMAGE_LOSS_WEIGHT > 0
        # ... unless the cached boxes mark unlabelled objects for the classification loss
        distills = distills or cfg.MODEL.VILD.UNLABELLED_OBJECTNESS > 0
        if is_train and cache_dir and distills:
            ret["cache"] = EmbeddingCache(cache_dir)
            check_cache_matches_config(ret["cache"], cfg)
        ret["num_proposals"] = cfg.MODEL.VILD.DISTILL.NUM_PROPOSALS
        ret["class_agnostic"] = cfg.MODEL.VILD.CLASS_AGNOSTIC_LABELS
        ret["bad_images"] = cfg.DATALOADER.BAD_IMAGES
        return ret

    def __call__(self, dataset_dict):
        try:
            return super().__call__(dataset_dict)
        except UserError:
            raise
        except (OSError, SizeMismatchError) as e:  # what decoding a damaged image raises
            path = dataset_dict.get("file_name")
            if self.is_train and self.bad_images == "skip":
                logger.warning(f"image {path} does not decode ({e}): skipped")
                return None
            raise DatasetError(
                f"image {path} does not decode ({type(e).__name__}: {e}); replace it or take it out of "
                "the dataset (tools/check_dataset.py lists every such file), or set "
                "DATALOADER.BAD_IMAGES skip to train without it"
            ) from None

    def _transform_annotations(self, dataset_dict, transforms, image_shape):
        super()._transform_annotations(dataset_dict, transforms, image_shape)
        if self.class_agnostic:
            dataset_dict["instances"].gt_classes.zero_()
        if self.cache is not None:
            dataset_dict["distill"] = self._distill_instances(
                dataset_dict["image_id"], transforms, image_shape
            )

    def _distill_instances(self, image_id, transforms, image_shape) -> Instances:
        entry = self.cache.get(image_id, top_k=self.num_proposals)
        boxes = Boxes(torch.as_tensor(transforms.apply_box(entry.boxes), dtype=torch.float32))
        boxes.clip(image_shape)
        keep = boxes.nonempty()
        distill = Instances(image_shape)
        distill.proposal_boxes = boxes[keep]
        distill.clip_embeddings = torch.as_tensor(
            entry.embeddings[keep.numpy()], dtype=torch.float32
        )
        distill.objectness = torch.as_tensor(entry.scores[keep.numpy()], dtype=torch.float32)
        return distill
