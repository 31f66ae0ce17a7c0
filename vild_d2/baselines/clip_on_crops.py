"""The paper's training-free baseline: CLIP on cropped regions.

Stage-1 proposals of each test image are cropped at every crop scale (1x and 1.5x), embedded by
the CLIP image encoder (the per-scale embeddings summed and normalised, exactly as for the
distillation cache), classified against the class text embeddings with a softmax at
MODEL.VILD.IMAGE_TEMPERATURE (0: MODEL.VILD.TEMPERATURE), and scored p(class) x objectness;
per-class NMS as in Fast R-CNN. One encoder pass per proposal: the cost ViLD's single forward
pass removes.

Registered as the meta-architecture ``CLIPOnCropsRCNN``: the stage-1 detector (its checkpoint is
MODEL.WEIGHTS) plus the CLIP encoder of MODEL.VILD.CLIP_MODEL, so that ``tools/train_net.py
--eval-only`` evaluates it like any detector.
"""
import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.data import detection_utils as utils
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.modeling.roi_heads.fast_rcnn import fast_rcnn_inference_single_image
from detectron2.structures import Instances

from ..distill.proposals import PROPOSAL_SCORE_THRESH, select_proposals
from ..distill.region_encoder import RegionEncoder
from ..teacher.loader import load_clip


def clip_on_crops_scores(embeddings: torch.Tensor, text_embeddings: torch.Tensor, objectness: torch.Tensor,
                         temperature: float) -> torch.Tensor:
    """[N, K + 1] detection scores of N regions' unit embeddings against K unit class embeddings:
    softmax over the classes of cosine / temperature, times each region's objectness; the last
    (background) column is 0."""
    probs = (embeddings.float() @ text_embeddings.t() / temperature).softmax(dim=-1)
    probs = probs * objectness[:, None].to(probs)
    return torch.cat([probs, probs.new_zeros(len(probs), 1)], dim=1)


@META_ARCH_REGISTRY.register()
class CLIPOnCropsRCNN(GeneralizedRCNN):
    @configurable
    def __init__(self, *, encoder: RegionEncoder, temperature: float, num_proposals: int = 300,
                 min_box_size: float = 0.0, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 topk: int = 100, **kwargs):
        """
        Args:
            encoder: crops and embeds regions with the CLIP image encoder. Not a submodule: the
                CLIP weights are not part of the detector's checkpoint.
            temperature: softmax temperature of the class scores.
            num_proposals, min_box_size: which stage-1 detections are classified (the cache's
                selection, ``select_proposals``).
            score_thresh, nms_thresh, topk: the final detections' threshold, per-class NMS and cap.
            kwargs: GeneralizedRCNN's arguments: the class-agnostic stage-1 detector.
        """
        super().__init__(**kwargs)
        if temperature <= 0:
            raise ValueError(
                f"the softmax temperature must be > 0, got {temperature}; set "
                "MODEL.VILD.IMAGE_TEMPERATURE (or, when it is 0, MODEL.VILD.TEMPERATURE)"
            )
        # every stage-1 detection is a candidate: no threshold and no cap before the selection
        self.roi_heads.box_predictor.test_score_thresh = PROPOSAL_SCORE_THRESH
        self.roi_heads.box_predictor.test_topk_per_image = -1
        self.encoder = encoder
        self.temperature = temperature
        self.num_proposals, self.min_box_size = num_proposals, min_box_size
        self.score_thresh, self.nms_thresh, self.topk = score_thresh, nms_thresh, topk
        dim = encoder.info.embed_dim
        self.register_buffer("text_embeddings", torch.empty(0, dim), persistent=False)
        self.register_buffer("novel_class_mask", torch.empty(0, dtype=torch.bool), persistent=False)

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        vild = cfg.MODEL.VILD
        d = vild.DISTILL
        clip_model, info = load_clip(vild.CLIP_MODEL)
        ret.update(
            encoder=RegionEncoder(clip_model, info, d.CROP_SCALES, d.ENSEMBLE_CROPS, d.CROP_BATCH_SIZE,
                                  device=cfg.MODEL.DEVICE, precision=d.PRECISION),
            temperature=vild.IMAGE_TEMPERATURE or vild.TEMPERATURE,
            num_proposals=d.NUM_PROPOSALS,
            min_box_size=d.MIN_BOX_SIZE,
            score_thresh=cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST,
            nms_thresh=cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST,
            topk=cfg.TEST.DETECTIONS_PER_IMAGE,
        )
        return ret

    def set_vocabulary(self, text_embeddings, novel_class_mask=None) -> None:
        """The classes to score: [K, D] text embeddings (``novel_class_mask`` is kept for the
        vocabulary interface; CLIP on crops scores base and novel classes alike)."""
        text_embeddings = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.encoder.info.embed_dim:
            raise ValueError(
                f"class text embeddings have shape {tuple(text_embeddings.shape)}, expected "
                f"[num_classes, {self.encoder.info.embed_dim}] (the CLIP model's embedding size)"
            )
        self.text_embeddings = F.normalize(text_embeddings, dim=-1).to(self.device)
        if novel_class_mask is None:
            novel_class_mask = torch.zeros(len(text_embeddings), dtype=torch.bool)
        self.novel_class_mask = torch.as_tensor(novel_class_mask, dtype=torch.bool).to(self.device)

    def forward(self, batched_inputs):
        if self.training:
            raise ValueError(
                "CLIP on cropped regions is training-free: evaluate it with tools/train_net.py "
                "--eval-only and the stage-1 checkpoint in MODEL.WEIGHTS"
            )
        return self.inference(batched_inputs)

    @torch.no_grad()
    def inference(self, batched_inputs, detected_instances=None, do_postprocess=True):
        if not len(self.text_embeddings):
            raise ValueError("CLIP on crops has no vocabulary yet: call set_vocabulary first")
        detections = super().inference(batched_inputs, detected_instances, do_postprocess=True)
        return [{"instances": self._classify(x, d["instances"].to("cpu"))}
                for x, d in zip(batched_inputs, detections)]

    def _classify(self, x: dict, proposals: Instances) -> Instances:
        h, w = proposals.image_size
        boxes, objectness = select_proposals(proposals.pred_boxes.tensor, proposals.scores, (h, w),
                                             self.num_proposals, self.min_box_size)
        if "file_name" not in x:
            raise ValueError("CLIP on crops cuts its crops from each image's original pixels: the "
                             "inputs need their 'file_name'")
        image = torch.from_numpy(utils.read_image(x["file_name"], format="RGB").transpose(2, 0, 1).copy())
        emb = torch.as_tensor(self.encoder([image], [boxes])[0]).float().to(self.text_embeddings.device)
        scores = clip_on_crops_scores(emb, self.text_embeddings, objectness, self.temperature)
        result, _ = fast_rcnn_inference_single_image(
            boxes.to(scores), scores, (h, w), self.score_thresh, self.nms_thresh, self.topk
        )
        return result
