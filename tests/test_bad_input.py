"""Bad input and damaged files, with real files (truncated, corrupt, missing): each ends in one line
that names the file or value and the fix, a non-zero exit, and nothing already written lost."""
import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from vild_d2.checkpoint import checkpoint_damage
from vild_d2.distill.embedding_cache import CacheEntry, CacheError, EmbeddingCache, write_cache
from vild_d2.shapes_world.generator import WorldConfig, ensure_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
VILD_TEXT = os.path.join(ROOT, "configs", "shapes_ovd", "vild_text.yaml")
DIM = 32


def _tool(name, *args, cwd, env=None):
    return subprocess.run([sys.executable, os.path.join(TOOLS, name), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _one_error_line(proc, *words):
    """The run failed with status 2 and one line (besides warnings) on stderr holding ``words``."""
    lines = [line for line in proc.stderr.strip().splitlines()  # torch's and Python's warnings aside
             if line.strip() and "warn" not in line.lower() and not line.startswith(" ")
             and not re.match(r"[WI]\d{4} ", line)]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("bad_input")
    root = str(base / "datasets")
    ensure_world(os.path.join(root, "shapes_ovd"), WorldConfig(seed=5, num_trainval=6, num_test=2, num_teacher=0,
                                                               num_teacher_val=0, image_size=96),
                 progress=False, workers=1)
    names = [f"{c} {s}" for c in ("red", "green", "blue", "yellow") for s in ("circle", "square", "triangle", "star")]
    rng = np.random.default_rng(0)
    np.save(base / "text.npy", rng.normal(size=(len(names), DIM)).astype(np.float32))
    (base / "text.json").write_text(json.dumps({"names": names}))
    return base


def _opts(world, *extra):
    return ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.VILD.EMBED_DIM", str(DIM),
            "MODEL.VILD.PROMPT_TEMPLATES", "['vild']",
            "MODEL.VILD.TEXT_EMBEDDINGS_PATH", str(world / "text.npy"), "INPUT.MIN_SIZE_TRAIN", "(96,)",
            "INPUT.MAX_SIZE_TRAIN", "96", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
            "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.MAX_ITER", "4",
            "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()",
            "SEED", "0", *extra]


def _train(world, out, *extra, args=(), root=None):
    env = dict(os.environ, DETECTRON2_DATASETS=str(root or world / "datasets"))
    return _tool("train_net.py", "--config-file", VILD_TEXT, "--threads", "1", *args,
                 *_opts(world, "OUTPUT_DIR", str(out), *extra), cwd=str(world), env=env)


def _copy_world(world, tmp_path):
    root = tmp_path / "datasets"
    shutil.copytree(world / "datasets", root)
    return root, root / "shapes_ovd"


# ---------------------------------------------------------------- the embedding cache


def _cache(path, rows=3):
    entries = [(f"img{i}", CacheEntry(np.ones((rows, 4), np.float32) * [0, 0, 5, 5], np.ones(rows),
                                      np.ones((rows, DIM), np.float16))) for i in range(4)]
    write_cache(str(path), entries, {"embed_dim": DIM}, embed_dim=DIM, num_rows=4 * rows)
    return path


def test_a_truncated_cache_is_refused_naming_the_file(tmp_path):
    cache = _cache(tmp_path / "cache")
    EmbeddingCache(str(cache))  # sound
    os.truncate(cache / "embeddings.npy", 50)
    with pytest.raises(CacheError, match=r"embeddings\.npy has 50 bytes where \d+ were written.*rebuilds it"):
        EmbeddingCache(str(cache))


def test_a_damaged_cache_is_not_taken_for_complete(tmp_path):
    from vild_d2.distill.cache_writer import CacheWriter

    cache = _cache(tmp_path / "cache")
    manifest = json.loads((cache / "manifest.json").read_text())
    key = {"embed_dim": DIM}
    assert CacheWriter(str(cache), key).is_complete()
    data = bytearray((cache / "boxes.npy").read_bytes())
    data[-1] ^= 0xFF  # same size, other bytes
    (cache / "boxes.npy").write_bytes(bytes(data))
    assert not CacheWriter(str(cache), key).is_complete()
    assert not (cache / "manifest.json").exists()  # no longer marked finished for anyone
    assert manifest["files"]["boxes.npy"]["bytes"] == len(data)


# ---------------------------------------------------------------- datasets


def test_check_dataset_lists_every_problem_with_its_file(world, tmp_path):
    root, tree = _copy_world(world, tmp_path)
    (tree / "JPEGImages" / "trainval_000001.jpg").write_bytes(b"not a jpeg")
    os.remove(tree / "JPEGImages" / "trainval_000002.jpg")
    env = dict(os.environ, DETECTRON2_DATASETS=str(root))
    proc = _tool("check_dataset.py", "--config-file", VILD_TEXT, cwd=str(tmp_path), env=env)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"{tree}/JPEGImages/trainval_000001.jpg: does not decode" in proc.stdout
    assert f"{tree}/JPEGImages/trainval_000002.jpg: missing" in proc.stdout
    assert "8 images of shapes_ovd_trainval_base, shapes_ovd_test: 2 problem(s)" in proc.stdout
    sound = _tool("check_dataset.py", "--config-file", VILD_TEXT, cwd=str(tmp_path),
                  env=dict(os.environ, DETECTRON2_DATASETS=str(world / "datasets")))
    assert sound.returncode == 0 and "0 problem(s), all good" in sound.stdout


def test_training_stops_at_start_up_on_a_missing_image(world, tmp_path):
    root, tree = _copy_world(world, tmp_path)
    os.remove(tree / "JPEGImages" / "trainval_000003.jpg")
    proc = _train(world, tmp_path / "out", root=root)
    _one_error_line(proc, "1 of the 6 images", "trainval_000003.jpg", "are missing")
    assert not (tmp_path / "out" / "model_final.pth").exists()


def test_a_corrupt_image_stops_training_or_is_skipped(world, tmp_path):
    root, tree = _copy_world(world, tmp_path)
    (tree / "JPEGImages" / "trainval_000004.jpg").write_text("a text file")
    _one_error_line(_train(world, tmp_path / "stop", root=root), "trainval_000004.jpg", "does not decode",
                    "DATALOADER.BAD_IMAGES skip")
    skipped = _train(world, tmp_path / "skip", "DATALOADER.BAD_IMAGES", "skip", root=root)
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    assert "trainval_000004.jpg does not decode" in skipped.stdout + skipped.stderr
    assert torch.load(tmp_path / "skip" / "model_final.pth", weights_only=False)["iteration"] == 3


def test_an_unknown_class_names_its_annotation_file(world, tmp_path):
    root, tree = _copy_world(world, tmp_path)
    xml = tree / "Annotations" / "trainval_000005.xml"
    text = xml.read_text()
    first = text.split("<name>")[1].split("</name>")[0]
    xml.write_text(text.replace(f"<name>{first}</name>", "<name>purple circle</name>", 1))
    _one_error_line(_train(world, tmp_path / "out", root=root), str(xml), "'purple circle'")


# ---------------------------------------------------------------- checkpoints


def test_resume_falls_back_to_the_newest_sound_checkpoint(world, tmp_path):
    out = tmp_path / "out"
    assert _train(world, out).returncode == 0
    final = out / "model_final.pth"
    sound = final.read_bytes()
    os.truncate(final, 1000)  # a final model cut short
    proc = _train(world, out, args=["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = proc.stdout + proc.stderr
    assert f"checkpoint {final} has 1000 bytes" in log and "skipped" in log
    # not taken for a finished training: written again, from the last iteration's checkpoint
    assert f"writing {final} again" in log
    assert checkpoint_damage(str(final)) is None and len(sound) > 1000
    assert torch.load(final, weights_only=False)["iteration"] == 3


def test_evaluating_a_truncated_checkpoint_is_one_line(world, tmp_path):
    out = tmp_path / "out"
    assert _train(world, out).returncode == 0
    os.truncate(out / "model_final.pth", 5000)
    proc = _train(world, tmp_path / "eval", "MODEL.WEIGHTS", str(out / "model_final.pth"),
                  "DATASETS.TEST", "('shapes_ovd_test',)", args=["--eval-only"])
    _one_error_line(proc, str(out / "model_final.pth"), "has 5000 bytes", "MODEL.WEIGHTS")


# ---------------------------------------------------------------- demo.py


@pytest.fixture(scope="module")
def models(world, tmp_path_factory):
    """A 4-iteration ViLD-text model, and a stage-1 detector's checkpoint (no text head)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from vild_d2.engine import load_cfg

    out = tmp_path_factory.mktemp("models")
    assert _train(world, out / "vild").returncode == 0
    stage1 = load_cfg(os.path.join(ROOT, "configs", "shapes_ovd", "stage1_proposals.yaml"),
                      ["MODEL.DEVICE", "cpu"])
    (out / "stage1").mkdir()
    DetectionCheckpointer(build_model(stage1), save_dir=str(out / "stage1")).save("model_final")
    return out / "vild" / "model_final.pth", out / "stage1" / "model_final.pth"


@pytest.mark.parametrize("case", ["no vocabulary file", "empty folder", "stage-1 weights", "not an image",
                                  "unknown novel", "long name"])
def test_demo_refuses_bad_input_in_one_line(world, models, tmp_path, case):
    vild, stage1 = models
    images = str(world / "datasets" / "shapes_ovd" / "JPEGImages")
    args = {"vocabulary": "red circle,blue star", "input": images, "weights": str(vild), "novel": ""}
    want = []
    if case == "no vocabulary file":
        args["vocabulary"] = str(tmp_path / "classes.txt")
        want = [str(tmp_path / "classes.txt"), "does not exist"]
    elif case == "empty folder":
        (tmp_path / "empty").mkdir()
        args["input"] = str(tmp_path / "empty")
        want = [str(tmp_path / "empty"), "holds no"]
    elif case == "stage-1 weights":
        args["weights"] = str(stage1)
        want = [str(stage1), "no ViLD text head"]
    elif case == "not an image":
        (tmp_path / "notes.jpg").write_text("hello")
        args["input"] = str(tmp_path / "notes.jpg")
        want = [str(tmp_path / "notes.jpg"), "not an image"]
    elif case == "unknown novel":
        args["novel"] = "green star"
        want = ["green star", "not in the vocabulary"]
    else:
        args["vocabulary"] = "red " + "very " * 80 + "circle"
        want = ["longer than CLIP's 77 tokens"]
    cmd = ["--config-file", VILD_TEXT, "--weights", args["weights"], "--input", args["input"],
           "--output", str(tmp_path / "pictures"), "--vocabulary", args["vocabulary"], "--max-images", "1",
           *(["--novel", args["novel"]] if args["novel"] else []),
           "MODEL.VILD.EMBED_DIM", str(DIM), "MODEL.VILD.PROMPT_TEMPLATES", "['a photo of a {}.']",
           "MODEL.VILD.CLIP_MODEL", str(world / "clip.pth"),
           "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"]
    _tiny_clip(world / "clip.pth")  # the prompts go through a CLIP text encoder
    env = dict(os.environ, DETECTRON2_DATASETS=str(world / "datasets"))
    _one_error_line(_tool("demo.py", *cmd, cwd=str(tmp_path), env=env), *want)
    assert not (tmp_path / "pictures").exists()  # nothing written


def _tiny_clip(path):
    from clip.model import CLIP

    if not path.exists():
        torch.manual_seed(0)
        torch.save(CLIP(DIM, 32, (1, 1, 1, 1), 16, None, 77, 49408, 64, 1, 1).state_dict(), path)
