"""The main job end to end at --quick size, its rerun skipping every stage, and bad input."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUN = os.path.join(ROOT, "tools", "run_pipeline.py")
METHODS = {"clip_on_crops", "oracle", "vild_text", "vild_image", "vild", "vild_ensemble"}


def _run(args, cwd):
    return subprocess.run([sys.executable, RUN, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=1800)


def test_quick_pipeline_end_to_end_and_rerun(tmp_path):
    args = ["--quick", "--output-dir", str(tmp_path / "out"), "--datasets-dir", str(tmp_path / "ds")]
    first = _run(args, ROOT)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert set(results["methods"]) == METHODS
    for row in results["methods"].values():
        for key in ("base_ap50", "novel_ap50", "all_ap50"):
            assert 0.0 <= row[key] <= 100.0
    assert set(results["inference_seconds_per_image"]) == METHODS
    for name in ("results.md", "per_class_ap50.png", "detections_vild.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    second = _run(args, ROOT)
    assert second.returncode == 0
    assert second.stdout.count("up to date, skipped") >= 10
    assert ": running" not in second.stdout
    # a new output folder over the same world: stage 1, the critical path, keeps both threads
    # while the teacher stage beside it (here only reusing the trained teacher) takes its lane
    third = _run([*args[:2], str(tmp_path / "out2"), *args[3:]], ROOT)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    assert "threads=2" in (tmp_path / "out2" / "logs" / "stage1.log").read_text()


@pytest.mark.parametrize("args, message", [
    (["--novel-classes", "red circle,purple circle"], "purple"),
    (["--novel-classes", "red circle,red square,red triangle,red star"], "red"),
    (["--teacher-other-objects", "1.5"], "other_objects_fraction"),
])
def test_invalid_options_are_one_line_errors(tmp_path, args, message):
    proc = _run(["--quick", *args, "--output-dir", str(tmp_path / "o"),
                 "--datasets-dir", str(tmp_path / "ds")], ROOT)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if "Warning" not in l and "warn" not in l]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "ds").exists()


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


def test_voc_pipeline_runs_the_same_stages_on_a_voc_tree(tmp_path):
    import torch
    from clip.model import CLIP

    from vild_d2.teacher import save_openai_archive

    _tiny_voc(tmp_path / "voc")
    torch.manual_seed(0)
    ckpt = str(tmp_path / "clip_random.pt")  # OpenAI's TorchScript format, random weights
    save_openai_archive(CLIP(64, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1).float().eval(), ckpt)
    out = tmp_path / "out"
    args = ["--dataset", "voc", "--voc-root", str(tmp_path / "voc"), "--voc-train", "2007",
            "--clip-model", ckpt, "--output-dir", str(out), "--stage1-iters", "2", "--iters", "2",
            "--threads", "1", "--parallel", "1", *VOC_TINY]
    proc = _run(args, ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["methods"]) == METHODS
    assert results["config"]["test_dataset"] == "voc_ovd_2007_test"
    assert results["config"]["novel_classes"] == ["car", "dog", "sofa", "train"]
    manifest = json.loads((out / "clip_cache" / "manifest.json").read_text())
    assert manifest["datasets"] == ["voc_ovd_2007_trainval_base"]
    assert (out / "per_class_ap50.png").stat().st_size > 0


def test_voc_pipeline_without_a_voc_tree_is_a_one_line_error(tmp_path):
    proc = _run(["--dataset", "voc", "--voc-root", str(tmp_path / "nowhere"),
                 "--output-dir", str(tmp_path / "o")], ROOT)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if "Warning" not in l and "warn" not in l]
    assert len(lines) == 1 and "VOC2007" in lines[0], proc.stderr


def test_teacher_stage_is_keyed_by_the_whole_teacher_config(tmp_path):
    from vild_d2.pipeline.run import PipelineOptions, ShapesPipeline
    from vild_d2.teacher import TeacherConfig

    opts = PipelineOptions(output_dir=str(tmp_path / "o"), seed=3, teacher={"steps": 7})
    (stage,) = ShapesPipeline(opts).beside_stage1([])
    # defaults count too: a teacher trained under other defaults is not reused
    assert stage["key"]["teacher"] == TeacherConfig(seed=3, steps=7).cache_key()
    assert "other_objects_fraction" in stage["key"]["teacher"]


def test_a_stale_clip_cache_is_removed_before_it_is_rebuilt(tmp_path):
    from vild_d2.pipeline.run import PipelineOptions, ShapesPipeline

    pipeline = ShapesPipeline(PipelineOptions(output_dir=str(tmp_path / "o")))
    stage = pipeline.precompute_stage("stage1.pth", ["stage1"])
    manifest = tmp_path / "o" / "clip_cache" / "manifest.json"
    assert stage["outputs"] == [str(manifest)]
    manifest.parent.mkdir(parents=True)
    manifest.write_text("{}")
    stage["clean"]()
    assert not manifest.parent.exists()
