"""The official ViLD box head: detectron2's conv + fc head with the normalisation after the fc
layers too: 4 x (3x3 conv 256 + norm + ReLU) + 2 x (fc 1024 + norm + ReLU)."""
from collections import OrderedDict

from detectron2.config import configurable
from detectron2.layers import get_norm
from detectron2.modeling.roi_heads.box_head import ROI_BOX_HEAD_REGISTRY, FastRCNNConvFCHead
from torch import nn


class _NormOfVectors(nn.Module):
    """A 2-d normalisation layer (BN, SyncBN, GN, ...) applied to [N, C] vectors."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm = norm

    def forward(self, x):
        return self.norm(x[:, :, None, None]).flatten(1)


@ROI_BOX_HEAD_REGISTRY.register()
class ViLDConvFCHead(FastRCNNConvFCHead):
    @configurable
    def __init__(self, input_shape, *, conv_dims, fc_dims, conv_norm="", fc_norm=""):
        """As FastRCNNConvFCHead, with ``fc_norm`` between each fc layer and its ReLU."""
        super().__init__(input_shape, conv_dims=conv_dims, fc_dims=fc_dims, conv_norm=conv_norm)
        if not fc_norm:
            return
        layers = OrderedDict()
        for name, module in self._modules.items():
            if name.startswith("fc_relu"):
                k = int(name[len("fc_relu"):])
                layers[f"fc_norm{k}"] = _NormOfVectors(get_norm(fc_norm, fc_dims[k - 1]))
            layers[name] = module
        self._modules = layers

    @classmethod
    def from_config(cls, cfg, input_shape):
        ret = super().from_config(cfg, input_shape)
        ret["fc_norm"] = cfg.MODEL.ROI_BOX_HEAD.NORM
        return ret
