import importlib.util
import json
import os
import shutil
import time
from dataclasses import replace

import clip
import pytest
import torch
from clip.model import CLIP

from vild_d2.shapes_world import TeacherConfig, TeacherError, ensure_teacher, evaluate_teacher
from vild_d2.shapes_world.teacher import read_teacher_manifest
from vild_d2.shapes_world import DEFAULT_TEMPLATES
from vild_d2.teacher import load_clip
from vild_d2.shapes_world import generator as shapes_world
from vild_d2.shapes_world import teacher as ensure_module
from vild_d2.shapes_world.teacher_crops import (
    add_background_boxes,
    add_unannotated_objects,
    fixed_crops,
    load_crop_bank,
    random_crops,
)
from vild_d2.shapes_world.teacher_training import contrastive_loss


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = TeacherConfig(
    steps=200,
    batch_size=96,
    crop_size=32,
    embed_dim=64,
    vision_width=16,
    text_width=64,
    text_layers=1,
    warmup_steps=10,
    log_every=100,
    other_objects_fraction=0.25,
)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("world") / "shapes_ovd")
    cfg = shapes_world.WorldConfig(
        num_trainval=2, num_test=2, num_teacher=300, num_teacher_val=60, image_size=96
    )
    return shapes_world.ensure_world(root, cfg, progress=False, workers=1)


