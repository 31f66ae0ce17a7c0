"""CLIP on cropped regions: its scores on a hand-computed case, and the meta-architecture built from
its config (a random stage-1 detector and a tiny random CLIP in OpenAI's archive format)."""
import os

import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP
from detectron2.data.detection_utils import read_image
from detectron2.modeling import GeneralizedRCNN, build_model

from vild_d2.baselines import CLIPOnCropsRCNN, clip_on_crops_scores
from vild_d2.distill import select_proposals
from vild_d2.engine import load_cfg
from vild_d2.shapes_world.archive import save_openai_archive
from vild_d2.shapes_world.generator import WorldConfig, ensure_world

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "shapes_ovd", "clip_on_crops.yaml")


def test_scores_by_hand():
    # region 1 is class 0's own embedding, region 2 lies between the two classes
    regions = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    objectness = torch.tensor([0.5, 1.0])
    scores = clip_on_crops_scores(regions, torch.eye(2), objectness, temperature=0.5)
    # softmax([1, 0] / 0.5) = [e^2, 1] / (e^2 + 1); softmax([0.6, 0.8] / 0.5) = [e^1.2, e^1.6] / sum
    want = torch.tensor([[0.5 * 0.880797, 0.5 * 0.119203, 0.0], [0.401312, 0.598688, 0.0]])
    assert torch.allclose(scores, want, atol=1e-6)


@pytest.fixture(scope="module")
def clip_archive(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("clip") / "tiny_clip.pt")
    torch.manual_seed(0)
    save_openai_archive(CLIP(32, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1).float().eval(), path)
    return path


def _cfg(clip_archive, *opts):
    return load_cfg(CONFIG, ["MODEL.WEIGHTS", "", "MODEL.VILD.CLIP_MODEL", clip_archive,
                             "MODEL.VILD.EMBED_DIM", "32", *opts])


@pytest.mark.parametrize("opts", [("MODEL.VILD.IMAGE_TEMPERATURE", "-0.07"),
                                  ("MODEL.VILD.IMAGE_TEMPERATURE", "0.0", "MODEL.VILD.TEMPERATURE", "0.0")])
def test_a_temperature_that_is_not_positive_is_refused(clip_archive, opts):
    with pytest.raises(ValueError, match="IMAGE_TEMPERATURE"):
        build_model(_cfg(clip_archive, *opts))


def test_detections_are_the_hand_formula_on_the_stage1_proposals(clip_archive, tmp_path):
    world = ensure_world(str(tmp_path / "shapes_ovd"), WorldConfig(num_trainval=2, num_test=2, num_teacher=0,
                                                                  num_teacher_val=0, image_size=96),
                         progress=False, workers=1)
    torch.manual_seed(0)
    cfg = _cfg(clip_archive, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", "0.0",
               "MODEL.ROI_HEADS.NMS_THRESH_TEST", "1.0", "TEST.DETECTIONS_PER_IMAGE", "-1")
    model = build_model(cfg).eval()
    assert isinstance(model, CLIPOnCropsRCNN)
    assert not any(k.startswith("encoder") for k in model.state_dict())  # CLIP is not the checkpoint's
    text = F.normalize(torch.randn(3, 32), dim=-1)
    model.set_vocabulary(text)
    path = os.path.join(world, "JPEGImages", "test_000000.jpg")
    image = read_image(path, format="BGR")
    inputs = [{"file_name": path, "image": torch.as_tensor(image.transpose(2, 0, 1).copy()).float(),
               "height": 96, "width": 96}]
    with torch.no_grad():
        (out,) = model(inputs)
        # the stage-1 detector's own detections: every one is a candidate region
        (stage1,) = [d["instances"] for d in GeneralizedRCNN.inference(model, inputs)]
    # the cache's selection of stage-1 detections (tested in test_region_crops.py)
    boxes, objectness = select_proposals(stage1.pred_boxes.tensor, stage1.scores, (96, 96),
                                         cfg.MODEL.VILD.DISTILL.NUM_PROPOSALS, cfg.MODEL.VILD.DISTILL.MIN_BOX_SIZE)
    rgb = torch.from_numpy(read_image(path, format="RGB").transpose(2, 0, 1).copy())
    emb = torch.as_tensor(model.encoder([rgb], [boxes])[0]).float()
    want = clip_on_crops_scores(emb, text, objectness, cfg.MODEL.VILD.IMAGE_TEMPERATURE)[:, :3]
    # every (box, class) pair is a detection here (no threshold, no suppression, no cap)
    inst = out["instances"]
    assert len(inst) == want.numel() > 0
    got = torch.zeros_like(want)
    for box, cls, score in zip(inst.pred_boxes.tensor, inst.pred_classes, inst.scores):
        (row,) = [i for i in range(len(boxes)) if torch.equal(boxes[i], box)]
        got[row, cls] = score
    assert torch.allclose(got, want, rtol=1e-5)
    model.train()
    with pytest.raises(ValueError, match="training-free"):
        model(inputs)
