"""ViLD's box predictor: region embeddings classified against frozen CLIP text embeddings.

region embedding = L2-normalise(W x box-head feature)
logits = [cos(e, t_1) .. cos(e, t_K), cos(e, bg)] / temperature

As everywhere in detectron2, the background is the LAST column (the paper writes it first);
the background embedding is a learned vector, the class embeddings are a frozen buffer that is
not saved with the weights, so any vocabulary can be swapped in at test time.
"""
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling.roi_heads.fast_rcnn import FastRCNNOutputLayers
from detectron2.structures import Instances
from torch import nn

from ..utils import ConfigError
from .vocabulary import resolve_class_embeddings


class ViLDTextPredictor(FastRCNNOutputLayers):
    @configurable
    def __init__(
        self,
        input_shape: ShapeSpec,
        *,
        text_embeddings: torch.Tensor,
        temperature: float = 0.01,
        background_init_std: float = 0.01,
        text_loss_weight: float = 1.0,
        novel_class_mask: Optional[torch.Tensor] = None,
        **kwargs,
    ):
        """
        Args:
            text_embeddings: [K, D] class embeddings of the training vocabulary (frozen).
            temperature: logits are cosine similarities divided by this.
            background_init_std: std of the learned background vector's normal initialisation.
            text_loss_weight: weight of the classification (ViLD-text) loss; 0 disables it.
            novel_class_mask: [K] bool, which vocabulary classes are novel (for the ensemble).
            kwargs: FastRCNNOutputLayers' arguments; box regression is class-agnostic.
        """
        kwargs["cls_agnostic_bbox_reg"] = True
        super().__init__(input_shape, num_classes=len(text_embeddings), **kwargs)
        del self.cls_score  # replaced by the projection + text classifier
        input_size = input_shape.channels * (input_shape.width or 1) * (input_shape.height or 1)
        embed_dim = text_embeddings.shape[1]
        self.projection = nn.Linear(input_size, embed_dim)
        nn.init.normal_(self.projection.weight, std=0.01)
        nn.init.constant_(self.projection.bias, 0)
        self.background = nn.Parameter(torch.randn(embed_dim) * background_init_std)
        self.temperature = temperature
        self.text_loss_weight = text_loss_weight
        self.register_buffer("text_embeddings", torch.empty(0, embed_dim), persistent=False)
        self.register_buffer("novel_class_mask", torch.empty(0, dtype=torch.bool), persistent=False)
        self.set_vocabulary(text_embeddings, novel_class_mask)

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret.pop("num_classes")
        text, novel = resolve_class_embeddings(cfg, training=True)
        ret.update(
            text_embeddings=text,
            novel_class_mask=novel,
            temperature=cfg.MODEL.VILD.TEMPERATURE,
            background_init_std=cfg.MODEL.VILD.BACKGROUND_INIT_STD,
            # ViLD-image trains the region embeddings by distillation alone
            text_loss_weight=0.0 if cfg.MODEL.VILD.MODE == "image" else cfg.MODEL.VILD.TEXT_LOSS_WEIGHT,
        )
        return ret

    @property
    def embed_dim(self) -> int:
        return self.projection.out_features

    def set_vocabulary(self, text_embeddings, novel_class_mask=None) -> None:
        """Swap the class embeddings (any number of classes); no retraining needed."""
        text_embeddings = torch.as_tensor(text_embeddings, dtype=torch.float32)
        if text_embeddings.ndim != 2 or text_embeddings.shape[1] != self.embed_dim:
            raise ConfigError(
                f"class text embeddings have shape {tuple(text_embeddings.shape)}, expected "
                f"[num_classes, {self.embed_dim}] (the model's MODEL.VILD.EMBED_DIM); compute them "
                "with the CLIP model the detector was trained with"
            )
        device = self.projection.weight.device
        self.text_embeddings = F.normalize(text_embeddings, dim=-1).to(device)
        if novel_class_mask is None:
            novel_class_mask = torch.zeros(len(text_embeddings), dtype=torch.bool)
        self.novel_class_mask = torch.as_tensor(novel_class_mask, dtype=torch.bool).to(device)
        self.num_classes = len(text_embeddings)

    def region_embeddings(self, x: torch.Tensor, projection: Optional[nn.Linear] = None):
        """L2-normalised region embeddings [N, D] of box-head features (float32, also under
        autocast: cosines over a temperature of 0.01 need more than bfloat16's precision)."""
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize((projection or self.projection)(x.float()), dim=-1)

    def classify(self, region_embeddings: torch.Tensor) -> torch.Tensor:
        """[N, K + 1] logits: cosine to each class, then to the background, over temperature."""
        with torch.autocast(region_embeddings.device.type, enabled=False):
            classifier = torch.cat([self.text_embeddings, F.normalize(self.background, dim=0)[None]])
            return region_embeddings.float() @ classifier.t() / self.temperature

    def forward(self, x):
        if x.dim() > 2:
            x = torch.flatten(x, start_dim=1)
        return self.classify(self.region_embeddings(x)), self.bbox_pred(x)

    def losses(self, predictions, proposals: List[Instances]) -> Dict[str, torch.Tensor]:
        losses = super().losses(predictions, proposals)
        losses["loss_cls"] = losses["loss_cls"] * self.text_loss_weight
        return losses

    @staticmethod
    def image_probs(image_logits: torch.Tensor) -> torch.Tensor:
        """[N, K + 1] probabilities of a head that only imitates CLIP's image embeddings, as the
        official code scores it: a softmax over the K classes alone (its background vector was
        never trained against them), and a background column of 0."""
        probs = F.softmax(image_logits[:, :-1], dim=-1)
        return torch.cat([probs, probs.new_zeros(len(probs), 1)], dim=1)

    def ensemble_probs(self, text_logits: torch.Tensor, image_logits: torch.Tensor, lam: float):
        """ViLD-ensemble, as the official code scores it: the text head's softmax over the K
        classes and the background, the image head's over the K classes alone (``image_probs``),
        then per class a geometric mean,
        base:  p_text^lam * p_image^(1 - lam);  novel: p_text^(1 - lam) * p_image^lam
        (lam = 2/3: the official (p_img * p_text * t)^(1/3), t = p_text for base, p_img for novel).
        The background column is the text head's."""
        p_text = F.softmax(text_logits, dim=-1)
        p_image = self.image_probs(image_logits)
        novel = torch.cat([self.novel_class_mask, self.novel_class_mask.new_zeros(1)])
        w_text = torch.where(novel, 1.0 - lam, lam).to(p_text.dtype)
        probs = p_text.pow(w_text) * p_image.pow(1.0 - w_text)
        probs[:, -1] = p_text[:, -1]
        return probs
