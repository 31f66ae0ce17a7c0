"""ViLD's ROI heads: detectron2's StandardROIHeads plus the image-distillation branch.

Training: the sampled RoIs feed the text branch (classification against class text embeddings
and class-agnostic box regression); the cached stage-1 proposals of each image feed the image
branch, whose region embeddings are pulled towards their cached CLIP embeddings by an L1 loss.
Mode "vild" shares one box head for both (the cached RoIs ride in the same box-head batch and are
split off before the text losses); "ensemble" gives the image branch its own box head and
projection, and combines both heads' probabilities at test time.
"""
from typing import List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.proposal_generator.proposal_utils import add_ground_truth_to_proposals
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, StandardROIHeads
from detectron2.modeling.roi_heads.box_head import build_box_head
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference
from detectron2.structures import Instances, pairwise_ioa, pairwise_iou
from detectron2.utils.events import get_event_storage
from torch import nn

from ..utils import ConfigError
from .text_predictor import ViLDTextPredictor

MODES = ("text", "vild", "image", "ensemble")


def _pooled_shape(cfg, input_shape) -> ShapeSpec:
    channels = input_shape[cfg.MODEL.ROI_HEADS.IN_FEATURES[0]].channels
    res = cfg.MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION
    return ShapeSpec(channels=channels, height=res, width=res)


def _flat_size(shape: ShapeSpec) -> int:
    return shape.channels * (shape.width or 1) * (shape.height or 1)


