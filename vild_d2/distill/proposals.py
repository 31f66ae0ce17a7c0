"""Stage-1 proposals: the class-agnostic detector's final detections, cut down to the top M.

The stage-1 detector (class-agnostic Faster R-CNN) runs in eval mode at detectron2's test-time
resize; its *final detections* are the proposals: box-head scores and refined boxes, a score
threshold of 0, NMS at ``MODEL.ROI_HEADS.NMS_THRESH_TEST``, no per-image cap; boxes come back in
the original image's pixels (``do_postprocess``), clipped to the image. Boxes with a side under
``min_box_size`` are dropped and the top ``num_proposals`` by score are kept (a multi-class stage-1
model gets one more, class-agnostic, NMS first).
"""
from typing import Optional, Tuple

import torch
from detectron2.modeling import build_model
from torchvision.ops import nms

from ..checkpoint import VerifiedCheckpointer

__all__ = ["PROPOSAL_SCORE_THRESH", "PROPOSAL_SOURCE", "build_stage1_model", "select_proposals",
           "stage1_inference_cfg"]

PROPOSAL_SOURCE = "stage1_box_head_detections"
PROPOSAL_SCORE_THRESH = 0.0


def stage1_inference_cfg(cfg):
    """The config the stage-1 model is built from: every detection kept for our own selection."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST = PROPOSAL_SCORE_THRESH
    cfg.TEST.DETECTIONS_PER_IMAGE = -1
    cfg.freeze()
    return cfg


def build_stage1_model(cfg):
    model = build_model(cfg)
    VerifiedCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    return model.eval()


def select_proposals(
    boxes: torch.Tensor,
    scores: torch.Tensor,
    image_size: Tuple[int, int],
    num_proposals: int,
    min_box_size: float,
    nms_thresh: Optional[float] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Clip to the image, drop boxes with a side < ``min_box_size``, optionally NMS, then the top
    ``num_proposals`` by score (descending, ties in input order)."""
    h, w = image_size
    boxes = torch.stack(
        [
            boxes[:, 0].clamp(0, w),
            boxes[:, 1].clamp(0, h),
            boxes[:, 2].clamp(0, w),
            boxes[:, 3].clamp(0, h),
        ],
        dim=1,
    )
    wh = boxes[:, 2:] - boxes[:, :2]
    keep = (wh >= min_box_size).all(dim=1)
    boxes, scores = boxes[keep], scores[keep]
    if nms_thresh is not None and len(boxes):
        keep = nms(boxes, scores, nms_thresh)
        boxes, scores = boxes[keep], scores[keep]
    order = torch.sort(scores, descending=True, stable=True).indices[:num_proposals]
    return boxes[order], scores[order]