@pytest.fixture(scope="module")
def teacher(world, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher"))
    start = time.perf_counter()
    manifest = ensure_teacher(world, out, SMALL)
    return out, manifest, time.perf_counter() - start


def test_config_round_trips_through_json():
    cfg = TeacherConfig()
    again = TeacherConfig(**json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and again.cache_key() == cfg.cache_key()
    assert cfg.architecture()["transformer_heads"] == cfg.text_width // 64
    for bad in (dict(crop_size=48), dict(text_width=96), dict(templates=("no slot",))):
        with pytest.raises(ValueError):
            TeacherConfig(**bad)


def test_default_templates():
    assert "a photo of a {}." in DEFAULT_TEMPLATES
    assert 5 <= len(DEFAULT_TEMPLATES) <= 10
    assert all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def test_crops_and_loss(world):
    split = shapes_world.make_split()
    bank = load_crop_bank(world, "teacher", split.classes)
    assert bank.images.dtype == torch.uint8 and len(bank) == len(bank.labels) > 100
    g = torch.Generator().manual_seed(0)
    crops = random_crops(bank, torch.arange(8), 32, g)
    assert crops.shape == (8, 3, 32, 32) and 0 <= crops.min() and crops.max() <= 1
    one = fixed_crops(bank, 32, 1.0, torch.arange(4))
    assert one.shape == (4, 3, 32, 32)

    labels = torch.tensor([0, 0, 1, 2])
    text = torch.eye(3, 8)
    perfect = torch.eye(3, 8)[labels]
    wrong = torch.eye(3, 8)[(labels + 1) % 3]
    scale = torch.tensor(50.0)
    good, logits = contrastive_loss(perfect, text, labels, scale)
    bad, _ = contrastive_loss(wrong, text, labels, scale)
    assert logits.shape == (4, 3) and good < 0.8 < bad  # two same-class crops are not negatives


def test_background_boxes_avoid_every_annotated_box(world):
    from torchvision.ops import box_iou

    split = shapes_world.make_split()
    bank = load_crop_bank(world, "teacher", split.classes)
    g = torch.Generator().manual_seed(0)
    grown = add_background_boxes(bank, label=16, per_image=3, generator=g, max_iou=0.3)
    n = len(bank)
    assert torch.equal(grown.boxes[:n], bank.boxes) and torch.equal(grown.labels[:n], bank.labels)
    extra = grown.boxes[n:]
    assert 0 < len(extra) <= 3 * len(bank.images) and (grown.labels[n:] == 16).all()
    for i in grown.image_index[n:].unique().tolist():
        mine = extra[grown.image_index[n:] == i]
        gt = bank.boxes[bank.image_index == i]
        assert (box_iou(mine, gt).max(dim=1).values <= 0.3).all()
        h, w = bank.image_sizes[i].tolist()
        assert (mine[:, :2] >= 0).all() and (mine[:, 2] <= w + 1e-3).all() and (mine[:, 3] <= h + 1e-3).all()


def test_unannotated_objects_join_the_bank_under_their_own_names(world):
    from vild_d2.shapes_world.render import DISTRACTOR_SHAPES

    split = shapes_world.make_split()
    bank = load_crop_bank(world, "teacher", split.classes)
    grown, names = add_unannotated_objects(bank, world, "teacher", first_label=16)
    n = len(bank)
    assert torch.equal(grown.boxes[:n], bank.boxes) and torch.equal(grown.labels[:n], bank.labels)
    assert grown.image_ids == bank.image_ids and len(bank.image_ids) == len(bank.images)
    assert names == sorted(set(names)) and not set(names) & set(split.classes)
    assert all(name.split()[1] in DISTRACTOR_SHAPES for name in names)
    assert ((grown.labels[n:] >= 16) & (grown.labels[n:] < 16 + len(names))).all()
    # exactly the objects of no class that the generator drew in these images
    world_cfg = shapes_world.WorldConfig(**shapes_world.read_manifest(world)["config"])
    expected = 0
    for i, iid in enumerate(bank.image_ids[:20]):
        _, objects = shapes_world.render_image(world_cfg, "teacher", shapes_world.image_index(iid))
        others = [o for o in objects if o.class_name is None]
        mine = grown.image_index[n:] == i
        assert sorted(names[int(k) - 16] for k in grown.labels[n:][mine]) == sorted(o.name for o in others)
        expected += len(others)
    assert expected > 0
    h, w = bank.image_sizes[0].tolist()
    extra = grown.boxes[n:]
    assert (extra[:, :2] >= 0).all() and (extra[:, 2] <= w).all() and (extra[:, 3] <= h).all()
    assert (extra[:, 2:] > extra[:, :2]).all()


def test_other_objects_are_keyed_and_validated():
    assert TeacherConfig().other_objects_fraction == 0.0  # the classes only, unless asked
    assert SMALL.cache_key()["other_objects_fraction"] == 0.25
    assert replace(SMALL, other_objects_fraction=0.0).cache_key() != SMALL.cache_key()
    with pytest.raises(ValueError, match="other_objects_fraction"):
        replace(SMALL, other_objects_fraction=1.0)
    with pytest.raises(ValueError, match="lower one of them"):
        replace(SMALL, background_name="background", background_fraction=0.5, other_objects_fraction=0.5)


def test_background_concept_trains_and_keys_the_cache(world):
    from vild_d2.shapes_world.teacher_training import train_teacher

    split = shapes_world.make_split()
    bank = load_crop_bank(world, "teacher", split.classes)
    cfg = replace(SMALL, steps=3, batch_size=16, background_name="background", background_fraction=0.25)
    bank, others = add_unannotated_objects(bank, world, "teacher", len(split.classes))
    model, stats = train_teacher(bank, split.classes, cfg, others)
    assert stats["steps"] == 3
    assert cfg.cache_key()["background_name"] == "background"
    assert "background_fraction" not in SMALL.cache_key()  # off: old teachers stay valid
    with pytest.raises(ValueError, match="background_fraction"):
        replace(SMALL, background_fraction=1.0)


def test_teacher_trains_and_manifest(teacher, world):
    out, manifest, _ = teacher
    assert manifest["steps"] == SMALL.steps
    # Chance is 1/16; a couple of hundred steps of a tiny model get far above it.
    assert manifest["heldout_accuracy_all"] > 0.25
    # the manifest's scores are those of the checkpoint on disk
    held_out = evaluate_teacher(load_clip(out)[0], world, DEFAULT_TEMPLATES)[1.0]
    assert held_out["all"] == pytest.approx(manifest["heldout_accuracy_all"], abs=1e-6)
    assert held_out["novel"] == pytest.approx(manifest["heldout_accuracy_novel"], abs=1e-6)
    assert manifest["input_resolution"] == 32 and manifest["embed_dim"] == 64
    assert manifest["templates"] == list(DEFAULT_TEMPLATES)
    assert len(manifest["classes"]) == 16 and len(manifest["novel_classes"]) == 4
    # the world's distractors, learnt under their own names beside the classes
    assert manifest["num_other_boxes"] > 0 and len(manifest["other_concepts"]) > 5
    assert not set(manifest["other_concepts"]) & set(manifest["classes"])
    nearest = manifest["nearest_class_cosine"]
    assert -1.0 <= nearest["other_objects"] < nearest["class_objects"] <= 1.0
    assert manifest["architecture"]["transformer_heads"] == 1
    for key in ("seed", "training_seconds", "world", "config", "fingerprint"):
        assert key in manifest
    assert read_teacher_manifest(out) == manifest


@pytest.mark.filterwarnings("ignore::FutureWarning")  # clip.load calls torch.jit
def test_teacher_loads_everywhere(teacher):
    out, manifest, _ = teacher
    checkpoint = os.path.join(out, "clip_teacher.pt")
    model, info = load_clip(out)
    assert type(model) is CLIP and not model.training
    assert info.fingerprint == manifest["fingerprint"]
    assert info.templates == tuple(DEFAULT_TEMPLATES)
    assert info.input_resolution == 32 and info.embed_dim == 64

    g = torch.Generator().manual_seed(0)
    images = torch.randn(3, 3, 32, 32, generator=g)
    texts = clip.tokenize(["a photo of a red circle.", "a blue star.", "a {}."])
    with torch.no_grad():
        want_image, want_text = model.encode_image(images), model.encode_text(texts)
        for jit in (False, True):
            loaded, preprocess = clip.load(checkpoint, device="cpu", jit=jit)
            assert preprocess.transforms[0].size == 32 and preprocess.transforms[1].size == (32, 32)
            # jit=False rebuilds through OpenAI's fp16 conversion, hence the tolerance.
            atol = 1e-5 if jit else 2e-2
            assert torch.allclose(loaded.encode_image(images).float(), want_image, atol=atol)
            assert torch.allclose(loaded.encode_text(texts).float(), want_text, atol=atol)


def test_manifest_is_reused_and_regenerated(world, teacher, tmp_path, monkeypatch):
    out, manifest, _ = teacher
    calls = []
    real_train = ensure_module.train_teacher

    def quick_training(bank, classes, cfg, other_names=()):
        calls.append(cfg)
        return real_train(bank, classes, replace(cfg, steps=2), other_names)

    monkeypatch.setattr(ensure_module, "train_teacher", quick_training)
    assert ensure_teacher(world, out, SMALL) == manifest and not calls
    assert ensure_teacher(world, out, replace(SMALL, num_threads=1, log_every=7)) == manifest
    assert not calls

    # A checkpoint that no longer matches its manifest, or other parameters, mean retraining.
    copy = str(tmp_path / "teacher")
    shutil.copytree(out, copy)
    with open(os.path.join(copy, "clip_teacher.pt"), "ab") as f:
        f.write(b"\0")
    assert ensure_teacher(world, copy, SMALL)["config"] == SMALL.to_dict() and len(calls) == 1
    other = replace(SMALL, seed=1)
    redone = ensure_teacher(world, copy, other)
    assert calls[-1] == other and redone["config"] == other.to_dict() and redone["seed"] == 1
    assert ensure_teacher(world, copy, other) == redone and len(calls) == 2
    ensure_teacher(world, copy, other, force=True)
    assert len(calls) == 3


def test_interrupted_run_leaves_no_manifest(world, tmp_path, monkeypatch):
    out = str(tmp_path / "teacher")

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ensure_module, "save_openai_archive", killed)
    with pytest.raises(KeyboardInterrupt):
        ensure_teacher(world, out, replace(SMALL, steps=1))
    assert read_teacher_manifest(out) is None
    assert not [f for f in os.listdir(out) if f.endswith(".pt")]


def test_missing_world(tmp_path):
    with pytest.raises(TeacherError) as e:
        ensure_teacher(str(tmp_path / "nowhere"), str(tmp_path / "out"), SMALL)
    assert "prepare_shapes_ovd.py" in str(e.value)


def test_cli_missing_world_exits_2(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location(
        "train_clip_teacher", os.path.join(REPO, "tools", "train_clip_teacher.py")
    )
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    missing = str(tmp_path / "nowhere")
    assert cli.main(["--world-dir", missing, "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and missing in err and "prepare_shapes_ovd.py" in err
    help_text = cli.get_parser().format_help()
    for option in ("--world-dir", "--output-dir", "--seed", "--steps", "--batch-size"):
        assert option in help_text
    for option in ("--crop-size", "--embed-dim", "--force"):
        assert option in help_text
    with open(os.path.join(REPO, "tools", "train_clip_teacher.py")) as f:
        assert "sys.path" not in f.read()
