"""COCO 48/17 and LVIS v1 (base / rare) on a tiny COCO + LVIS tree: registration, metadata, both
evaluators on hand-made predictions, the annotation tool, and the recipe's commands end to end."""
import importlib.util
import json
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pytest
import torch
from clip.model import CLIP
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES
from detectron2.data.datasets.lvis_v1_categories import LVIS_CATEGORIES
from detectron2.structures import Boxes, BoxMode, Instances

from vild_d2.data import load_split
from vild_d2.data.datasets import DatasetError, register_coco_ovd, register_lvis_ovd
from vild_d2.data.vocabularies import preset_names
from vild_d2.evaluation import OVDCOCOEvaluator, OVDLVISEvaluator
from vild_d2.shapes_world.archive import save_openai_archive

from coco_lvis_fixtures import LVIS_FREQUENCY, write_coco_lvis_tree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOVEL = ["airplane", "bus", "cat", "dog", "cow", "elephant", "umbrella", "tie", "snowboard",
         "skateboard", "cup", "knife", "cake", "couch", "keyboard", "sink", "scissors"]
BASE = ["person", "bicycle", "car", "motorcycle", "train", "truck", "boat", "bench", "bird", "horse",
        "sheep", "bear", "zebra", "giraffe", "backpack", "handbag", "suitcase", "frisbee", "skis",
        "kite", "surfboard", "bottle", "fork", "spoon", "bowl", "banana", "apple", "sandwich",
        "orange", "broccoli", "carrot", "pizza", "donut", "chair", "bed", "toilet", "tv", "laptop",
        "mouse", "remote", "microwave", "oven", "toaster", "refrigerator", "book", "clock", "vase",
        "toothbrush"]
DIM = 64


