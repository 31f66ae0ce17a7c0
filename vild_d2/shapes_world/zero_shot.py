"""Zero-shot classification of crops with a CLIP model: crop embeddings and accuracy."""

from typing import Dict, Sequence

import torch
import torch.nn.functional as F
from clip.model import CLIP

from ..teacher.loader import CLIP_MEAN, CLIP_STD

__all__ = ["encode_crops", "zero_shot_accuracy"]


@torch.no_grad()
def encode_crops(model: CLIP, crops_0_1: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """[M, D] L2-normalised image embeddings of float [0, 1] crops at the model's resolution."""
    device = model.text_projection.device
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    out = []
    for chunk in crops_0_1.split(batch_size):
        x = (chunk.to(device) - mean) / std
        out.append(F.normalize(model.encode_image(x).float(), dim=-1))
    return torch.cat(out)


def zero_shot_accuracy(
    image_embeddings: torch.Tensor,
    labels: torch.Tensor,
    text_embeddings: torch.Tensor,
    class_names: Sequence[str],
    novel_classes: Sequence[str] = (),
) -> Dict[str, float]:
    """Accuracy over all crops and over the crops of ``novel_classes`` (classified among all)."""
    pred = (image_embeddings @ text_embeddings.t()).argmax(1).cpu()
    correct = pred == labels.cpu()
    novel = torch.tensor([class_names[i] in set(novel_classes) for i in labels.tolist()])
    return {
        "all": float(correct.float().mean()) if len(correct) else float("nan"),
        "novel": float(correct[novel].float().mean()) if novel.any() else float("nan"),
    }
