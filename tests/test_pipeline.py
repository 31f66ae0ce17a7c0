"""The main job end to end at --quick size, its commands run by hand, its rerun skipping every
stage, and bad input."""
import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "tools", "run_pipeline.py")
METHODS = {"clip_on_crops", "oracle", "vild_text", "vild_image", "vild", "vild_ensemble"}
# what the pipeline may add to a config: paths, the seed, and --quick's shortened schedules
PIPELINE_KEYS = {"OUTPUT_DIR", "MODEL.WEIGHTS", "MODEL.VILD.DISTILL.CACHE_DIR",
                 "MODEL.VILD.TEXT_EMBEDDINGS_CACHE_DIR", "MODEL.VILD.CLIP_MODEL", "SEED"}
QUICK_KEYS = {"SOLVER.MAX_ITER", "SOLVER.STEPS", "SOLVER.CHECKPOINT_PERIOD"}


def _run(args, cwd=ROOT):
    return subprocess.run([sys.executable, RUN, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


def _overridden_keys(command: str):
    """The KEY of each trailing KEY VALUE pair of a tool command."""
    words = shlex.split(command)
    words = words[words.index("--config-file") + 2:]
    while words and words[0].startswith("--"):
        words = words[2:] if words[0] in ("--threads", "--output-dir") else words[1:]
    return words[0::2]


def _summary(path):
    with open(path) as f:
        return json.load(f)


@pytest.mark.slow
def test_quick_pipeline_end_to_end_by_hand_and_rerun(tmp_path):
    out = tmp_path / "out"
    args = ["--quick", "--output-dir", str(out), "--datasets-dir", str(tmp_path / "ds")]
    first = _run(args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == METHODS
    for name, row in results["methods"].items():
        ap = row["per_class_ap50"]
        assert len(ap) == 16, name
        assert row["all_ap50"] == pytest.approx(np.mean(list(ap.values())))
        novel = results["config"]["novel_classes"]
        assert row["novel_ap50"] == pytest.approx(np.mean([ap[c] for c in novel]))
    assert set(results["inference_seconds_per_image"]) == METHODS
    for name in ("results.md", "per_class_ap50.png", "detections_vild.png", "detections_vild_ensemble.png"):
        assert (out / name).stat().st_size > 0

    # the commands behind each row are in results.md, and add nothing but paths, the seed and
    # --quick's schedules to the configs
    md = (out / "results.md").read_text()
    commands = results["commands"]
    every = [*commands["shared"].values(), *(c for row in commands["rows"].values() for c in row)]
    for command in every:
        assert command in md
        assert set(_overridden_keys(command)) <= PIPELINE_KEYS | QUICK_KEYS, command

    second = _run(args)
    assert second.returncode == 0
    assert second.stdout.count("up to date, skipped") == 13
    assert not [line for line in second.stdout.splitlines() if line.endswith(": running")]
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]

    # damaged outputs are not trusted: the cache is rebuilt the same, the final model written again
    os.truncate(out / "clip_cache" / "embeddings.npy", 1000)
    os.truncate(out / "vild" / "model_final.pth", 1000)
    third = _run(args)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert f"precompute: running ({out / 'clip_cache' / 'embeddings.npy'} has 1000 bytes" in third.stdout
    assert f"vild: running ({out / 'vild' / 'model_final.pth'} has 1000 bytes" in third.stdout
    assert third.stdout.count("up to date, skipped") == 11
    assert json.loads((out / "results.json").read_text())["methods"] == results["methods"]

    # one row by hand: its evaluation command, as printed, gives the row's numbers
    evaluate = commands["rows"]["vild_ensemble"][1]
    assert "--eval-only" in evaluate and "configs/shapes_ovd/vild_ensemble.yaml" in evaluate
    summary = out / "eval" / "vild_ensemble" / "inference" / "ovd_results_shapes_ovd_test.json"
    summary.unlink()
    by_hand = subprocess.run(evaluate.replace(" python ", f" {sys.executable} ", 1), shell=True,
                             cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert by_hand.returncode == 0, by_hand.stderr[-3000:]
    assert _summary(summary)["per_class_ap50"] == results["methods"]["vild_ensemble"]["per_class_ap50"]
    # ... and the pipeline, which did not write that file, evaluates that row again
    fourth = _run(args)
    assert f"evaluate_vild_ensemble: running ({summary} " in fourth.stdout and fourth.returncode == 0

    # a new output folder over the same world: stage 1, the critical path, keeps both threads
    # while the teacher stage beside it (here only reusing the trained teacher) takes its lane
    fifth = _run([*args[:2], str(tmp_path / "out2"), *args[3:]])
    assert fifth.returncode == 0, fifth.stdout[-3000:] + fifth.stderr[-3000:]
    stage1 = json.loads((tmp_path / "out2" / "results.json").read_text())["commands"]["shared"]["stage 1"]
    assert " --threads 2 " in stage1


@pytest.mark.parametrize("args, message", [
    (["--novel-classes", "red circle,purple circle"], "purple"),
    (["--novel-classes", "red circle,red square,red triangle,red star"], "red"),
    (["--teacher-other-objects", "1.5"], "other_objects_fraction"),
    (["MODEL.VILD.TEMPRATURE", "0.01"], "MODEL.VILD.TEMPRATURE"),
])
def test_invalid_options_are_one_line_errors_and_touch_nothing(tmp_path, args, message):
    trained = tmp_path / "o" / "stage1" / "model_final.pth"  # work of an earlier run
    trained.parent.mkdir(parents=True)
    trained.write_bytes(b"hours of training")
    proc = _run(["--quick", "--output-dir", str(tmp_path / "o"), "--datasets-dir", str(tmp_path / "ds"),
                 *args])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if "Warning" not in line and "warn" not in line]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "ds").exists() and os.listdir(tmp_path / "o") == ["stage1"]
    assert trained.read_bytes() == b"hours of training"


VOC_TINY = [  # a small detector, so that the R50 recipe of configs/voc_ovd runs in seconds
    "MODEL.WEIGHTS", "", "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
    "MODEL.FPN.OUT_CHANNELS", "32", "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.VILD.EMBED_DIM", "64",
    "MODEL.VILD.DISTILL.NUM_PROPOSALS", "8", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.RPN.POST_NMS_TOPK_TEST", "32", "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32",
    "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "128", "INPUT.MIN_SIZE_TEST", "96",
    "INPUT.MAX_SIZE_TEST", "128", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
]


def _tiny_voc(root):
    from voc_fixtures import write_voc_tree

    classes = ["person", "car", "dog", "bird", "train", "chair"]  # car, dog, train are novel
    images = {}
    for i in range(8):
        objects = [(classes[(i + k) % len(classes)], (10 + 30 * k, 12, 40 + 30 * k, 60)) for k in range(2)]
        images[f"{i:06d}"] = (128, 96, objects)
    ids = sorted(images)
    write_voc_tree(str(root / "VOC2007"), images, {"trainval": ids[:6], "test": ids[6:]})


@pytest.mark.slow
def test_voc_pipeline_runs_the_same_stages_on_a_voc_tree(tmp_path):
    import torch
    from clip.model import CLIP

    from vild_d2.shapes_world.archive import save_openai_archive

    _tiny_voc(tmp_path / "voc")
    torch.manual_seed(0)
    ckpt = str(tmp_path / "clip_random.pt")  # OpenAI's TorchScript format, random weights
    save_openai_archive(CLIP(64, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1).float().eval(), ckpt)
    out = tmp_path / "out"
    args = ["--dataset", "voc", "--voc-root", str(tmp_path / "voc"), "--voc-train", "2007",
            "--clip-model", ckpt, "--output-dir", str(out), "--stage1-iters", "2", "--iters", "2",
            "--threads", "1", "--parallel", "1", *VOC_TINY]
    proc = _run(args)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == METHODS
    assert results["config"]["test_dataset"] == "voc_ovd_2007_test"
    assert results["config"]["novel_classes"] == ["car", "dog", "sofa", "train"]
    for row in results["methods"].values():
        assert len(row["per_class_ap50"]) == 20
    manifest = json.loads((out / "clip_cache" / "manifest.json").read_text())
    assert manifest["datasets"] == ["voc_ovd_2007_trainval_base"]
    oracle = results["commands"]["rows"]["oracle"][0]
    assert "configs/voc_ovd/oracle.yaml" in oracle and "voc_ovd_2007_trainval_all" in oracle
    assert (out / "per_class_ap50.png").stat().st_size > 0


def test_voc_pipeline_without_a_voc_tree_is_a_one_line_error(tmp_path):
    proc = _run(["--dataset", "voc", "--voc-root", str(tmp_path / "nowhere"),
                 "--output-dir", str(tmp_path / "o")])
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if "Warning" not in line and "warn" not in line]
    assert len(lines) == 1 and "VOC2007" in lines[0], proc.stderr


