"""Writing a ``clip.model.CLIP`` as a TorchScript archive in the format OpenAI ships.

OpenAI's archives are traced modules with ``forward``, ``encode_image`` and ``encode_text`` and
three scalar buffers (``input_resolution``, ``context_length``, ``vocab_size``) that
``clip.load(..., jit=True)`` reads; ``clip.load(..., jit=False)`` rebuilds the model from the
archive's state dict, from which ``build_model`` drops those buffers.
"""

import copy
import warnings

import clip
import torch
from clip.model import CLIP

from ..utils import atomic_write

__all__ = ["save_openai_archive"]


def _with_archive_buffers(model: CLIP) -> torch.nn.Module:
    export = copy.deepcopy(model).float().eval().cpu()
    context_length, vocab_size = export.context_length, export.vocab_size
    # Plain int attributes on CLIP; the archive carries them as buffers instead.
    del export.context_length, export.vocab_size
    export.register_buffer("input_resolution", torch.tensor(int(model.visual.input_resolution)))
    export.register_buffer("context_length", torch.tensor(int(context_length)))
    export.register_buffer("vocab_size", torch.tensor(int(vocab_size)))
    return export


def _examples(model: CLIP, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    res = int(model.visual.input_resolution)
    images = torch.randn(batch, 3, res, res, generator=g)
    texts = clip.tokenize([f"a photo of {i} things." for i in range(batch)])
    return images, texts


def save_openai_archive(model: CLIP, path: str) -> None:
    """Trace ``model`` and write it to ``path`` (atomically), checked by reloading it."""
    export = _with_archive_buffers(model)
    images, texts = _examples(model, 2, seed=0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace_module(
            export,
            {"forward": (images, texts), "encode_image": (images,), "encode_text": (texts,)},
            check_trace=False,
        )
    with atomic_write(path, "wb") as f, torch.no_grad():
        torch.jit.save(traced, f)
        f.flush()
        # A different batch size catches shapes frozen into the trace.
        reloaded = torch.jit.load(f.name, map_location="cpu")
        images, texts = _examples(model, 3, seed=1)
        for name, x in (("encode_image", images), ("encode_text", texts)):
            want, got = getattr(export, name)(x), getattr(reloaded, name)(x)
            if not torch.allclose(want, got, rtol=1e-4, atol=1e-5):
                raise RuntimeError(f"traced {name} differs from the model; cannot export")
