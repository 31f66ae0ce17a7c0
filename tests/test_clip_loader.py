import dataclasses
import hashlib
import json
import os
import urllib.error
import urllib.request
import warnings

import clip
import pytest
import torch
from clip.model import CLIP, convert_weights

from vild_d2.teacher import (
    ClipInfo,
    ClipLoadError,
    checkpoint_fingerprint,
    clip_normalize,
    load_clip,
)
from vild_d2.shapes_world.archive import save_openai_archive
from vild_d2.teacher.loader import CLIP_MEAN, CLIP_STD, file_fingerprint

TINY_ARGS = (64, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1)


def _tiny_model(seed=0):
    torch.manual_seed(seed)
    model = CLIP(*TINY_ARGS).float().eval()
    # Random BN statistics, so that a checkpoint that lost them would show.
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


def _fixed_inputs(resolution, n=3):
    g = torch.Generator().manual_seed(123)
    images = torch.randn(n, 3, resolution, resolution, generator=g)
    texts = clip.tokenize(["a photo of a red circle.", "a blue star.", "a yellow square."][:n])
    return images, texts


def _same_outputs(a, b, resolution, atol=0.0):
    images, texts = _fixed_inputs(resolution)
    with torch.no_grad():
        for name, x in (("encode_image", images), ("encode_text", texts)):
            want, got = getattr(a, name)(x), getattr(b, name)(x)
            assert got.dtype == torch.float32
            assert torch.allclose(want, got, rtol=1e-5, atol=atol), name


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A random tiny CLIP written in the teacher's formats: archive, state dicts, teacher folder."""
    root = tmp_path_factory.mktemp("tiny_clip")
    model = _tiny_model()
    paths = {"archive": str(root / "tiny.pt")}
    save_openai_archive(model, paths["archive"])
    paths["state_dict"] = str(root / "tiny_sd.pth")
    torch.save(model.state_dict(), paths["state_dict"])
    paths["wrapped"] = str(root / "tiny_wrapped.pth")
    torch.save({"state_dict": model.state_dict(), "step": 7}, paths["wrapped"])
    teacher = root / "teacher"
    teacher.mkdir()
    paths["teacher"] = str(teacher)
    save_openai_archive(model, str(teacher / "clip_teacher.pt"))
    manifest = {
        "checkpoint": "clip_teacher.pt",
        "fingerprint": file_fingerprint(str(teacher / "clip_teacher.pt")),
        "templates": ["a photo of a {}.", "a {}."],
    }
    (teacher / "manifest.json").write_text(json.dumps(manifest))
    return model, paths


@pytest.fixture(scope="module")
def vit_b32_archive(tmp_path_factory):
    """A random-weight model of ViT-B/32's shape, traced in fp16 the way OpenAI ships archives."""
    torch.manual_seed(0)
    model = CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).eval()
    convert_weights(model)
    reference = CLIP(512, 224, 12, 768, 32, 77, 49408, 512, 8, 12).eval()
    reference.load_state_dict(model.state_dict())  # fp32 copy of the fp16 weights
    del model.context_length, model.vocab_size
    model.register_buffer("input_resolution", torch.tensor(224))
    model.register_buffer("context_length", torch.tensor(77))
    model.register_buffer("vocab_size", torch.tensor(49408))
    images, texts = _fixed_inputs(224, n=1)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(
            model,
            {"forward": (images, texts), "encode_image": images, "encode_text": texts},
            check_trace=False,
        )
    path = str(tmp_path_factory.mktemp("vit_b32") / "ViT-B-32.pt")
    traced.save(path)
    return reference, path


def _check_info(info, source, resolution, embed_dim, templates=None, path=None):
    """``path``: the file loaded (``source`` itself unless a name or folder was given)."""
    assert isinstance(info, ClipInfo)
    assert info.source == source
    with open(path or source, "rb") as f:
        assert info.fingerprint == hashlib.sha256(f.read()).hexdigest()[:16]
    assert info.input_resolution == resolution and info.embed_dim == embed_dim
    assert info.context_length == 77
    assert info.mean == CLIP_MEAN and info.std == CLIP_STD
    assert info.templates == templates