def _pipeline(tmp_path, configs_dir=os.path.join(ROOT, "configs"), **kw):
    from vild_d2.pipeline.run import PipelineOptions
    from vild_d2.pipeline.shapes import ShapesPipeline

    opts = PipelineOptions(output_dir=str(tmp_path / "o"), tools_dir=os.path.join(ROOT, "tools"),
                           configs_dir=configs_dir, **kw)
    return ShapesPipeline(opts)


def test_teacher_stage_is_keyed_by_the_whole_teacher_config(tmp_path):
    from vild_d2.shapes_world import TeacherConfig

    (stage,) = _pipeline(tmp_path, seed=3, teacher={"steps": 7}).beside_stage1([])
    # defaults count too: a teacher trained under other defaults is not reused
    assert stage["key"]["teacher"] == TeacherConfig(seed=3, steps=7).cache_key()
    assert "other_objects_fraction" in stage["key"]["teacher"]


def test_a_stale_clip_cache_stays_aside_until_its_successor_is_done(tmp_path):
    """The cache refuses to mix keys: a cache of other inputs leaves its folder for the new one,
    kept aside until that is complete (StageRunner, tests/test_stages.py)."""
    stage = _pipeline(tmp_path).precompute_stage("stage1.pth", ["stage1"])
    cache = tmp_path / "o" / "clip_cache"
    assert stage["replaces"] == [str(cache)]
    assert stage["outputs"] == [str(cache / f) for f in ("boxes.npy", "scores.npy", "embeddings.npy",
                                                          "index.json", "manifest.json")]


def test_a_stage_key_is_the_merged_config_of_its_command(tmp_path):
    """An edit of a _BASE_ file that changes a value retrains; a comment does not."""
    configs = tmp_path / "configs"
    shutil.copytree(os.path.join(ROOT, "configs"), configs)
    base = configs / "shapes_ovd" / "Base-ViLD-Shapes.yaml"

    def key():
        return _pipeline(tmp_path, configs_dir=str(configs)).training_stage("vild", "vild.yaml", [], None)["key"]

    before = key()
    base.write_text(base.read_text() + "# a comment\n")
    assert key() == before
    base.write_text(base.read_text().replace("BASE_LR: 0.0005", "BASE_LR: 0.001"))
    assert key() != before