def _name(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return write_coco_lvis_tree(str(tmp_path_factory.mktemp("ovd") / "datasets"))


def _coco(tree, split_dir, subset, drop_empty=False):
    name = _name(f"coco_{subset}")
    register_coco_ovd(name, os.path.join(tree, "coco", "annotations", f"instances_{split_dir}.json"),
                      os.path.join(tree, "coco", split_dir), "coco_48_17", subset, drop_empty)
    return name


def _lvis(tree, part, subset, categories=None):
    name = _name(f"lvis_{subset}")
    register_lvis_ovd(name, os.path.join(tree, "lvis", f"lvis_v1_{part}.json"),
                      os.path.join(tree, "coco"), subset, categories)
    return name


def _classes_per_image(name):
    meta = MetadataCatalog.get(name)
    return {d["image_id"]: [meta.thing_classes[a["category_id"]] for a in d["annotations"]]
            for d in DatasetCatalog.get(name)}


# ---------------------------------------------------------------- splits and registration


def test_coco_split_file_is_the_48_17_benchmark():
    split = load_split("coco_48_17")
    coco = [c["name"] for c in COCO_CATEGORIES if c["isthing"]]
    assert len(split.base_classes) == 48 and len(split.novel_classes) == 17
    assert sorted(split.base_classes) == sorted(BASE) and sorted(split.novel_classes) == sorted(NOVEL)
    assert split.classes == [c for c in coco if c in split.classes]  # COCO category-id order


def test_builtin_datasets_metadata():
    base, val = MetadataCatalog.get("coco_ovd_train_base"), MetadataCatalog.get("coco_ovd_val")
    assert base.thing_classes == base.base_classes and len(base.thing_classes) == 48
    assert len(val.thing_classes) == 65 and sorted(val.novel_classes) == sorted(NOVEL)
    assert val.evaluator_type == "ovd_coco" and val.ovd_split == "coco_48_17"
    assert "json_file" not in val.as_dict()  # the evaluator converts the filtered dataset
    assert len(MetadataCatalog.get("coco_ovd_train_all").thing_classes) == 65

    lbase, lval = MetadataCatalog.get("lvis_v1_ovd_train_base"), MetadataCatalog.get("lvis_v1_ovd_val")
    rare = {c["name"].replace("_", " ") for c in LVIS_CATEGORIES if c["frequency"] == "r"}
    assert len(lbase.thing_classes) == 866 and len(lval.thing_classes) == 1203
    assert set(lval.novel_classes) == rare and len(rare) == 337
    assert not rare & set(lbase.thing_classes)
    assert lval.thing_classes[:2] == ["aerosol can", "air conditioner"] and "bow (weapon)" in rare
    assert len(lval.thing_dataset_id_to_contiguous_id) == 1203
    assert lval.json_file.endswith(os.path.join("lvis", "lvis_v1_val.json"))
    assert lbase.image_root.endswith("coco" + os.sep)


def test_registration_reads_nothing_and_missing_files_are_one_line(tmp_path):
    missing = str(tmp_path / "nowhere" / "instances_val2017.json")
    name = _name("coco_missing")
    register_coco_ovd(name, missing, str(tmp_path), subset="all")
    with pytest.raises(DatasetError, match="does not exist") as e:
        DatasetCatalog.get(name)
    assert missing in str(e.value) and "\n" not in str(e.value)
    name = _name("lvis_missing")
    register_lvis_ovd(name, str(tmp_path / "lvis_v1_val.json"), str(tmp_path / "coco"))
    with pytest.raises(DatasetError, match="lvis_v1_val.json does not exist"):
        DatasetCatalog.get(name)


def test_coco_base_set_drops_novel_and_unsplit_annotations(tree):
    name = _coco(tree, "train2017", "base")
    assert _classes_per_image(name) == {1: ["person"], 2: ["car"], 3: [], 4: ["person", "bicycle"]}
    meta = MetadataCatalog.get(name)
    assert meta.thing_classes == load_split("coco_48_17").base_classes
    # the file's category ids of the kept classes, for the evaluator's COCO-format output
    assert meta.thing_dataset_id_to_contiguous_id[1] == 0 and 18 not in meta.thing_dataset_id_to_contiguous_id


def test_coco_val_set_keeps_all_65_and_leaves_out_images_without_them(tree):
    name = _coco(tree, "val2017", "all", drop_empty=True)
    assert _classes_per_image(name) == {11: ["person", "dog"], 12: ["car", "umbrella", "bicycle"]}
    d = DatasetCatalog.get(name)[0]
    assert os.path.isfile(d["file_name"]) and (d["width"], d["height"]) == (96, 80)


def test_coco_file_without_a_split_class_is_one_line(tree, tmp_path):
    data = json.load(open(os.path.join(tree, "coco", "annotations", "instances_val2017.json")))
    data["categories"] = [c for c in data["categories"] if c["name"] != "dog"]
    data["annotations"] = [a for a in data["annotations"] if a["category_id"] != 18]
    path = tmp_path / "no_dog.json"
    path.write_text(json.dumps(data))
    name = _name("coco_nodog")
    register_coco_ovd(name, str(path), os.path.join(tree, "coco", "val2017"))
    with pytest.raises(DatasetError, match=r"no category named \['dog'\]") as e:
        DatasetCatalog.get(name)
    assert "\n" not in str(e.value)


def test_lvis_base_set_drops_rare_annotations(tree):
    base = _classes_per_image(_lvis(tree, "train", "base"))
    assert base == {1: ["apple"], 2: ["aerosol can", "alarm clock"], 3: [], 4: ["apple", "aerosol can"]}
    val = _classes_per_image(_lvis(tree, "val", "all"))
    assert val[11] == ["apple", "applesauce"] and val[12][1] == "apricot"
    assert {LVIS_FREQUENCY[n.replace(" ", "_")] for n in ("applesauce", "apricot")} == {"r"}


def test_lvis_file_with_unregistered_category_is_one_line(tree):
    categories = [c for c in LVIS_CATEGORIES if c["name"] != "apricot"]
    name = _lvis(tree, "val", "all", categories)
    with pytest.raises(DatasetError, match="category id 14, which is not among the 1202") as e:
        DatasetCatalog.get(name)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- evaluators


def _evaluate(evaluator, name, keep):
    """Predictions equal to the ground truth of the classes ``keep`` accepts (score 1)."""
    meta = MetadataCatalog.get(name)
    evaluator.reset()
    for d in DatasetCatalog.get(name):
        anns = [a for a in d["annotations"] if keep(meta.thing_classes[a["category_id"]])]
        boxes = [BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in anns]
        inst = Instances((d["height"], d["width"]))
        inst.pred_boxes = Boxes(torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4))
        inst.scores = torch.ones(len(anns))
        inst.pred_classes = torch.tensor([a["category_id"] for a in anns], dtype=torch.long)
        evaluator.process([{"image_id": d["image_id"]}], [{"instances": inst}])
    return evaluator.evaluate()["bbox"]


