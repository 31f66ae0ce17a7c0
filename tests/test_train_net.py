"""Training on a tiny embedded world: the loss goes down, every mode trains and evaluates through
tools/train_net.py, and a 2-process (gloo) run completes."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from vild_d2.distill.embedding_cache import CacheEntry, write_cache
from vild_d2.shapes_world.generator import CLASS_NAMES, WorldConfig, ensure_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_NET = os.path.join(ROOT, "tools", "train_net.py")
DIM = 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 96 px world with a random-text vocabulary and a cache of random proposals."""
    base = tmp_path_factory.mktemp("tiny")
    root = str(base / "datasets")
    cfg = WorldConfig(seed=3, num_trainval=8, num_test=4, num_teacher=0, num_teacher_val=0,
                      image_size=96)
    world = ensure_world(os.path.join(root, "shapes_ovd"), cfg, progress=False)
    rng = np.random.default_rng(0)
    # one file for every world class; train (12) and test (16) vocabularies pick rows by name
    names = list(CLASS_NAMES) + ["circle", "square", "triangle", "star", "red", "green", "blue", "yellow"]
    np.save(base / "text.npy", rng.normal(size=(len(names), DIM)).astype(np.float32))
    (base / "text.json").write_text(json.dumps({"names": names}))
    entries = []
    with open(os.path.join(world, "ImageSets", "Main", "trainval.txt")) as f:
        for image_id in f.read().split():
            xy = rng.uniform(0, 60, size=(10, 2))
            boxes = np.concatenate([xy, xy + rng.uniform(8, 30, size=(10, 2))], 1)
            emb = rng.normal(size=(10, DIM))
            emb /= np.linalg.norm(emb, axis=1, keepdims=True)
            entries.append((image_id, CacheEntry(boxes, np.ones(10), emb.astype(np.float16))))
    write_cache(str(base / "cache"), entries, {"embed_dim": DIM, "crop_scales": [1.0, 1.5]})
    return base


def _opts(tiny, extra=()):
    return [
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.VILD.EMBED_DIM", str(DIM),
        "MODEL.VILD.TEXT_EMBEDDINGS_PATH", str(tiny / "text.npy"),
        "MODEL.VILD.DISTILL.CACHE_DIR", str(tiny / "cache"),
        "INPUT.MIN_SIZE_TRAIN", "(96,)", "INPUT.MAX_SIZE_TRAIN", "96",
        "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.WARMUP_ITERS", "0", "DATALOADER.NUM_WORKERS", "0",
        "TEST.EVAL_PERIOD", "0", *extra,
    ]


def _run(tiny, config, extra=(), args=()):
    env = dict(os.environ, DETECTRON2_DATASETS=str(tiny / "datasets"))
    cmd = [sys.executable, TRAIN_NET, "--config-file", os.path.join(ROOT, config), "--threads", "1",
           *args, *_opts(tiny, extra)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(tiny), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def test_a_few_iterations_lower_the_loss(tiny):
    from detectron2.config import get_cfg

    from vild_d2 import add_vild_config
    from vild_d2.data.datasets import register_shapes_ovd
    from vild_d2.engine import ViLDTrainer

    from detectron2.utils.env import seed_all_rng

    register_shapes_ovd(str(tiny / "datasets"), name="shapes_ovd", prefix="tinyloss")
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file(os.path.join(ROOT, "configs/shapes_ovd/vild.yaml"))
    cfg.merge_from_list(_opts(tiny, ["DATASETS.TRAIN", "('tinyloss_trainval_base',)",
                                     "DATASETS.TEST", "()", "SOLVER.MAX_ITER", "30",
                                     "SOLVER.OPTIMIZER", "SGD", "SOLVER.BASE_LR", "0.01",
                                     "OUTPUT_DIR", str(tiny / "loss_run"), "SOLVER.IMS_PER_BATCH", "4",
                                     "SEED", "0"]))
    # the data order and flips come from numpy's global RNG, the weights from torch's
    seed_all_rng(0)
    trainer = ViLDTrainer(cfg)
    trainer.train()
    losses = trainer.storage.history("total_loss").values()
    image = trainer.storage.history("loss_image").values()
    first, last = np.mean([v for v, _ in losses[:5]]), np.mean([v for v, _ in losses[-5:]])
    assert last < 0.8 * first, (first, last)
    assert image[-1][0] < image[0][0]


@pytest.mark.parametrize("mode", ["vild_text", "vild", "vild_image", "vild_ensemble"])
def test_train_net_trains_and_evaluates_each_mode(tiny, mode):
    out_dir = str(tiny / mode)
    summary = os.path.join(out_dir, "inference", "ovd_results_shapes_ovd_test.json")
    _run(tiny, f"configs/shapes_ovd/{mode}.yaml", ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out_dir])
    assert torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["iteration"] == 1
    os.remove(summary)  # written by the evaluation that ends the training; --eval-only writes it again
    # evaluation on the 16-class test vocabulary with the 12-class training checkpoint
    log = _run(tiny, f"configs/shapes_ovd/{mode}.yaml",
               ["MODEL.WEIGHTS", os.path.join(out_dir, "model_final.pth"), "OUTPUT_DIR", out_dir],
               args=["--eval-only"])
    assert "16-class vocabulary (4 novel)" in log
    with open(summary) as f:
        result = json.load(f)
    ap = result["per_class_ap50"]
    # classes without a box among the 4 test images have no AP and are left out of the means
    assert set(ap) <= set(CLASS_NAMES) and len(ap) >= 4
    assert result["metrics"]["AP50"] == pytest.approx(np.mean(list(ap.values())))
    novel = result["novel_classes"]  # the novel classes with ground truth here
    assert novel and set(novel) <= set(ap)
    assert result["metrics"]["AP50_novel"] == pytest.approx(np.mean([ap[c] for c in novel]))
    assert result["metrics"]["AP50_base"] == pytest.approx(np.mean([ap[c] for c in ap if c not in novel]))
    assert 0 < result["model_seconds_per_image"] < 60


