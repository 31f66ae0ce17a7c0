"""The package as a wheel: every subpackage and its data files in it, and a non-editable install
into a fresh folder that the tools use from outside the checkout."""
import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# what the package needs besides its Python modules
DATA = ("vild_d2/distill/csrc/region_crops.c", "vild_d2/teacher/prompts/vild.txt", "vild_d2/data/metadata/voc_16_4.json",
        "vild_d2/data/metadata/coco_48_17.json", "vild_d2/data/metadata/shapes_ovd_12_4.json")


def _package_files():
    out = set()
    for dirpath, _, files in os.walk(os.path.join(ROOT, "vild_d2")):
        for f in files:
            if f.endswith((".py", ".c", ".json", ".txt")):
                out.add(os.path.relpath(os.path.join(dirpath, f), ROOT).replace(os.sep, "/"))
    return out


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the sources (the build leaves nothing in the checkout)."""
    src = tmp_path_factory.mktemp("src")
    for name in ("setup.py", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    shutil.copytree(os.path.join(ROOT, "vild_d2"), src / "vild_d2",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path_factory.mktemp("dist")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                           "--disable-pip-version-check", "-q", "-w", str(dist), str(src)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = dist.glob("vild_d2-*.whl")
    return path


def test_the_wheel_holds_every_module_and_data_file(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = {n for n in z.namelist() if n.startswith("vild_d2/")}
    assert set(DATA) <= names
    missing = _package_files() - names
    assert not missing, missing
    assert not [n for n in names if "__pycache__" in n or n.startswith(("tests/", "tools/"))]


def test_the_tools_run_from_outside_the_checkout_on_a_plain_install(wheel, tmp_path):
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-compile",
                           "--disable-pip-version-check", "-q", "--target", str(target), str(wheel)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), VILD_D2_BUILD_DIR=str(tmp_path / "build"))

    def run(*args):
        out = subprocess.run([sys.executable, *args], cwd=elsewhere, env=env, capture_output=True,
                             text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    # the installed package, not the checkout's; its split files; its crop kernel built from the
    # installed C source
    check = ("import vild_d2, vild_d2.engine, vild_d2.pipeline.run, vild_d2.shapes_world; "
             "from vild_d2.data import load_split; from vild_d2.distill import crop_kernel; "
             "print(vild_d2.__file__); print(load_split('voc_16_4').novel_classes); "
             "print(crop_kernel.kernel() is not None); "
             "from vild_d2.teacher import prompt_set; print(len(prompt_set('vild').templates))")
    lines = run("-c", check).split("\n")
    assert lines[0].startswith(str(target))
    assert lines[1] == "['car', 'dog', 'sofa', 'train']"
    assert lines[2] == ("True" if shutil.which(os.environ.get("CC", "cc")) else "False")
    assert lines[3] == "63"

    # a tool of the checkout, run from another folder on the installed package
    import torch
    from clip.model import CLIP

    torch.manual_seed(0)
    torch.save(CLIP(32, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1).state_dict(), tmp_path / "clip.pth")
    out = run(os.path.join(ROOT, "tools", "compute_text_embeddings.py"), "--clip-model",
              str(tmp_path / "clip.pth"), "--names", "coco", "--output", "coco.npy")
    assert "80 classes x 32 dims" in out and (elsewhere / "coco.npy").is_file()
    assert "usage: train_net.py" in run(os.path.join(ROOT, "tools", "train_net.py"), "--help")
