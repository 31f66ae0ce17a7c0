"""GeneralizedRCNN that hands each image's cached distillation targets to the ROI heads."""
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.utils.events import get_event_storage


@META_ARCH_REGISTRY.register()
class ViLDRCNN(GeneralizedRCNN):
    def forward(self, batched_inputs):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        distill = [x["distill"].to(self.device) if "distill" in x else None for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(
            images, features, proposals, gt_instances, distill_targets=distill
        )
        if self.vis_period > 0 and get_event_storage().iter % self.vis_period == 0:
            self.visualize_training(batched_inputs, proposals)
        losses = dict(detector_losses)
        losses.update(proposal_losses)
        return losses
