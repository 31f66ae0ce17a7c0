import json
import os
import subprocess
import sys

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

from vild_d2.teacher.text_embeddings import load_precomputed, text_embeddings_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    model = CLIP(32, 32, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 1)
    path = tmp_path_factory.mktemp("clip") / "tiny.pt"
    torch.save(model.state_dict(), path)
    return str(path)


def test_prompt_ensemble_is_cached_and_unit_norm(tiny_clip, tmp_path, monkeypatch):
    from vild_d2.teacher import loader

    names = ["red circle", "blue star"]
    templates = ["a photo of a {}.", "a {}."]
    a = text_embeddings_for(tiny_clip, names, templates, cache_dir=str(tmp_path))
    assert a.shape == (2, 32)
    # the ensemble: each template's embedding normalised, averaged over templates, renormalised
    model, _ = loader.load_clip(tiny_clip)
    with torch.no_grad():
        per_template = torch.stack([F.normalize(model.encode_text(clip.tokenize([t.format(n) for n in names])).float(),
                                                dim=-1) for t in templates])
    np.testing.assert_allclose(a, F.normalize(per_template.mean(0), dim=-1).numpy(), atol=1e-6)
    files = sorted(os.listdir(tmp_path))
    assert len(files) == 2 and files[0].endswith(".json") and files[1].endswith(".npy")
    # the second call reads the cache: no model is loaded
    monkeypatch.setattr(loader, "load_clip", lambda *a, **k: pytest.fail("the cache was not used"))
    b = text_embeddings_for(tiny_clip, names, templates, cache_dir=str(tmp_path))
    np.testing.assert_array_equal(a, b)
    monkeypatch.undo()
    single = text_embeddings_for(tiny_clip, names, ["a photo of a {}."], cache_dir=str(tmp_path))
    assert not np.allclose(a, single)  # another template set, another cache entry
    assert len(os.listdir(tmp_path)) == 4


def test_tool_writes_a_file_looked_up_by_name(tiny_clip, tmp_path):
    out = str(tmp_path / "emb.npy")
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compute_text_embeddings.py"),
                           "--clip-model", tiny_clip, "--names", "apple,kiwi,pear", "--output", out],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    full = np.load(out)
    assert json.load(open(out[:-4] + ".json"))["names"] == ["apple", "kiwi", "pear"]
    sub = load_precomputed(out, ["pear", "apple"])
    np.testing.assert_allclose(sub, full[[2, 0]], rtol=1e-5)
    with pytest.raises(ValueError, match="lacks classes \\['plum'\\]"):
        load_precomputed(out, ["plum"])
