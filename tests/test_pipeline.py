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


@pytest.mark.parametrize("novel, message", [
    ("red circle,purple circle", "purple"),
    ("red circle,red square,red triangle,red star", "red"),
])
def test_invalid_novel_classes_are_one_line_errors(tmp_path, novel, message):
    proc = _run(["--quick", "--novel-classes", novel, "--output-dir", str(tmp_path / "o"),
                 "--datasets-dir", str(tmp_path / "ds")], ROOT)
    assert proc.returncode == 2
    lines = [l for l in proc.stderr.strip().splitlines() if "Warning" not in l and "warn" not in l]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (tmp_path / "ds").exists()
