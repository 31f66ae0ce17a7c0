"""The paper's training-free baseline: CLIP on cropped regions.

Stage-1 proposals of each test image are cropped at every crop scale (1x and 1.5x), embedded by
the CLIP image encoder (the per-scale embeddings summed and normalised, exactly as for the
distillation cache), classified against the class text embeddings with a softmax at
MODEL.VILD.IMAGE_TEMPERATURE (0: MODEL.VILD.TEMPERATURE), and scored p(class) x objectness;
per-class NMS as in Fast R-CNN. One encoder pass per proposal: the cost ViLD's single forward
pass removes.
"""
from typing import List, Sequence

import torch
from detectron2.data import detection_utils as utils
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from detectron2.structures import Instances
from torch import nn

from ..engine.precompute import RegionEncoder, select_proposals


class CLIPOnCropsDetector(nn.Module):
    def __init__(self, stage1_model: nn.Module, encoder: RegionEncoder, text_embeddings: torch.Tensor,
                 *, temperature: float = 0.01, num_proposals: int = 300, min_box_size: float = 4.0,
                 score_thresh: float = 0.05, nms_thresh: float = 0.5, topk: int = 100):
        """
        Args:
            stage1_model: the class-agnostic proposal detector (eval mode, low score threshold).
            encoder: crops and embeds regions with the CLIP image encoder.
            text_embeddings: [K, D] class embeddings of the test vocabulary.
        """
        super().__init__()
        self.stage1 = stage1_model
        self.encoder = encoder
        self.register_buffer("text", nn.functional.normalize(text_embeddings.float(), dim=-1), persistent=False)
        if temperature <= 0:
            raise ValueError(
                f"the softmax temperature must be > 0, got {temperature}; set "
                "MODEL.VILD.IMAGE_TEMPERATURE (or, when it is 0, MODEL.VILD.TEMPERATURE)"
            )
        self.temperature = temperature
        self.num_proposals = num_proposals
        self.min_box_size = min_box_size
        self.score_thresh, self.nms_thresh, self.topk = score_thresh, nms_thresh, topk

    @torch.no_grad()
    def forward(self, batched_inputs: List[dict]) -> List[dict]:
        detections = self.stage1(batched_inputs)  # boxes in original image coordinates
        return [{"instances": self._classify(x, d["instances"].to("cpu"))}
                for x, d in zip(batched_inputs, detections)]

    def _classify(self, x: dict, proposals: Instances) -> Instances:
        h, w = proposals.image_size
        boxes, objectness = select_proposals(proposals.pred_boxes.tensor, proposals.scores, (h, w),
                                             self.num_proposals, self.min_box_size)
        image = torch.from_numpy(utils.read_image(x["file_name"], format="RGB").transpose(2, 0, 1).copy())
        emb = torch.as_tensor(self.encoder([image], [boxes])[0]).float().to(self.text.device)
        probs = (emb @ self.text.t() / self.temperature).softmax(dim=-1) * objectness[:, None].to(emb)
        scores = torch.cat([probs, probs.new_zeros(len(probs), 1)], dim=1)  # + background column
        result, _ = fast_rcnn_inference_single_image(
            boxes.to(emb), scores, (h, w), self.score_thresh, self.nms_thresh, self.topk
        )
        return result


def build_clip_on_crops(cfg, stage1_weights: str, class_names: Sequence[str]) -> CLIPOnCropsDetector:
    """From a ViLD config (CLIP model, templates, temperature, crop scales) and stage-1 weights."""
    from ..engine.precompute import build_stage1_model, stage1_inference_cfg
    from ..modeling.vocabulary import class_embeddings
    from ..teacher import load_clip

    s1 = stage1_inference_cfg(cfg)
    s1.defrost()
    s1.MODEL.META_ARCHITECTURE = "GeneralizedRCNN"
    s1.MODEL.ROI_HEADS.NAME = "StandardROIHeads"
    s1.MODEL.ROI_HEADS.NUM_CLASSES = 1
    s1.MODEL.WEIGHTS = stage1_weights
    s1.freeze()
    clip_model, info = load_clip(cfg.MODEL.VILD.CLIP_MODEL)
    d = cfg.MODEL.VILD.DISTILL
    encoder = RegionEncoder(clip_model, info, d.CROP_SCALES, d.ENSEMBLE_CROPS, d.CROP_BATCH_SIZE,
                            device=cfg.MODEL.DEVICE, precision=d.PRECISION)
    return CLIPOnCropsDetector(
        build_stage1_model(s1), encoder, class_embeddings(cfg, class_names),
        temperature=cfg.MODEL.VILD.IMAGE_TEMPERATURE or cfg.MODEL.VILD.TEMPERATURE,
        num_proposals=d.NUM_PROPOSALS,
        min_box_size=d.MIN_BOX_SIZE, score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
        nms_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST, topk=cfg.TEST.DETECTIONS_PER_IMAGE,
    )