def _check_model(model):
    assert type(model) is CLIP
    assert not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_teacher_format_archive_loads_exactly(tiny):
    reference, paths = tiny
    model, info = load_clip(paths["archive"])
    _check_model(model)
    _check_info(info, paths["archive"], 64, 64)
    _same_outputs(reference, model, 64)
    with pytest.raises(dataclasses.FrozenInstanceError):
        info.fingerprint = "0"


@pytest.mark.parametrize("kind", ["state_dict", "wrapped"])
def test_state_dict_files_load_exactly(tiny, kind):
    reference, paths = tiny
    model, info = load_clip(paths[kind])
    _check_model(model)
    _check_info(info, paths[kind], 64, 64)
    _same_outputs(reference, model, 64)


def test_teacher_folder_and_checkpoint_carry_templates(tiny):
    reference, paths = tiny
    checkpoint = os.path.join(paths["teacher"], "clip_teacher.pt")
    for spec in (paths["teacher"], checkpoint):
        model, info = load_clip(spec)
        _check_info(info, checkpoint, 64, 64, templates=("a photo of a {}.", "a {}."))
        assert checkpoint_fingerprint(spec) == info.fingerprint
        _same_outputs(reference, model, 64)


def test_real_vit_b32_shape_archive(vit_b32_archive):
    reference, path = vit_b32_archive
    model, info = load_clip(path)
    _check_model(model)
    _check_info(info, path, 224, 512)
    images, _ = _fixed_inputs(224, n=2)
    with torch.no_grad():
        assert torch.allclose(model.encode_image(images), reference.encode_image(images), atol=1e-5)


def test_model_name_resolves_in_cache_without_network(tiny, tmp_path, monkeypatch):
    _, paths = tiny
    with open(paths["archive"], "rb") as f:
        data = f.read()
    sha = hashlib.sha256(data).hexdigest()
    (tmp_path / "RN50.pt").write_bytes(data)
    monkeypatch.setenv("VILD_CLIP_CACHE", str(tmp_path))
    monkeypatch.setitem(clip.clip._MODELS, "RN50", f"https://example.invalid/{sha}/RN50.pt")
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    model, info = load_clip("RN50")
    _check_model(model)
    _check_info(info, "RN50", 64, 64, path=str(tmp_path / "RN50.pt"))
    assert info.fingerprint == sha[:16] == checkpoint_fingerprint("RN50")


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("no network")


def test_missing_model_name_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("VILD_CLIP_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(ClipLoadError) as e:
        load_clip("ViT-B/32")
    message = str(e.value)
    assert "\n" not in message
    assert os.path.join(str(tmp_path / "cache"), "ViT-B-32.pt") in message
    assert "VILD_CLIP_CACHE" in message and "no network" in message
    # The fingerprint of a name is known without the file: OpenAI's URL carries its sha256.
    assert checkpoint_fingerprint("ViT-B/32") == "40d365715913c9da"


def test_errors_are_one_line_and_name_the_path(tmp_path):
    text_file = tmp_path / "notes.txt"
    text_file.write_text("not a checkpoint\n")
    other = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3)}, str(other))
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(1)], str(listed))
    empty_dir = tmp_path / "empty"
    empty_dir.mkdir()
    cases = {
        str(tmp_path / "missing.pt"): "not found",
        "ViT-Z/99": "not found",
        str(text_file): "neither a TorchScript archive nor a state-dict",
        str(other): "not a CLIP checkpoint",
        str(listed): "not a state dict",
        str(empty_dir): "manifest.json",
    }
    for spec, expected in cases.items():
        with pytest.raises(ClipLoadError) as e:
            load_clip(spec)
        if expected in ("not found", "manifest.json"):
            with pytest.raises(ClipLoadError):
                checkpoint_fingerprint(spec)
        message = str(e.value)
        assert isinstance(e.value, ValueError)
        assert "\n" not in message and spec in message and expected in message, message


def test_clip_normalize(tiny):
    _, paths = tiny
    _, info = load_clip(paths["archive"])
    images = torch.rand(2, 3, 8, 8)
    out = clip_normalize(images, info)
    mean = torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1)
    assert torch.allclose(out, (images - mean) / std)
    with pytest.raises(ValueError):
        clip_normalize(torch.rand(3, 8, 8), info)
    with pytest.raises(ValueError):
        clip_normalize(torch.zeros(1, 3, 8, 8, dtype=torch.uint8), info)
