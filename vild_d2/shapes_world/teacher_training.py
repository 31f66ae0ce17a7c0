"""Contrastive training of a small CLIP (OpenAI's architecture, ResNet image tower) on object crops.

A batch samples boxes class-balanced and pairs their augmented crops with one caption per class
("template.format(class name)", a random template per class and step). With 16 classes a batch
holds many crops of one class, so the loss is over the deduplicated captions: image->text is a
cross-entropy over the captions of every class (and of the other concepts in the batch),
text->image a cross-entropy with every crop of the concept as a positive.

Like CLIP, whose vocabulary is far larger than any detector's, the teacher also learns words for
what the world draws beyond its classes (``other_names``: distractors such as "grey cross").
Without them it has no place for such objects but near some class, and a detector distilled
from it learns to call them that class.
"""

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import clip
import torch
import torch.nn.functional as F
from clip.model import CLIP

from ..teacher.loader import CLIP_MEAN, CLIP_STD
from ..teacher.templates import check_templates, fill_templates
from .teacher_crops import CropBank, add_background_boxes, random_crops

__all__ = ["TeacherConfig", "build_teacher_model", "contrastive_loss", "train_teacher"]

logger = logging.getLogger(__name__)

# the captions of the teacher's crops; the detector's class embeddings use the same (the world's
# configs set MODEL.VILD.PROMPT_TEMPLATES [], the checkpoint's own)
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a picture of a {}.",
    "a drawing of a {}.",
    "an image of a {}.",
    "a close-up photo of a {}.",
    "a {}.",
)
CONTEXT_LENGTH = 77  # clip.tokenize's context length
VOCAB_SIZE = 49408  # clip.tokenize's vocabulary
_RUN_ONLY_FIELDS = ("num_threads", "log_every")
_BACKGROUND_FIELDS = ("background_name", "background_per_image", "background_fraction")


@dataclass(frozen=True)
class TeacherConfig:
    seed: int = 0
    steps: int = 600
    # Optional wall-clock cap (seconds) on the training loop; None trains all ``steps``.
    max_seconds: Optional[float] = None
    batch_size: int = 128
    crop_size: int = 32  # the model's input resolution; a multiple of 32 (ResNet stride)
    embed_dim: int = 256
    vision_layers: Tuple[int, int, int, int] = (1, 1, 1, 1)
    vision_width: int = 32
    text_width: int = 128  # heads = text_width // 64, as OpenAI's build_model assumes
    text_layers: int = 2
    lr: float = 2e-3
    weight_decay: float = 0.05
    warmup_steps: int = 50
    box_jitter: float = 0.1
    context_range: Tuple[float, float] = (1.0, 1.6)
    templates: Tuple[str, ...] = field(default=DEFAULT_TEMPLATES)
    # Optionally, like CLIP, which has seen far more than any detection vocabulary, the teacher
    # also learns a concept for what is none of the classes: random boxes off every object
    # (background, texture, unannotated distractors), captioned with this name; "" (default) = off.
    background_name: str = ""
    background_per_image: int = 4  # such boxes drawn per training image
    background_fraction: float = 0.25  # share of each batch's crops that are background
    # Share of each batch's crops taken from the world's objects of no class, each captioned with
    # its own name (balanced over those names); 0 (default) = the classes only. 0.25 keeps
    # distractors far from the class texts but took a third more time and did not lift the
    # detectors beyond run-to-run noise, except single-head ViLD (README).
    other_objects_fraction: float = 0.0
    num_threads: int = 2
    log_every: int = 50

    def __post_init__(self):
        if self.crop_size % 32:
            raise ValueError(
                f"crop_size must be a multiple of 32 (ResNet stride), got {self.crop_size}"
            )
        if self.text_width % 64:
            raise ValueError(
                f"text_width must be a multiple of 64 (64 per head), got {self.text_width}"
            )
        if not 0.0 <= self.background_fraction < 1.0:
            raise ValueError(f"background_fraction must be in [0, 1), got {self.background_fraction}")
        if not 0.0 <= self.other_objects_fraction < 1.0:
            raise ValueError(
                f"other_objects_fraction must be in [0, 1), got {self.other_objects_fraction}"
            )
        if self.background_name and self.background_fraction + self.other_objects_fraction >= 1.0:
            raise ValueError(
                "background_fraction + other_objects_fraction must be below 1, got "
                f"{self.background_fraction} + {self.other_objects_fraction}; lower one of them"
            )
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps must be >= 1 and batch_size >= 2")
        check_templates(self.templates)
        # Normalise list-valued fields so configs read back from JSON compare equal.
        object.__setattr__(self, "vision_layers", tuple(int(x) for x in self.vision_layers))
        object.__setattr__(self, "context_range", tuple(float(x) for x in self.context_range))
        object.__setattr__(self, "templates", tuple(self.templates))

    def to_dict(self) -> dict:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    def cache_key(self) -> dict:
        """The fields that define the trained teacher (not how the run is executed or logged)."""
        unused = () if self.background_name else _BACKGROUND_FIELDS
        return {k: v for k, v in self.to_dict().items() if k not in _RUN_ONLY_FIELDS + unused}

    def architecture(self) -> dict:
        """The positional arguments of ``clip.model.CLIP``, by name."""
        return {
            "embed_dim": self.embed_dim,
            "image_resolution": self.crop_size,
            "vision_layers": list(self.vision_layers),
            "vision_width": self.vision_width,
            "vision_patch_size": None,
            "context_length": CONTEXT_LENGTH,
            "vocab_size": VOCAB_SIZE,
            "transformer_width": self.text_width,
            "transformer_heads": self.text_width // 64,
            "transformer_layers": self.text_layers,
        }


