"""Open-vocabulary prediction on single images: any vocabulary without retraining, and the
paper's vocabulary expansion with attributes, p(object and attribute) = p(object) p(attribute)."""
from typing import List, Optional, Sequence

import torch
from detectron2.data import transforms as T
from detectron2.modeling.postprocessing import detector_postprocess

from ..modeling.vocabulary import class_embeddings, set_model_vocabulary


class OVDPredictor:
    def __init__(self, cfg, vocabulary: Sequence[str], novel: Sequence[str] = (),
                 attributes: Optional[Sequence[str]] = None):
        """
        Args:
            cfg: a ViLD config with MODEL.WEIGHTS set.
            vocabulary: class (object) names to detect.
            novel: which of them to treat as novel (ViLD-ensemble weighting).
            attributes: optional attribute names; each detection is then labelled
                "<attribute> <object>" with score p(object) * p(attribute).
        """
        from detectron2.checkpoint import DetectionCheckpointer
        from detectron2.modeling import build_model

        self.cfg = cfg.clone()
        self.model = build_model(self.cfg).eval()
        DetectionCheckpointer(self.model).load(cfg.MODEL.WEIGHTS)
        self.vocabulary = list(vocabulary)
        set_model_vocabulary(self.model, self.cfg, self.vocabulary, list(novel))
        self.attributes = list(attributes or [])
        self.attribute_embeddings = (
            class_embeddings(self.cfg, self.attributes).to(self.cfg.MODEL.DEVICE) if self.attributes else None
        )
        self.aug = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)

    @property
    def class_names(self) -> List[str]:
        return self.vocabulary

    @torch.no_grad()
    def __call__(self, image_rgb) -> dict:
        """image_rgb: HxWx3 uint8 RGB. Returns {"instances", "labels"} in image coordinates."""
        height, width = image_rgb.shape[:2]
        image = image_rgb if self.cfg.INPUT.FORMAT == "RGB" else image_rgb[:, :, ::-1]
        resized = self.aug.get_transform(image).apply_image(image)
        tensor = torch.as_tensor(resized.astype("float32").transpose(2, 0, 1))
        inputs = [{"image": tensor, "height": height, "width": width}]
        instances = self.model.inference(inputs, do_postprocess=False)[0]
        labels = [self.vocabulary[c] for c in instances.pred_classes.tolist()]
        if self.attributes:
            instances, labels = self._expand_with_attributes(inputs, instances)
        return {"instances": detector_postprocess(instances, height, width), "labels": labels}

    def _expand_with_attributes(self, inputs, instances):
        model = self.model
        heads = model.roi_heads
        predictor = heads.box_predictor
        images = model.preprocess_image(inputs)
        features = model.backbone(images.tensor)
        feats = heads.box_head(heads.box_pooler([features[f] for f in heads.box_in_features],
                                                [instances.pred_boxes]))
        region = predictor.region_embeddings(feats)
        p_attr = (region @ self.attribute_embeddings.t() / predictor.temperature).softmax(dim=-1)
        best_p, best = p_attr.max(dim=1)
        instances.scores = instances.scores * best_p
        labels = [f"{self.attributes[a]} {self.vocabulary[c]}"
                  for a, c in zip(best.tolist(), instances.pred_classes.tolist())]
        return instances, labels
