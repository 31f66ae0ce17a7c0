"""bfloat16 mixed precision for training on the CPU.

detectron2's SOLVER.AMP (AMPTrainer) is CUDA-only. On a CPU with bfloat16 units (AVX512-BF16,
AMX) convolutions and matrix products run several times faster in bfloat16; bfloat16 keeps
float32's exponent range, so unlike fp16 no gradient scaling is needed.
"""
import torch
from torch import nn


class TrainingAutocast(nn.Module):
    """Runs ``module``'s training forward (losses included) under CPU bfloat16 autocast; its
    inference forward stays in float32. The backward pass follows the forward's dtypes."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.training):
            return self.module(*args, **kwargs)
