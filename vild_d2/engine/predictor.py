"""Open-vocabulary prediction on single images: any vocabulary without retraining, and the
paper's vocabulary expansion with attributes, p(object and attribute) = p(object) p(attribute)."""
from typing import List, Optional, Sequence

from detectron2.engine import DefaultPredictor

from ..modeling.vocabulary import class_embeddings, set_model_vocabulary


class OVDPredictor(DefaultPredictor):
    """detectron2's DefaultPredictor (MODEL.WEIGHTS loaded, one BGR image in, its detections in
    image coordinates out) scoring the classes of ``vocabulary``."""

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
        super().__init__(cfg)
        self.vocabulary = list(vocabulary)
        set_model_vocabulary(self.model, self.cfg, self.vocabulary, list(novel))
        self.attributes = list(attributes or [])
        self.attribute_embeddings = None
        if self.attributes:
            self.attribute_embeddings = class_embeddings(self.cfg, self.attributes).to(self.cfg.MODEL.DEVICE)

    @property
    def class_names(self) -> List[str]:
        return self.vocabulary

    def __call__(self, original_image) -> dict:
        """original_image: HxWx3 uint8 in BGR order (``cv2.imread``). Returns the model's
        ``{"instances"}`` in image coordinates plus ``"labels"``, one name per detection."""
        hook = None
        if self.attributes:
            hook = self.model.roi_heads.register_forward_hook(self._label_attributes)
        try:
            predictions = super().__call__(original_image)
        finally:
            if hook is not None:
                hook.remove()
        instances = predictions["instances"]
        labels = [self.vocabulary[c] for c in instances.pred_classes.tolist()]
        if self.attributes:
            instances.scores = instances.scores * instances.attribute_scores
            labels = [f"{self.attributes[a]} {name}" for a, name in zip(instances.attributes.tolist(), labels)]
        return dict(predictions, labels=labels)

    def _label_attributes(self, roi_heads, inputs, outputs) -> None:
        """On the ROI heads' output (boxes in the network's input frame), from the features of the
        same backbone pass: each detection's most likely attribute and its probability, carried
        through post-processing as the fields ``attributes`` and ``attribute_scores``."""
        features = inputs[1]  # roi_heads(images, features, proposals, targets)
        predictor = roi_heads.box_predictor
        for instances in outputs[0]:
            pooled = roi_heads.box_pooler([features[f] for f in roi_heads.box_in_features],
                                          [instances.pred_boxes])
            region = predictor.region_embeddings(roi_heads.box_head(pooled))
            p_attr = (region @ self.attribute_embeddings.t() / predictor.temperature).softmax(dim=-1)
            instances.attribute_scores, instances.attributes = p_attr.max(dim=1)
