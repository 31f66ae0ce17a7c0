import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid

import numpy as np
import pytest
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation.pascal_voc_evaluation import parse_rec
from vild_d2.shapes_world import generator as shapes_world
from vild_d2.data.datasets import register_shapes_ovd
from vild_d2.shapes_world.generator import (
    CLASS_NAMES,
    IMAGE_SETS,
    WorldConfig,
    WorldError,
    check_attribute_coverage,
    ensure_world,
    is_complete,
    make_split,
    render_image,
)
from vild_d2.data.splits import OVDSplit, SplitError, load_split

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLI = os.path.join(REPO, "datasets", "prepare_shapes_ovd.py")
TINY = WorldConfig(num_trainval=8, num_test=2, num_teacher=2, num_teacher_val=2, image_size=64)
TINY_ARGS = ["--num-trainval", "4", "--num-test", "2", "--num-teacher", "2"]
TINY_ARGS += ["--num-teacher-val", "2", "--image-size", "64", "--quiet"]


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, root)] = f.read()
    return out


def _cli():
    spec = importlib.util.spec_from_file_location("prepare_shapes_ovd", CLI)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny world under <root>/<unique name>, generated once for the read-only tests."""
    root = str(tmp_path_factory.mktemp("worlds"))
    name = f"shapes_test_{uuid.uuid4().hex[:8]}"
    ensure_world(os.path.join(root, name), TINY, progress=False)
    return root, name


def test_classes_match_metadata():
    split = load_split("shapes_ovd_12_4")
    assert list(CLASS_NAMES) == split.classes
    assert make_split() == split


def test_deterministic_bytes(world, tmp_path):
    root, name = world
    again = ensure_world(str(tmp_path / "again"), TINY, progress=False)
    first, second = _files(os.path.join(root, name)), _files(again)
    assert first.keys() == second.keys()
    assert all(first[k] == second[k] for k in first)

    other = ensure_world(
        str(tmp_path / "other"), WorldConfig(**{**vars(TINY), "seed": 1}), progress=False
    )
    third = _files(other)
    jpegs = [k for k in first if k.endswith(".jpg")]
    assert len(jpegs) == 14
    assert all(first[k] != third[k] for k in jpegs)


def test_image_depends_only_on_its_index():
    small, large = TINY, WorldConfig(**{**vars(TINY), "num_trainval": 40})
    a, objs_a = render_image(small, "trainval", 3)
    b, objs_b = render_image(large, "trainval", 3)
    assert np.array_equal(a, b) and objs_a == objs_b
    c, _ = render_image(small, "test", 3)
    assert not np.array_equal(a, c)


def test_tree_layout_and_annotations(world):
    root, name = world
    tree = os.path.join(root, name)
    ids = {}
    for image_set in IMAGE_SETS:
        with open(os.path.join(tree, "ImageSets", "Main", f"{image_set}.txt")) as f:
            ids[image_set] = f.read().split()
    assert [len(ids[s]) for s in IMAGE_SETS] == [8, 2, 2, 2]
    assert not set(ids["teacher"] + ids["teacher_val"]) & set(ids["test"] + ids["trainval"])
    for file_id in ids["trainval"] + ids["test"]:
        with Image.open(os.path.join(tree, "JPEGImages", f"{file_id}.jpg")) as im:
            assert im.size == (64, 64) and im.mode == "RGB"
        objects = parse_rec(os.path.join(tree, "Annotations", f"{file_id}.xml"))
        assert 1 <= len(objects) <= TINY.max_objects
        for obj in objects:
            assert obj["name"] in CLASS_NAMES and obj["difficult"] == 0
            x0, y0, x1, y1 = obj["bbox"]
            assert 1 <= x0 < x1 <= 64 and 1 <= y0 < y1 <= 64


def test_registry_loads_base_and_all(world):
    root, name = world
    register_shapes_ovd(root, name=name)
    split = make_split()
    novel_ids = {CLASS_NAMES.index(c) for c in split.novel_classes}

    full = DatasetCatalog.get(f"{name}_trainval_all")
    base = DatasetCatalog.get(f"{name}_trainval_base")
    names_all = [CLASS_NAMES[a["category_id"]] for d in full for a in d["annotations"]]
    names_base = [split.base_classes[a["category_id"]] for d in base for a in d["annotations"]]
    assert any(CLASS_NAMES.index(n) in novel_ids for n in names_all)
    assert names_base == [n for n in names_all if n not in split.novel_classes]
    assert all(a["category_id"] < 12 for d in base for a in d["annotations"])

    test = DatasetCatalog.get(f"{name}_test")
    assert len(test) == 2 and all(d["annotations"] for d in test)
    meta = MetadataCatalog.get(f"{name}_test")
    assert meta.thing_classes == list(CLASS_NAMES)
    assert meta.novel_classes == split.novel_classes
    assert MetadataCatalog.get(f"{name}_trainval_base").thing_classes == split.base_classes


def test_attribute_coverage():
    default = make_split()
    check_attribute_coverage(default)

    reds = [c for c in CLASS_NAMES if c.startswith("red ")]
    with pytest.raises(SplitError, match="'red circle'.*colour 'red'") as e:
        check_attribute_coverage(default.with_novel(reds))
    assert "\n" not in str(e.value)

    stars = [c for c in CLASS_NAMES if c.endswith(" star")]
    with pytest.raises(SplitError, match="shape 'star'"):
        make_split(stars)
    with pytest.raises(SplitError, match="'purple circle'"):
        check_attribute_coverage(OVDSplit("x", ["red circle", "purple circle"], ["purple circle"]))


def test_custom_novel_classes_written(tmp_path):
    out = ensure_world(str(tmp_path / "w"), TINY, ["blue star", "red circle"], progress=False)
    written = load_split(os.path.join(out, "split.json"))
    assert written.name == "shapes_ovd_custom"
    assert written.novel_classes == ["red circle", "blue star"]

    default = make_split()
    assert make_split(list(reversed(default.novel_classes))) == default


def test_manifest_skips_then_regenerates(tmp_path, monkeypatch):
    out = ensure_world(str(tmp_path / "w"), TINY, progress=False)
    manifest = os.path.join(out, "manifest.json")
    stamp = os.stat(manifest).st_mtime_ns

    def fail(*args, **kwargs):
        raise AssertionError("a complete tree was regenerated")

    with monkeypatch.context() as m:
        m.setattr(shapes_world, "generate_world", fail)
        assert ensure_world(out, TINY, progress=False) == out
    assert os.stat(manifest).st_mtime_ns == stamp

    changed = WorldConfig(**{**vars(TINY), "num_test": 3})
    ensure_world(out, changed, progress=False)
    assert is_complete(out, changed, make_split()) and not is_complete(out, TINY, make_split())
    with open(manifest) as f:
        assert json.load(f)["image_sets"]["test"] == 3
    assert not [p for p in os.listdir(tmp_path) if p != "w"]


def test_interrupted_run_leaves_old_tree(tmp_path, monkeypatch):
    out = str(tmp_path / "w")
    ensure_world(out, TINY, progress=False)
    before = _files(out)
    calls = []

    def write_then_die(*args):
        calls.append(args)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*args)

    real = shapes_world._write_image
    monkeypatch.setattr(shapes_world, "_write_image", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        ensure_world(out, WorldConfig(**{**vars(TINY), "seed": 5}), progress=False, workers=1)
    assert _files(out) == before
    assert os.listdir(tmp_path) == ["w"]


def test_killed_run_is_not_taken_for_complete(tmp_path):
    out = str(tmp_path / "w")
    script = textwrap.dedent(f"""
        from vild_d2.shapes_world.generator import WorldConfig, ensure_world
        cfg = WorldConfig(num_trainval=5000, num_test=2, num_teacher=0, image_size=64)
        ensure_world({out!r}, cfg, progress=False, workers=1)
        """)
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.DEVNULL)
    tmp = f"{out}.tmp-{proc.pid}"
    deadline = time.time() + 60
    while time.time() < deadline:
        images = os.path.join(tmp, "JPEGImages")
        if os.path.isdir(images) and len(os.listdir(images)) >= 5:
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert os.path.isdir(tmp) and not os.path.exists(out)
    assert not is_complete(tmp, TINY, make_split())

    ensure_world(out, TINY, progress=False)
    assert is_complete(out, TINY, make_split())
    assert os.listdir(tmp_path) == ["w"]


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "keep.txt").write_text("mine")
    with pytest.raises(WorldError, match="not a generated world"):
        ensure_world(str(tmp_path / "w"), TINY, progress=False)
    assert os.listdir(tmp_path / "w") == ["keep.txt"]


def test_cli_default_root_custom_split_and_preview(tmp_path, monkeypatch):
    monkeypatch.setenv("DETECTRON2_DATASETS", str(tmp_path))
    preview = str(tmp_path / "preview.png")
    args = TINY_ARGS + ["--novel-classes", "red circle, blue star", "--preview", preview]
    assert _cli().main(args) == 0
    written = load_split(str(tmp_path / "shapes_ovd" / "split.json"))
    assert written.name == "shapes_ovd_custom"
    assert written.novel_classes == ["red circle", "blue star"]
    with Image.open(preview) as im:
        assert im.width > 64 * 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--novel-classes", "purple circle"], "purple circle"),
        (["--novel-classes", "red circle,red square,red triangle,red star"], "colour 'red'"),
        (["--image-size", "8"], "image_size"),
        (["--num-test", "1"], "num_test"),
        (["--max-objects", "0"], "max_objects"),
    ],
)
def test_cli_bad_input_exits_2(tmp_path, capsys, extra, message):
    out = str(tmp_path / "w")
    assert _cli().main(TINY_ARGS + ["--output-dir", out] + extra) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert os.listdir(tmp_path) == []


def test_cli_script_bad_option_one_line(tmp_path):
    out = str(tmp_path / "w")
    proc = subprocess.run(
        [sys.executable, CLI, "--output-dir", out, "--seed", "abc"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and "--seed" in lines[0], proc.stderr
    assert os.listdir(tmp_path) == []