def test_coco_evaluator_novel_base_all_ap50(tree, tmp_path):
    name = _coco(tree, "val2017", "all", drop_empty=True)
    out = str(tmp_path / "coco_eval")
    r = _evaluate(OVDCOCOEvaluator(name, out), name, lambda c: True)
    for key in ("AP50_novel", "AP50_base", "AP50_all", "AP50", "AP", "AP_novel", "AP_base"):
        assert r[key] == pytest.approx(100.0), key
    # 3 base classes found, the 2 novel ones (dog, umbrella) all missed
    r = _evaluate(OVDCOCOEvaluator(name, out), name, lambda c: c not in NOVEL)
    assert r["AP50_novel"] == 0.0 and r["AP50_base"] == pytest.approx(100.0)
    assert r["AP50_all"] == pytest.approx(60.0) and r["AP50"] == pytest.approx(60.0)  # COCOeval's own
    assert r["AP50-dog"] == 0.0 and r["AP50-car"] == pytest.approx(100.0) and "AP50-cow" not in r
    saved = json.loads(open(os.path.join(out, f"ovd_results_{name}.json")).read())
    assert saved["metrics"]["AP50_novel"] == 0.0 and saved["novel_classes"] == ["dog", "umbrella"]
    # of the base classes only person found: base AP50 falls to a third, novel back to 100
    r = _evaluate(OVDCOCOEvaluator(name, out), name, lambda c: c in ("person", "dog", "umbrella"))
    assert r["AP50_base"] == pytest.approx(100.0 / 3) and r["AP50_novel"] == pytest.approx(100.0)


def test_lvis_evaluator_rare_common_frequent(tree, tmp_path):
    name = _lvis(tree, "val", "all")
    out = str(tmp_path / "lvis_eval")
    freq = {n: LVIS_FREQUENCY[n.replace(" ", "_")] for n in
            ("apple", "applesauce", "aerosol can", "apricot", "alarm clock")}
    r = _evaluate(OVDLVISEvaluator(name, out), name, lambda c: True)
    for key in ("AP_r", "AP_c", "AP_f", "AP"):
        assert r[key] == pytest.approx(100.0), key
    # rare (applesauce, apricot) missed; common (aerosol can) and frequent (apple, alarm clock) found
    r = _evaluate(OVDLVISEvaluator(name, out), name, lambda c: freq[c] != "r")
    assert r["AP_r"] == 0.0 and r["AP_c"] == pytest.approx(100.0) and r["AP_f"] == pytest.approx(100.0)
    assert r["AP"] == pytest.approx(60.0)
    r = _evaluate(OVDLVISEvaluator(name, out), name, lambda c: freq[c] != "f")
    assert r["AP_f"] == 0.0 and r["AP_r"] == pytest.approx(100.0) and r["AP"] == pytest.approx(60.0)
    saved = json.loads(open(os.path.join(out, f"ovd_results_{name}.json")).read())
    assert saved["metrics"]["AP_f"] == 0.0 and len(saved["novel_classes"]) == 337


def test_lvis_evaluator_refuses_a_file_with_other_rare_categories(tree):
    categories = [dict(c, frequency="c") if c["name"] == "apricot" else c for c in LVIS_CATEGORIES]
    name = _lvis(tree, "val", "all", categories)
    with pytest.raises(ValueError, match="rare categories differ") as e:
        OVDLVISEvaluator(name)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------- tools


