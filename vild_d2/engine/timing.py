"""The model's own time per image during an evaluation, without data loading or the evaluator."""
import time

import torch
from torch import nn


class ModelTimer(nn.Module):
    """Wraps a model for ``inference_on_dataset`` and times each call (CUDA synchronised); as
    detectron2 does for its log line, the first ``warmup`` calls are left out of the mean."""

    def __init__(self, model: nn.Module, warmup: int = 5):
        super().__init__()
        self.model = model
        self.warmup = warmup
        self.calls = []  # (seconds, images) per call

    def forward(self, batched_inputs):
        start = time.perf_counter()
        outputs = self.model(batched_inputs)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.calls.append((time.perf_counter() - start, len(batched_inputs)))
        return outputs

    def seconds_per_image(self) -> float:
        timed = self.calls[min(self.warmup, len(self.calls) - 1):]
        images = sum(n for _, n in timed)
        return sum(s for s, _ in timed) / images if images else float("nan")
