"""The CLIP image encoder's arithmetic when caching embeddings and for CLIP on crops."""
import torch
from clip.model import convert_weights

__all__ = ["PRECISIONS", "cast_for_precision", "resolve_precision"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device) -> str:
    """The CLIP encoder's arithmetic: "auto" is fp16 on CUDA, bf16 on a CPU with bfloat16 units
    (AVX512-BF16 or AMX) and fp32 on other CPUs."""
    device = torch.device(device)
    if precision not in PRECISIONS:
        raise ValueError(f"precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return "fp16"
        cpu_bf16 = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return "bf16" if device.type == "cpu" and cpu_bf16 else "fp32"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError(f"precision fp16 needs a CUDA device, not {device}; use bf16 or fp32")
    return precision


def _matmul_weights_to_bfloat16(visual: torch.nn.Module) -> None:
    """The weights of a CLIP image tower that bfloat16 autocast casts on every call, cast once:
    those of convolutions, linear layers, attention's input projections and the output projection
    ``proj``. Everything else (norms, embeddings) stays float32, so under autocast the results are
    the same, bit for bit. The first convolution stays float32 too: CLIP takes its dtype for the
    model's (``CLIP.dtype``), which the text tower reads."""
    for m in visual.modules():
        if m is visual.conv1:
            continue
        names = []
        if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
            names = ["weight", "bias"]
        elif isinstance(m, torch.nn.MultiheadAttention):
            names = ["in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                     "in_proj_bias"]
        for name in names + ["proj"]:
            p = getattr(m, name, None)
            if isinstance(p, torch.Tensor):
                p.data = p.data.bfloat16()


def cast_for_precision(model, precision: str):
    """``model`` in float32; for fp16 the way CLIP's own loader makes it (convolutions, linear
    layers, attention and projections in float16, layer and batch norms in float32: CLIP's
    LayerNorm computes in float32 and needs float32 weights); for bf16, which runs under autocast,
    the image tower's weights that autocast casts are cast once here (ViT-B/32 encodes 7-17%
    faster on a CPU, where casting its 88M weights took that long on every batch)."""
    model = model.float()
    if precision == "fp16":
        convert_weights(model)
    elif precision == "bf16":
        _matmul_weights_to_bfloat16(model.visual)
    return model