def _tool(script):
    spec = importlib.util.spec_from_file_location(script, os.path.join(ROOT, "tools", f"{script}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_prepared_files_hold_what_the_datasets_load(tree, tmp_path, capsys):
    tool = _tool("prepare_ovd_annotations")
    out = str(tmp_path / "prepared")
    assert tool.main(["coco", "--root", tree, "--output-dir", out]) == 0
    assert tool.main(["lvis", "--root", tree, "--output-dir", out]) == 0
    for written, source, subset, images, drop in (
        ("instances_train2017_ovd_base.json", "instances_train2017.json", "base", "train2017", False),
        ("instances_val2017_ovd.json", "instances_val2017.json", "all", "val2017", True),
    ):
        data = json.load(open(os.path.join(out, written)))
        assert len(data["categories"]) == (48 if subset == "base" else 65)
        from_file, from_source = _name("prepared"), _name("source")
        register_coco_ovd(from_file, os.path.join(out, written), os.path.join(tree, "coco", images),
                          subset=subset)
        register_coco_ovd(from_source, os.path.join(tree, "coco", "annotations", source),
                          os.path.join(tree, "coco", images), subset=subset, drop_empty_images=drop)
        assert DatasetCatalog.get(from_file) == DatasetCatalog.get(from_source)
    lvis = json.load(open(os.path.join(out, "lvis_v1_train_ovd_base.json")))
    rare = {c["id"] for c in lvis["categories"] if c["frequency"] == "r"}
    assert len(lvis["categories"]) == 1203 and len(lvis["annotations"]) == 5
    assert not any(a["category_id"] in rare for a in lvis["annotations"])
    capsys.readouterr()
    assert tool.main(["coco", "--root", str(tmp_path / "empty")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "instances_train2017.json does not exist" in err


def test_vocabulary_presets_cover_the_benchmarks():
    coco, lvis = preset_names("coco"), preset_names("lvis")
    assert len(coco) == 80 and set(load_split("coco_48_17").classes) <= set(coco)
    assert lvis == MetadataCatalog.get("lvis_v1_ovd_val").thing_classes and len(set(lvis)) == 1203
    assert preset_names("apple,kiwi") is None


def test_text_embedding_tool_presets_and_reuse(tiny_clip, tmp_path, capsys):
    tool = _tool("compute_text_embeddings")
    out = str(tmp_path / "coco.npy")
    args = ["--clip-model", tiny_clip, "--names", "coco", "--output", out]
    assert tool.main(args) == 0
    emb, sidecar = np.load(out), json.load(open(out[:-4] + ".json"))
    assert emb.shape == (80, DIM) and sidecar["names"] == preset_names("coco")
    assert len(sidecar["templates"]) > 1  # the prompt ensemble
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, rtol=1e-5)
    stamp = os.stat(out).st_mtime_ns
    capsys.readouterr()
    assert tool.main(args) == 0 and "up to date" in capsys.readouterr().out
    assert os.stat(out).st_mtime_ns == stamp
    assert tool.main(args + ["--templates", "a photo of a {}."]) == 0
    assert not np.allclose(np.load(out), emb)


# ---------------------------------------------------------------- the recipe's commands


def _recipe_commands(benchmark):
    """The real-data recipe of ``benchmark`` ("coco_ovd" or "lvis_ovd"), as the README gives it:
    stage 1, the CLIP cache, the text embeddings, ViLD's training (the paper's recipe: from
    scratch), its evaluation; then ViLD-ensemble's training and the fine-tuning option's."""
    names = benchmark.split("_")[0]
    out = f"output/{benchmark}"
    py = ".venv/bin/python"
    return [
        [py, "tools/train_net.py", "--config-file", f"configs/{benchmark}/stage1_proposals.yaml"],
        [py, "tools/precompute_clip_embeddings.py", "--config-file", f"configs/{benchmark}/stage1_proposals.yaml",
         "--clip-model", "ViT-B/32", "--output-dir", f"{out}/clip_cache",
         "MODEL.WEIGHTS", f"{out}/stage1/model_final.pth"],
        [py, "tools/compute_text_embeddings.py", "--clip-model", "ViT-B/32", "--names", names,
         *(["--synonyms"] if names == "lvis" else []), "--output", f"{out}/text_embeddings_{names}.npy"],
        [py, "tools/train_net.py", "--config-file", f"configs/{benchmark}/vild.yaml"],
        [py, "tools/train_net.py", "--config-file", f"configs/{benchmark}/vild.yaml", "--eval-only",
         "MODEL.WEIGHTS", f"{out}/vild/model_final.pth"],
        [py, "tools/train_net.py", "--config-file", f"configs/{benchmark}/vild_ensemble.yaml"],
        [py, "tools/train_net.py", "--config-file", f"configs/{benchmark}/vild_finetune.yaml"],
    ]


def _tiny(cmd, clip_path):
    """A recipe command with the tiny fixture's overrides: this interpreter, absolute tool and
    config paths, the tiny CLIP, and tiny sizes for the detectron2 tools."""
    assert cmd[0] == ".venv/bin/python", cmd
    script = os.path.basename(cmd[1])
    args = [sys.executable, os.path.join(ROOT, cmd[1])]
    it = iter(cmd[2:])
    for a in it:
        args.append(a)
        if a == "--config-file":
            args.append(os.path.join(ROOT, next(it)))
        elif a == "--clip-model":
            next(it)
            args.append(clip_path)
    if script == "compute_text_embeddings.py":
        return args
    opts = ["MODEL.DEVICE", "cpu", "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
            "INPUT.LSJ.IMAGE_SIZE", "96",
            "MODEL.RPN.PRE_NMS_TOPK_TEST", "100", "MODEL.RPN.POST_NMS_TOPK_TEST", "30",
            "MODEL.VILD.DISTILL.NUM_PROPOSALS", "8", "MODEL.VILD.CLIP_MODEL", clip_path,
            "MODEL.VILD.EMBED_DIM", str(DIM), "DATALOADER.NUM_WORKERS", "0",
            # a 2-iteration model scores every class below the default threshold
            "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
            # the random-weight R50 needs unit-variance pixels (ImageNet weights expect raw ones)
            "MODEL.PIXEL_STD", "[57.375, 57.12, 58.395]"]
    if "MODEL.WEIGHTS" not in cmd and "vild_finetune.yaml" not in cmd[3]:
        opts += ["MODEL.WEIGHTS", ""]  # no ImageNet weights offline: random initialisation
    flags = ["--threads", "1"]
    if script == "precompute_clip_embeddings.py":
        flags += ["--num-workers", "0", "--batch-size", "64"]
    else:
        # a fixed seed, a small step and clipped gradients: 2 iterations of a random model stay
        # finite and still propose boxes
        opts += ["INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96", "SOLVER.MAX_ITER", "2",
                 "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "SOLVER.BASE_LR", "0.002",
                 "SOLVER.CLIP_GRADIENTS.ENABLED", "True",
                 "SEED", "0",
                 "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "100", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "30",
                 "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32"]
    first_opt = next((i for i, a in enumerate(args) if re.fullmatch(r"[A-Z_]+(\.[A-Z0-9_]+)+", a)),
                     len(args))
    return args[:2] + flags + args[2:first_opt] + opts + args[first_opt:]


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random-weight CLIP in OpenAI's TorchScript archive format."""
    torch.manual_seed(0)
    path = str(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")
    save_openai_archive(CLIP(DIM, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1).float().eval(), path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("benchmark, vocabulary, test_vocabulary, results, keys", [
    ("coco_ovd", 80, "65-class vocabulary (17 novel)", "ovd_results_coco_ovd_val.json",
     ("AP50_novel", "AP50_base", "AP50_all")),
    ("lvis_ovd", 1203, "1203-class vocabulary (337 novel)", "ovd_results_lvis_v1_ovd_val.json",
     ("AP_r", "AP_c", "AP_f", "AP")),
])
def test_recipe_commands_run_end_to_end(tree, tiny_clip, tmp_path, benchmark, vocabulary,
                                        test_vocabulary, results, keys):
    env = dict(os.environ, DETECTRON2_DATASETS=tree, OMP_NUM_THREADS="1")
    logs = []
    for cmd in _recipe_commands(benchmark):
        proc = subprocess.run(_tiny(cmd, tiny_clip), env=env, cwd=str(tmp_path), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-3000:]}"
        logs.append(proc.stdout + proc.stderr)
    out = tmp_path / "output" / benchmark
    manifest = json.loads((out / "clip_cache" / "manifest.json").read_text())
    assert manifest["num_images"] == 4 and manifest["num_proposals"] == 8
    text = np.load(out / f"text_embeddings_{benchmark[:4]}.npy")
    assert text.shape == (vocabulary, DIM)
    assert test_vocabulary in logs[3] and test_vocabulary in logs[4]  # training ends with evaluation
    for name, log in (("vild_ensemble", logs[5]), ("vild_finetune", logs[6])):
        assert torch.load(out / name / "model_final.pth", weights_only=False)["iteration"] == 1
        assert test_vocabulary in log, log[-3000:]
        assert (out / name / "inference" / results).is_file(), sorted(os.listdir(out / name))
    # the fine-tuning option starts from the stage-1 detector's weights, the paper's from scratch
    assert f"Loading from output/{benchmark}/stage1/model_final.pth" in logs[6]
    assert "No checkpoint found. Initializing model from scratch" in logs[3]
    saved = json.loads((out / "vild" / "inference" / results).read_text())
    for key in keys:
        assert 0.0 <= saved["metrics"][key] <= 100.0, key
    assert saved["model_seconds_per_image"] > 0
    if "per_class_ap50" in saved:  # COCO: the means are those of its classes with ground truth
        ap = saved["per_class_ap50"]
        assert saved["metrics"]["AP50_all"] == pytest.approx(np.mean(list(ap.values())))
        novel = [c for c in ap if c in saved["novel_classes"]]
        assert saved["metrics"]["AP50_novel"] == pytest.approx(np.mean([ap[c] for c in novel]))