@ROI_HEADS_REGISTRY.register()
class ViLDROIHeads(StandardROIHeads):
    @configurable
    def __init__(
        self,
        *,
        mode: str = "vild",
        image_loss_weight: float = 0.5,
        ensemble_lambda: float = 2.0 / 3.0,
        image_box_head: Optional[nn.Module] = None,
        label_assignment: str = "iou",
        iot_threshold: float = 0.8,
        ensemble_test_head: str = "ensemble",
        unlabelled_objectness: float = 0.0,
        objectness_weight: float = 0.0,
        image_temperature: float = 0.0,
        **kwargs,
    ):
        """
        Args:
            mode: "text" (no image loss), "vild" (text + image, one head), "image" (image loss,
                no classification loss) or "ensemble" (a second head for the image branch).
            image_loss_weight: weight of the L1 distillation loss.
            ensemble_lambda: the ensemble's geometric-mean weight.
            image_box_head: the ensemble's second box head.
            label_assignment: "iou" (detectron2's matcher) or "iot" (intersection over the
                ground-truth box's area, matched at ``iot_threshold``).
            ensemble_test_head: with mode "ensemble", which head scores test detections:
                "ensemble" (both combined), "text" or "image" (one head alone).
            unlabelled_objectness: cached proposals scoring at least this and matching no
                ground truth are unlabelled objects; background RoIs on them are left out of the
                classification loss. 0 disables.
            objectness_weight: test scores are class probabilities times the proposal's
                objectness probability to this power; 0 (the paper) leaves them as they are.
            image_temperature: softmax temperature of the distilled image head's test scores
                (the ensemble's image head, mode "image"); 0 keeps the predictor's.
            kwargs: StandardROIHeads' arguments; box_predictor must be a ViLDTextPredictor.
        """
        super().__init__(**kwargs)
        if mode not in MODES:
            raise ConfigError(f"MODEL.VILD.MODE must be one of {MODES}, got '{mode}'")
        if label_assignment not in ("iou", "iot"):
            raise ConfigError(f"MODEL.VILD.LABEL_ASSIGNMENT must be 'iou' or 'iot', got '{label_assignment}'")
        if ensemble_test_head not in ("ensemble", "text", "image"):
            raise ConfigError(
                "MODEL.VILD.ENSEMBLE_TEST_HEAD must be 'ensemble', 'text' or 'image', "
                f"got '{ensemble_test_head}'"
            )
        self.mode = mode
        self.ensemble_test_head = ensemble_test_head
        self.image_loss_weight = 0.0 if mode == "text" else image_loss_weight
        self.ensemble_lambda = ensemble_lambda
        self.unlabelled_objectness = unlabelled_objectness
        if objectness_weight < 0:
            raise ConfigError(f"MODEL.VILD.OBJECTNESS_WEIGHT must be >= 0, got {objectness_weight}")
        self.objectness_weight = objectness_weight
        if image_temperature < 0:
            raise ConfigError(f"MODEL.VILD.IMAGE_TEMPERATURE must be >= 0, got {image_temperature}")
        self.image_temperature = image_temperature
        self.label_assignment = label_assignment
        self.iot_matcher = Matcher([iot_threshold], [0, 1], allow_low_quality_matches=False)
        if mode == "ensemble":
            if image_box_head is None:
                raise ConfigError("ViLD-ensemble needs image_box_head, a second box head")
            self.image_box_head = image_box_head
            self.image_projection = nn.Linear(
                _flat_size(image_box_head.output_shape), self.box_predictor.embed_dim
            )
            nn.init.normal_(self.image_projection.weight, std=0.01)
            nn.init.constant_(self.image_projection.bias, 0)

    @property
    def num_classes(self) -> int:
        """The number of classes follows the predictor's vocabulary, not ROI_HEADS.NUM_CLASSES."""
        return self.box_predictor.num_classes

    @num_classes.setter
    def num_classes(self, value):
        pass  # set by ROIHeads.__init__ from the config; the vocabulary decides instead

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        vild = cfg.MODEL.VILD
        ret.update(
            mode=vild.MODE,
            image_loss_weight=vild.IMAGE_LOSS_WEIGHT,
            ensemble_lambda=vild.ENSEMBLE_LAMBDA,
            label_assignment=vild.LABEL_ASSIGNMENT,
            iot_threshold=vild.IOT_THRESHOLD,
            ensemble_test_head=vild.ENSEMBLE_TEST_HEAD,
            unlabelled_objectness=vild.UNLABELLED_OBJECTNESS,
            objectness_weight=vild.OBJECTNESS_WEIGHT,
            image_temperature=vild.IMAGE_TEMPERATURE,
        )
        if vild.MODE == "ensemble":
            ret["image_box_head"] = build_box_head(cfg, _pooled_shape(cfg, input_shape))
        return ret

    @classmethod
    def _init_box_head(cls, cfg, input_shape):
        ret = super()._init_box_head(cfg, input_shape)
        ret["box_predictor"] = ViLDTextPredictor(cfg, ret["box_head"].output_shape)
        return ret

    def forward(self, images, features, proposals, targets=None, distill_targets=None):
        """As StandardROIHeads.forward; ``distill_targets`` is one Instances per image with
        ``proposal_boxes`` and ``clip_embeddings`` (or None where an image has no cache)."""
        del images
        if not self.training:
            pred_instances = self._forward_box(features, proposals)
            return self.forward_with_given_boxes(features, pred_instances), {}
        proposals = self.label_and_sample_proposals(proposals, targets)
        losses = self._forward_box(features, proposals, distill_targets, targets)
        losses.update(self._forward_mask(features, proposals))
        losses.update(self._forward_keypoint(features, proposals))
        return proposals, losses

    def _forward_box(self, features, proposals, distill_targets=None, targets=None):
        features = [features[f] for f in self.box_in_features]
        pooled = self.box_pooler(features, [p.proposal_boxes for p in proposals])
        if not self.training:
            return self._inference(features, pooled, proposals)

        distill = self._valid_distill(distill_targets, len(proposals))
        pooled_distill = None
        if distill is not None:
            pooled_distill = self.box_pooler(features, [d.proposal_boxes for d in distill])
        share_head = pooled_distill is not None and self.mode in ("vild", "image")
        if share_head:  # one box-head pass over [sampled RoIs; cached RoIs], split after
            head_out = self.box_head(torch.cat([pooled, pooled_distill]))
            box_feats, distill_feats = head_out[: len(pooled)], head_out[len(pooled) :]
        else:
            box_feats = self.box_head(pooled)
        predictions = self.box_predictor(box_feats)
        keep = self._not_on_unlabelled_objects(proposals, distill_targets, targets)
        if keep is not None:
            predictions = tuple(x[torch.cat(keep)] for x in predictions)
            proposals = [p[k] for p, k in zip(proposals, keep)]
            ignored = sum(int((~k).sum()) for k in keep)
            get_event_storage().put_scalar("roi_head/num_unlabelled_ignored", ignored / len(keep))
        losses = self.box_predictor.losses(predictions, proposals)

        if pooled_distill is None:
            # keep every distillation parameter in the graph (DDP) with a zero loss
            losses["loss_image"] = self._zero_image_loss(box_feats)
            return losses
        if share_head:
            region = self.box_predictor.region_embeddings(distill_feats)
        else:
            region = self.box_predictor.region_embeddings(
                self.image_box_head(pooled_distill), self.image_projection
            )
        target = torch.cat([d.clip_embeddings for d in distill]).to(region.dtype)
        losses["loss_image"] = self.image_loss_weight * image_distillation_loss(region, target)
        return losses

    def _not_on_unlabelled_objects(self, proposals, distill_targets, targets) -> Optional[List[torch.Tensor]]:
        """Per image, a mask of the sampled RoIs that keep their labels: False for background
        RoIs on an unlabelled object (a confident cached proposal that matches no ground truth)."""
        distill_targets = _every_image_cached(distill_targets, len(proposals))
        if self.unlabelled_objectness <= 0 or distill_targets is None or targets is None:
            return None
        threshold = self.proposal_matcher.thresholds[1]
        keep = []
        for props, cached, tgts in zip(proposals, distill_targets, targets):
            candidates = cached.proposal_boxes[cached.objectness >= self.unlabelled_objectness]
            if len(candidates) and len(tgts):
                labelled = pairwise_iou(candidates, tgts.gt_boxes).max(dim=1).values >= threshold
                candidates = candidates[~labelled]
            mask = torch.ones(len(props), dtype=torch.bool, device=props.gt_classes.device)
            if len(candidates) and len(props):
                on_candidate = pairwise_iou(props.proposal_boxes, candidates).max(dim=1).values >= threshold
                mask = ~(on_candidate & (props.gt_classes == self.num_classes))
            keep.append(mask)
        return keep

    def _valid_distill(self, distill_targets, num_images) -> Optional[List[Instances]]:
        distill_targets = _every_image_cached(distill_targets, num_images)
        if self.image_loss_weight == 0 or distill_targets is None:
            return None
        if sum(len(d) for d in distill_targets) == 0:
            return None
        return distill_targets

    def _zero_image_loss(self, box_feats):
        if self.mode == "ensemble":
            params = list(self.image_box_head.parameters()) + list(self.image_projection.parameters())
            return sum(p.sum() for p in params) * 0.0
        return box_feats.sum() * 0.0

    def _image_head_logits(self, logits):
        """The distilled head's logits at ``image_temperature`` instead of the predictor's."""
        if self.image_temperature == 0:
            return logits
        return logits * (self.box_predictor.temperature / self.image_temperature)

    def _inference(self, features, pooled, proposals):
        predictor = self.box_predictor
        logits, deltas = predictor(self.box_head(pooled))
        if self.mode == "image":
            probs = predictor.image_probs(self._image_head_logits(logits))
        elif self.mode != "ensemble" or self.ensemble_test_head == "text":
            probs = logits.softmax(dim=-1)
        else:
            image_region = predictor.region_embeddings(self.image_box_head(pooled), self.image_projection)
            image_logits = self._image_head_logits(predictor.classify(image_region))
            if self.ensemble_test_head == "image":
                probs = predictor.image_probs(image_logits)
            else:
                probs = predictor.ensemble_probs(logits, image_logits, self.ensemble_lambda)
        if self.objectness_weight > 0:
            objectness = torch.cat([p.objectness_logits for p in proposals]).sigmoid()
            probs = probs * objectness.pow(self.objectness_weight)[:, None]
        boxes = predictor.predict_boxes((logits, deltas), proposals)
        instances, _ = fast_rcnn_inference(
            boxes,
            probs.split([len(p) for p in proposals]),
            [p.image_size for p in proposals],
            predictor.test_score_thresh,
            predictor.test_nms_thresh,
            predictor.test_topk_per_image,
        )
        return instances

    @torch.no_grad()
    def label_and_sample_proposals(self, proposals: List[Instances], targets: List[Instances]):
        if self.label_assignment == "iou":
            return super().label_and_sample_proposals(proposals, targets)
        return self._label_and_sample_by_iot(proposals, targets)

    def _label_and_sample_by_iot(self, proposals, targets):
        """detectron2's labelling loop with IoT (intersection / ground-truth area) as quality."""
        if self.proposal_append_gt:
            proposals = add_ground_truth_to_proposals(targets, proposals)
        sampled, num_fg = [], []
        for props, tgts in zip(proposals, targets):
            # [G, P]: the fraction of each ground-truth box that each proposal covers
            quality = pairwise_ioa(props.proposal_boxes, tgts.gt_boxes).t()
            matched_idxs, matched_labels = self.iot_matcher(quality)
            idxs, gt_classes = self._sample_proposals(matched_idxs, matched_labels, tgts.gt_classes)
            props = props[idxs]
            props.gt_classes = gt_classes
            if len(tgts) > 0:
                for name, value in tgts.get_fields().items():
                    if name.startswith("gt_") and not props.has(name):
                        props.set(name, value[matched_idxs[idxs]])
            num_fg.append((gt_classes != self.num_classes).sum().item())
            sampled.append(props)
        get_event_storage().put_scalar("roi_head/num_fg_samples", sum(num_fg) / max(len(num_fg), 1))
        return sampled


def _every_image_cached(distill_targets, num_images) -> Optional[List[Instances]]:
    """``distill_targets`` when it holds the cached proposals of every one of ``num_images``."""
    if distill_targets is None or len(distill_targets) != num_images:
        return None
    if any(d is None for d in distill_targets):
        return None
    return distill_targets


def image_distillation_loss(region: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 between region and cached CLIP embeddings: sum over dimensions, mean over RoIs."""
    if len(region) == 0:
        return region.sum() * 0.0
    return (region - target).abs().sum(dim=1).mean()