def build_teacher_model(cfg: TeacherConfig) -> CLIP:
    arch = cfg.architecture()
    arch["vision_layers"] = tuple(arch["vision_layers"])
    return CLIP(**arch).float()


def _param_groups(model: CLIP, weight_decay: float):
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        # Gains, biases, embeddings and the temperature are not decayed, as in CLIP.
        if p.ndim < 2 or "embedding" in name or name == "logit_scale":
            no_decay.append(p)
        else:
            decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _adamw(groups, lr: float) -> torch.optim.Optimizer:
    try:
        # Fused: about twice as fast on CPU; most of the parameters are the token embedding.
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def _lr_factor(step: int, cfg: TeacherConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def contrastive_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor, logit_scale: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Symmetric CLIP loss against one caption per class; returns (loss, image->text logits)."""
    logits = logit_scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).t()
    loss_image = F.cross_entropy(logits, labels)
    targets = F.one_hot(labels, logits.shape[1]).t().float()  # [C, B]
    present = targets.sum(1) > 0
    targets = targets[present] / targets[present].sum(1, keepdim=True)
    loss_text = -(targets * F.log_softmax(logits.t()[present], dim=1)).sum(1).mean()
    return (loss_image + loss_text) / 2, logits


class _BalancedSampler:
    """Box indices drawn uniformly over the ``labels`` present, then uniformly within the label."""

    def __init__(self, bank_labels: torch.Tensor, labels: Sequence[int], generator: torch.Generator):
        self.by_label = {c: torch.nonzero(bank_labels == c).flatten() for c in labels}
        self.present = torch.tensor([c for c in labels if len(self.by_label[c])], dtype=torch.long)
        self.generator = generator

    def __len__(self) -> int:
        return len(self.present)

    def __call__(self, n: int) -> torch.Tensor:
        g = self.generator
        classes = self.present[torch.randint(len(self.present), (n,), generator=g)]
        index = torch.empty(n, dtype=torch.long)
        for c in classes.unique().tolist():
            where = classes == c
            pool = self.by_label[c]
            index[where] = pool[torch.randint(len(pool), (int(where.sum()),), generator=g)]
        return index


def train_teacher(
    bank: CropBank,
    class_names: Sequence[str],
    cfg: TeacherConfig,
    other_names: Sequence[str] = (),
) -> Tuple[CLIP, Dict[str, float]]:
    """Train a teacher on ``bank``'s boxes; returns the eval-mode model and training stats.

    Labels ``0 .. len(class_names) - 1`` are the classes; the ``len(other_names)`` labels after
    them are other objects, which fill ``cfg.other_objects_fraction`` of each batch.
    """
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(cfg.num_threads)
    try:
        return _train(bank, list(class_names), list(other_names), cfg)
    finally:
        torch.set_num_threads(previous_threads)


def _train(bank: CropBank, class_names, other_names, cfg: TeacherConfig):
    torch.manual_seed(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    model = build_teacher_model(cfg).train()
    num_classes = len(class_names)
    names = class_names + other_names
    if cfg.background_name:
        bank = add_background_boxes(bank, len(names), cfg.background_per_image, generator)
        names = names + [cfg.background_name]
    captions = fill_templates(cfg.templates, names)
    tokens = clip.tokenize([c for row in captions for c in row], CONTEXT_LENGTH)
    tokens = tokens.view(len(captions), len(names), -1)
    sampler = _BalancedSampler(bank.labels, range(num_classes), generator)
    others = _BalancedSampler(bank.labels, range(num_classes, num_classes + len(other_names)), generator)
    num_other = int(round(cfg.batch_size * cfg.other_objects_fraction)) if len(others) else 0
    background = torch.nonzero(bank.labels == num_classes + len(other_names)).flatten()
    num_background = int(round(cfg.batch_size * cfg.background_fraction)) if len(background) else 0
    optimizer = _adamw(_param_groups(model, cfg.weight_decay), cfg.lr)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    class_index = torch.arange(num_classes)

    start = time.perf_counter()
    step, loss_avg, acc_avg = 0, None, None
    while step < cfg.steps:
        if cfg.max_seconds is not None and time.perf_counter() - start > cfg.max_seconds:
            logger.info(f"teacher: time budget of {cfg.max_seconds:.0f}s reached at step {step}")
            break
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        index = sampler(cfg.batch_size - num_other - num_background)
        if num_other:
            index = torch.cat([index, others(num_other)])
        if num_background:
            pick = torch.randint(len(background), (num_background,), generator=generator)
            index = torch.cat([index, background[pick]])
        crops = random_crops(
            bank, index, cfg.crop_size, generator, cfg.box_jitter, cfg.context_range, flip=True
        )
        # every class caption, and those of the other concepts in this batch (in-batch
        # negatives, as in CLIP): encoding all 45 distractor names each step costs a third more
        labels = bank.labels[index]
        concepts = torch.unique(torch.cat([class_index, labels]))
        targets = torch.searchsorted(concepts, labels)
        template = torch.randint(len(captions), (len(concepts),), generator=generator)
        loss, logits = contrastive_loss(
            model.encode_image((crops - mean) / std),
            model.encode_text(tokens[template, concepts]),
            targets,
            model.logit_scale.exp(),
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        step += 1

        acc = (logits.argmax(1) == targets).float().mean().item()
        loss_avg = loss.item() if loss_avg is None else 0.9 * loss_avg + 0.1 * loss.item()
        acc_avg = acc if acc_avg is None else 0.9 * acc_avg + 0.1 * acc
        if step % cfg.log_every == 0 or step == cfg.steps:
            logger.info(
                f"teacher: step {step}/{cfg.steps}  loss {loss_avg:.3f}  train acc {acc_avg:.3f}  "
                f"{time.perf_counter() - start:.0f}s"
            )
    seconds = time.perf_counter() - start
    return model.eval(), {"steps": step, "training_seconds": seconds, "train_accuracy": acc_avg}
