"""Prompt ensembles: the official set and its rules on hand-written cases, how a config value
resolves, and the embeddings they give through a small random CLIP."""
import os
import subprocess
import sys

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP

from vild_d2.teacher.templates import PromptEnsemble, clean_name, prompt_set, resolve_prompts
from vild_d2.teacher.text_embeddings import encode_class_names, text_embeddings_for

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_official_set_and_its_rules_by_hand():
    vild = prompt_set("vild")
    assert len(vild.templates) == 63 and vild.this_is
    assert vild.templates[0] == "There is {article} {} in the scene."
    ensemble = PromptEnsemble(("There is {article} {} in the scene.", "a photo of {article} {}.",
                               "the toy {}.", "itap of my {}."), this_is=True)
    # "_" reads as a space, the article follows the name, "This is" goes before "a" and "the"
    assert ensemble.prompts("aerosol_can") == [
        "There is an aerosol can in the scene.", "This is a photo of an aerosol can.",
        "This is the toy aerosol can.", "itap of my aerosol can."]
    assert ensemble.prompts("bow/arrow")[1] == "This is a photo of a bow or arrow."
    assert clean_name("Tennis_Ball.") == "tennis ball"
    plain = PromptEnsemble(("a photo of a {}.",))  # templates of one's own are read as written
    assert plain.prompts("egg") == ["a photo of a egg."]


def test_a_config_value_names_a_set_or_lists_templates():
    assert resolve_prompts(["vild"]) == prompt_set("vild")
    assert resolve_prompts([]) == prompt_set("vild")  # a checkpoint without templates of its own
    assert resolve_prompts([], ["a {}."]) == PromptEnsemble(("a {}.",))  # the teacher's own
    assert resolve_prompts(["a {}.", "the {}!"]) == PromptEnsemble(("a {}.", "the {}!"))
    with pytest.raises(ValueError, match="no prompt set 'clip80'.*vild"):
        resolve_prompts(["clip80"])
    with pytest.raises(ValueError, match="exactly one"):
        resolve_prompts(["a {} {}.", "b {}"])


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("clip") / "tiny.pth"
    torch.save(CLIP(32, 32, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 1).state_dict(), path)
    return str(path)


def _direct(model, texts):
    """The ensemble of ``texts``, straight through the text tower."""
    with torch.no_grad():
        emb = F.normalize(model.encode_text(clip.tokenize(texts)).float(), dim=-1)
    return F.normalize(emb.mean(0), dim=-1).numpy()


def test_embeddings_are_the_ensemble_of_the_rules_prompts_and_synonyms(tiny_clip, tmp_path):
    from vild_d2.teacher import load_clip

    model, _ = load_clip(tiny_clip)
    templates = prompt_set("vild").templates
    emb = text_embeddings_for(tiny_clip, ["egg", "bow_(weapon)"], ["vild"], cache_dir=str(tmp_path),
                              synonyms=[["egg"], ["bow_(weapon)", "longbow"]])
    texts = [t.format("egg", article="an") for t in templates]
    texts = [f"This is {t}" if t.startswith(("a", "the")) else t for t in texts]
    np.testing.assert_allclose(emb[0], _direct(model, texts), atol=1e-6)
    bow = [p for w in ("bow (weapon)", "longbow") for p in prompt_set("vild").prompts(w)]
    assert len(bow) == 126 and bow[0] == "There is a bow (weapon) in the scene."
    np.testing.assert_allclose(emb[1], _direct(model, bow), atol=1e-6)
    alone = encode_class_names(model, ["bow_(weapon)"], prompt_set("vild")).numpy()
    assert not np.allclose(alone[0], emb[1], atol=1e-3)  # the synonym counts


def test_the_tool_writes_what_training_computes(tiny_clip, tmp_path):
    out = tmp_path / "emb.npy"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "compute_text_embeddings.py"),
                           "--clip-model", tiny_clip, "--names", "egg,tennis_ball,kite", "--output", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    trained = text_embeddings_for(tiny_clip, ["kite", "egg"], ["vild"], cache_dir=str(tmp_path / "cache"))
    from_file = text_embeddings_for(tiny_clip, ["kite", "egg"], ["vild"], precomputed_path=str(out))
    np.testing.assert_allclose(from_file, trained, atol=1e-6)
    # a file made with other prompts than the config's is refused
    with pytest.raises(ValueError, match="other prompts"):
        text_embeddings_for(tiny_clip, ["kite"], ["a photo of a {}."], precomputed_path=str(out))
    with pytest.raises(ValueError, match="synonyms"):
        text_embeddings_for(tiny_clip, ["kite"], ["vild"], precomputed_path=str(out), synonyms=[["kite"]])