def test_two_process_cpu_training(tiny):
    out_dir = str(tiny / "ddp")
    log = _run(tiny, "configs/shapes_ovd/vild.yaml",
               ["SOLVER.MAX_ITER", "2", "OUTPUT_DIR", out_dir, "DATASETS.TEST", "()"],
               args=["--num-gpus", "2"])
    assert torch.load(os.path.join(out_dir, "model_final.pth"), weights_only=False)["iteration"] == 1
    assert "World size: 2" in log


def test_demo_with_a_custom_vocabulary_and_attributes(tiny):
    from detectron2.data.detection_utils import read_image

    from vild_d2.engine import OVDPredictor, load_cfg

    out_dir = str(tiny / "demo_model")
    _run(tiny, "configs/shapes_ovd/vild.yaml", ["SOLVER.MAX_ITER", "1", "OUTPUT_DIR", out_dir,
                                                 "DATASETS.TEST", "()"])
    weights = os.path.join(out_dir, "model_final.pth")
    opts = ["MODEL.VILD.EMBED_DIM", str(DIM), "MODEL.VILD.TEXT_EMBEDDINGS_PATH", str(tiny / "text.npy"),
            "INPUT.MIN_SIZE_TEST", "96", "INPUT.MAX_SIZE_TEST", "96"]

    # attributes: the same boxes as the objects alone, each scored p(object) x p(attribute)
    objects, attributes = ["circle", "square", "triangle", "star"], ["red", "green", "blue", "yellow"]
    cfg = load_cfg(os.path.join(ROOT, "configs/shapes_ovd/vild.yaml"),
                   ["MODEL.WEIGHTS", weights, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0", *opts])
    image = read_image(str(tiny / "datasets" / "shapes_ovd" / "JPEGImages" / "test_000000.jpg"), format="BGR")
    plain = OVDPredictor(cfg, objects)(image)
    expanded = OVDPredictor(cfg, objects, attributes=attributes)(image)
    p, a = plain["instances"], expanded["instances"]
    assert len(a) > 0 and torch.equal(p.pred_boxes.tensor, a.pred_boxes.tensor)
    assert torch.allclose(a.scores, p.scores * a.attribute_scores)
    assert ((a.attribute_scores >= 1 / len(attributes)) & (a.attribute_scores <= 1)).all()
    assert plain["labels"] == [objects[c] for c in p.pred_classes.tolist()]
    assert expanded["labels"] == [f"{attributes[k]} {objects[c]}"
                                  for k, c in zip(a.attributes.tolist(), a.pred_classes.tolist())]

    # the tool: one picture per image, and its detections are the predictor's
    images = str(tiny / "datasets" / "shapes_ovd" / "JPEGImages")
    env = dict(os.environ, DETECTRON2_DATASETS=str(tiny / "datasets"))
    common = [sys.executable, os.path.join(ROOT, "tools", "demo.py"), "--config-file",
              os.path.join(ROOT, "configs/shapes_ovd/vild.yaml"), "--weights", weights, "--input",
              images, "--max-images", "2", "--score-thresh", "0"]
    out = str(tiny / "demo_out")
    proc = subprocess.run([*common, "--output", out, "--vocabulary", "red circle,blue star", *opts,
                           "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert sorted(os.listdir(out)) == ["test_000000.png", "test_000001.png"]
    first = OVDPredictor(cfg, ["red circle", "blue star"])(image)
    assert f"test_000000.jpg: {len(first['instances'])} detections" in proc.stdout
    bad = subprocess.run([*common, "--output", str(tiny / "x"), "--vocabulary", "", *opts], env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "vocabulary" in bad.stderr.strip().splitlines()[-1]
