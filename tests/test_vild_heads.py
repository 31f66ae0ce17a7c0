"""ViLD heads on hand-made tensors, in the style of detectron2's tests/modeling/test_fast_rcnn.py."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.roi_heads import build_roi_heads
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from vild_d2 import add_vild_config
from vild_d2.data.datasets import register_ovd_voc
from vild_d2.modeling import ViLDTextPredictor, image_distillation_loss

DIM = 8
# metadata only: a 4-class split whose base (training) vocabulary has 3 classes
register_ovd_voc("heads_test_base", "unused", "train",
                 {"name": "h", "classes": ["a", "b", "c", "d"], "novel_classes": ["d"]}, "base")


def _predictor(num_classes=3, feat=16, seed=0, **kw):
    torch.manual_seed(seed)
    text = F.normalize(torch.randn(num_classes, DIM), dim=-1)
    return ViLDTextPredictor(
        ShapeSpec(channels=feat), box2box_transform=Box2BoxTransform((10, 10, 5, 5)),
        text_embeddings=text, **kw,
    )


def _proposals(n, gt_classes, size=(32, 32)):
    p = Instances(size)
    p.proposal_boxes = Boxes(torch.tensor([[1.0, 1, 10, 10]] * n))
    p.gt_boxes = Boxes(torch.tensor([[2.0, 2, 11, 11]] * n))
    p.gt_classes = torch.tensor(gt_classes)
    return p


def test_region_equal_to_class_embedding_wins():
    pred = _predictor()
    logits = pred.classify(pred.text_embeddings[[2, 0]])
    assert logits.shape == (2, 4)  # 3 classes + background (last)
    assert logits.argmax(1).tolist() == [2, 0]
    # cosine 1 over temperature 0.01
    assert torch.allclose(logits[0, 2], torch.tensor(100.0))


def test_logits_are_cosine_over_temperature():
    pred = _predictor(temperature=0.05)
    x = torch.randn(5, 16)
    logits, deltas = pred(x)
    emb = F.normalize(pred.projection(x), dim=-1)
    bg = F.normalize(pred.background, dim=0)
    expected = torch.cat([emb @ pred.text_embeddings.t(), (emb @ bg)[:, None]], 1) / 0.05
    assert torch.allclose(logits, expected, atol=1e-5)
    assert deltas.shape == (5, 4)  # class-agnostic regression


def test_gradients_reach_background_but_not_text_embeddings():
    pred = _predictor()
    x = torch.randn(6, 16)
    with EventStorage():
        losses = pred.losses(pred(x), [_proposals(6, [0, 1, 2, 3, 3, 1])])
    sum(losses.values()).backward()
    assert pred.background.grad is not None and pred.background.grad.abs().sum() > 0
    assert not pred.text_embeddings.requires_grad
    assert "text_embeddings" not in dict(pred.named_parameters())
    assert "text_embeddings" not in pred.state_dict()  # the vocabulary is not part of the weights


def test_vocabulary_swap_changes_classes_and_scores():
    pred = _predictor(num_classes=3).eval()
    x = torch.randn(4, 16)
    before = pred(x)[0]
    new = F.normalize(torch.randn(7, DIM), dim=-1)
    pred.set_vocabulary(new)
    after = pred(x)[0]
    assert before.shape == (4, 4) and after.shape == (4, 8)
    assert pred.num_classes == 7
    assert torch.allclose(after[:, :7], pred.region_embeddings(x) @ new.t() / 0.01, atol=1e-4)
    with pytest.raises(ValueError, match="expected \\[num_classes, 8\\]"):
        pred.set_vocabulary(torch.randn(3, DIM + 1))


def test_text_loss_weight_zero_disables_classification_loss():
    pred = _predictor(text_loss_weight=0.0)
    with EventStorage():
        losses = pred.losses(pred(torch.randn(3, 16)), [_proposals(3, [0, 1, 3])])
    assert losses["loss_cls"].item() == 0.0 and losses["loss_box_reg"].item() > 0


def test_l1_distillation_loss():
    a = F.normalize(torch.randn(5, DIM, generator=torch.Generator().manual_seed(0)), dim=-1)
    assert image_distillation_loss(a, a.clone()).item() == 0.0
    b = a.clone()
    b[0] += 0.5
    # sum over dimensions, mean over RoIs
    assert torch.isclose(image_distillation_loss(a, b), torch.tensor(0.5 * DIM / 5))
    assert image_distillation_loss(a[:0], b[:0]).item() == 0.0


def test_ensemble_scores_by_hand():
    """Two boxes, three classes, the middle one novel, as the official code scores them: the text
    head's softmax over classes and background, the image head's over the classes alone, then
    base p_text^(2/3) p_image^(1/3) and novel p_text^(1/3) p_image^(2/3)."""
    pred = _predictor(num_classes=3, novel_class_mask=torch.tensor([False, True, False]))
    text = torch.tensor([[2.0, 1.0, 0.0, 1.0], [0.0, 0.0, 3.0, -1.0]])
    image = torch.tensor([[0.0, 2.0, 1.0, 5.0], [1.0, 1.0, 1.0, -7.0]])  # its background is ignored
    probs = pred.ensemble_probs(text, image, 2.0 / 3.0)
    # e.g. box 1, class 0: softmax([2, 1, 0, 1])[0] = 0.534447, softmax([0, 2, 1])[0] = 0.090031,
    # 0.534447^(2/3) x 0.090031^(1/3) = 0.295166
    want = torch.tensor([[0.295166, 0.443121, 0.108585], [0.087117, 0.170409, 0.643715]])
    assert torch.allclose(probs[:, :3], want, atol=1e-6)
    assert torch.allclose(probs[:, 3], torch.tensor([0.196612, 0.016384]), atol=1e-6)  # text's background
    image_alone = pred.image_probs(image)
    assert torch.allclose(image_alone[0, :3], torch.tensor([0.090031, 0.665241, 0.244728]), atol=1e-6)
    assert image_alone[:, 3].tolist() == [0.0, 0.0]


# ---- the ROI heads built from a config ------------------------------------------------------


def _roi_cfg(tmp_path, mode, num_classes=3, assignment="iou"):
    cfg = get_cfg()
    add_vild_config(cfg)
    path = tmp_path / "text.npy"
    # a generator of its own: the class embeddings must not depend on the tests that ran before
    text = torch.randn(num_classes, DIM, generator=torch.Generator().manual_seed(7))
    np.save(path, F.normalize(text, dim=-1).numpy())
    cfg.merge_from_list([
        "MODEL.ROI_HEADS.NAME", "ViLDROIHeads", "MODEL.ROI_HEADS.IN_FEATURES", ["p2"],
        "MODEL.ROI_BOX_HEAD.NAME", "FastRCNNConvFCHead", "MODEL.ROI_BOX_HEAD.NUM_FC", 1,
        "MODEL.ROI_BOX_HEAD.FC_DIM", 32, "MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", 4,
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 16, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0,
        "MODEL.VILD.MODE", mode, "MODEL.VILD.EMBED_DIM", DIM,
        "MODEL.VILD.TEXT_EMBEDDINGS_PATH", str(path), "MODEL.VILD.LABEL_ASSIGNMENT", assignment,
        "DATASETS.TRAIN", ("heads_test_base",),
    ])
    return cfg


def _roi_inputs(num_gt=2, num_distill=5):
    torch.manual_seed(1)
    features = {"p2": torch.randn(2, 8, 16, 16)}
    proposals, targets, distill = [], [], []
    for _ in range(2):
        p = Instances((64, 64))
        p.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 30, 30], [10, 10, 50, 50], [5, 5, 60, 60]]))
        p.objectness_logits = torch.tensor([1.0, 0.5, 0.2])
        proposals.append(p)
        t = Instances((64, 64))
        t.gt_boxes = Boxes(torch.tensor([[0.0, 0, 30, 30], [12, 12, 48, 48]])[:num_gt])
        t.gt_classes = torch.tensor([0, 2])[:num_gt]
        targets.append(t)
        d = Instances((64, 64))
        d.proposal_boxes = Boxes(torch.cat([torch.rand(num_distill, 2) * 20, 30 + torch.rand(num_distill, 2) * 30], 1))
        d.clip_embeddings = F.normalize(torch.randn(num_distill, DIM), dim=-1)
        d.objectness = torch.rand(num_distill)
        distill.append(d)
    return features, proposals, targets, distill


@pytest.mark.parametrize("mode", ["text", "vild", "image", "ensemble"])
def test_roi_heads_losses_per_mode(tmp_path, mode):
    cfg = _roi_cfg(tmp_path, mode)
    torch.manual_seed(0)  # the heads' initial weights
    heads = build_roi_heads(cfg, {"p2": ShapeSpec(channels=8, stride=4)})
    features, proposals, targets, distill = _roi_inputs()
    with EventStorage():
        _, losses = heads(None, features, proposals, targets, distill_targets=distill)
    assert set(losses) == {"loss_cls", "loss_box_reg", "loss_image"}
    if mode == "text":
        assert losses["loss_image"].item() == 0.0
    else:
        assert losses["loss_image"].item() > 0
    if mode == "image":
        assert losses["loss_cls"].item() == 0.0
    sum(losses.values()).backward()
    if mode == "ensemble":
        assert heads.image_projection.weight.grad.abs().sum() > 0
    heads.eval()
    with torch.no_grad():
        out, _ = heads(None, features, proposals)
    assert len(out) == 2 and len(out[0]) > 0 and (out[0].pred_classes < 3).all()


def test_distillation_rois_take_no_part_in_text_losses(tmp_path):
    cfg = _roi_cfg(tmp_path, "vild")
    torch.manual_seed(0)  # the heads' initial weights
    heads = build_roi_heads(cfg, {"p2": ShapeSpec(channels=8, stride=4)})
    features, proposals, targets, distill = _roi_inputs()
    torch.manual_seed(5)
    with EventStorage():
        _, with_distill = heads(None, features, [p[:] for p in proposals], targets, distill)
    torch.manual_seed(5)
    with EventStorage():
        _, without = heads(None, features, [p[:] for p in proposals], targets, None)
    for k in ("loss_cls", "loss_box_reg"):
        assert torch.allclose(with_distill[k], without[k], atol=1e-6)
    assert without["loss_image"].item() == 0.0


def test_images_without_annotations_and_empty_distillation(tmp_path):
    cfg = _roi_cfg(tmp_path, "vild")
    torch.manual_seed(0)  # the heads' initial weights
    heads = build_roi_heads(cfg, {"p2": ShapeSpec(channels=8, stride=4)})
    features, proposals, targets, distill = _roi_inputs(num_gt=0, num_distill=0)
    with EventStorage():
        _, losses = heads(None, features, proposals, targets, distill)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_box_reg"].item() == 0.0 and losses["loss_image"].item() == 0.0


def test_background_rois_on_unlabelled_objects_leave_the_text_loss(tmp_path):
    cfg = _roi_cfg(tmp_path, "vild")
    cfg.MODEL.VILD.UNLABELLED_OBJECTNESS = 0.5
    torch.manual_seed(0)  # the heads' initial weights
    heads = build_roi_heads(cfg, {"p2": ShapeSpec(channels=8, stride=4)})
    props = Instances((64, 64))
    # labelled object, background RoI on an unlabelled object, plain background RoI
    props.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 20, 20], [40, 40, 60, 60], [20, 40, 30, 60]]))
    props.gt_classes = torch.tensor([0, 3, 3])
    tgts = Instances((64, 64))
    tgts.gt_boxes = Boxes(torch.tensor([[0.0, 0, 20, 20]]))
    tgts.gt_classes = torch.tensor([0])
    cached = Instances((64, 64))
    # a confident box on the labelled object, one on the unlabelled object, a weak one elsewhere
    cached.proposal_boxes = Boxes(torch.tensor([[1.0, 1, 20, 20], [41, 41, 60, 60], [20, 40, 30, 60]]))
    cached.objectness = torch.tensor([0.9, 0.8, 0.2])
    keep = heads._not_on_unlabelled_objects([props], [cached], [tgts])
    assert keep[0].tolist() == [True, False, True]
    heads.unlabelled_objectness = 0.1  # now the weak box is an unlabelled object too
    assert heads._not_on_unlabelled_objects([props], [cached], [tgts])[0].tolist() == [True, False, False]
    heads.unlabelled_objectness = 0.0
    assert heads._not_on_unlabelled_objects([props], [cached], [tgts]) is None
    heads.unlabelled_objectness = 0.01
    features, proposals, targets, distill = _roi_inputs()
    with EventStorage() as storage:
        _, losses = heads(None, features, proposals, targets, distill)
        assert "roi_head/num_unlabelled_ignored" in storage.latest()
    assert all(torch.isfinite(v) for v in losses.values())


def test_iot_assigns_a_box_inside_a_large_proposal(tmp_path):
    features, proposals, targets, _ = _roi_inputs()
    big = Instances((64, 64))
    big.proposal_boxes = Boxes(torch.tensor([[0.0, 0, 64, 64]]))
    big.objectness_logits = torch.tensor([1.0])
    small = Instances((64, 64))
    small.gt_boxes = Boxes(torch.tensor([[20.0, 20, 30, 30]]))
    small.gt_classes = torch.tensor([1])
    shape = {"p2": ShapeSpec(channels=8, stride=4)}
    for assignment, expected in (("iou", 3), ("iot", 1)):  # 3 = background (num_classes)
        cfg = _roi_cfg(tmp_path, "vild", assignment=assignment)
        cfg.MODEL.ROI_HEADS.PROPOSAL_APPEND_GT = False
        heads = build_roi_heads(cfg, shape)
        with EventStorage():
            labelled = heads.label_and_sample_proposals([big], [small])
        assert labelled[0].gt_classes.tolist() == [expected]


def test_ensemble_heads_read_alone(tmp_path):
    cfg = _roi_cfg(tmp_path, "ensemble")
    cfg.MODEL.VILD.TEMPERATURE = 1.0  # no probability is a denormal
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 1.0  # every (box, class) pair is a detection
    shape = {"p2": ShapeSpec(channels=8, stride=4)}
    features, proposals, _, _ = _roi_inputs()
    novel = torch.tensor([False, True, False])
    for head in ("ensemble", "text", "image"):
        cfg.MODEL.VILD.ENSEMBLE_TEST_HEAD = head
        torch.manual_seed(0)
        heads = build_roi_heads(cfg, shape).eval()
        predictor = heads.box_predictor
        predictor.set_vocabulary(predictor.text_embeddings, novel)
        with torch.no_grad():
            out, _ = heads(None, features, [p[:] for p in proposals])
            # the two heads' logits on image 0's three proposals, by hand
            pooled = heads.box_pooler([features["p2"]], [p.proposal_boxes for p in proposals])[:3]
            text = predictor(heads.box_head(pooled))[0]
            image = predictor.classify(predictor.region_embeddings(heads.image_box_head(pooled),
                                                                   heads.image_projection))
        p_text, p_image = text.softmax(-1), image[:, :3].softmax(-1)
        lam = 2.0 / 3.0  # base: p_text^(2/3) p_image^(1/3); novel: p_text^(1/3) p_image^(2/3)
        w = torch.where(novel, 1 - lam, lam)
        want = {"text": p_text[:, :3], "image": p_image[:, :3],
                "ensemble": p_text[:, :3] ** w * p_image[:, :3] ** (1 - w)}[head]
        assert torch.allclose(out[0].scores.sort().values, want.flatten().sort().values, rtol=1e-5), head


@pytest.mark.parametrize("mode", ["vild", "ensemble"])
def test_objectness_weight_scales_test_scores(tmp_path, mode):
    cfg = _roi_cfg(tmp_path, mode)
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 1.0  # every box survives, one detection per class and box
    # at temperature 0.01 the least likely classes' probabilities are float32 denormals, whose
    # products lose digits; at 1 every probability keeps full precision
    cfg.MODEL.VILD.TEMPERATURE = 1.0
    shape = {"p2": ShapeSpec(channels=8, stride=4)}
    features, proposals, _, _ = _roi_inputs()

    def build(weight):
        cfg.MODEL.VILD.OBJECTNESS_WEIGHT = weight
        torch.manual_seed(0)
        return build_roi_heads(cfg, shape).eval()

    def detections(heads):
        with torch.no_grad():
            out, _ = heads(None, features, [p[:] for p in proposals])
        return out[0]

    heads = build(0.0)
    plain, weighted = detections(heads), detections(build(2.0))
    # the box each proposal of image 0 regresses to (class-agnostic): it names a detection's proposal
    with torch.no_grad():
        pooled = heads.box_pooler([features["p2"]], [p.proposal_boxes for p in proposals])
        predictions = heads.box_predictor(heads.box_head(pooled))
        boxes = heads.box_predictor.predict_boxes(predictions, proposals)[0]
    boxes = Boxes(boxes)
    boxes.clip(proposals[0].image_size)
    objectness = proposals[0].objectness_logits.sigmoid()
    assert len(plain) == len(weighted) == 3 * len(proposals[0])  # 3 classes x 3 boxes, none dropped
    for i in range(len(plain)):
        (k,) = [j for j in range(len(weighted))
                if weighted.pred_classes[j] == plain.pred_classes[i]
                and torch.equal(weighted.pred_boxes.tensor[j], plain.pred_boxes.tensor[i])]
        (proposal,) = [p for p in range(len(boxes))
                       if torch.equal(boxes.tensor[p], plain.pred_boxes.tensor[i])]
        assert torch.isclose(weighted.scores[k], plain.scores[i] * objectness[proposal] ** 2, rtol=1e-5)
    with pytest.raises(ValueError, match="OBJECTNESS_WEIGHT"):
        build(-1.0)


@pytest.mark.parametrize("mode,head", [("image", "ensemble"), ("ensemble", "image"),
                                       ("ensemble", "text"), ("vild", "ensemble")])
def test_image_temperature_rescales_the_distilled_head_alone(tmp_path, mode, head):
    shape = {"p2": ShapeSpec(channels=8, stride=4)}
    features, proposals, _, _ = _roi_inputs()
    base = _roi_cfg(tmp_path, mode)  # one draw of the random class embeddings

    def scores(temperature, image_temperature):
        cfg = base.clone()
        cfg.MODEL.VILD.ENSEMBLE_TEST_HEAD = head
        cfg.MODEL.VILD.TEMPERATURE = temperature
        cfg.MODEL.VILD.IMAGE_TEMPERATURE = image_temperature
        torch.manual_seed(0)
        heads = build_roi_heads(cfg, shape).eval()
        with torch.no_grad():
            out, _ = heads(None, features, [p[:] for p in proposals])
        return out[0].scores.sort().values

    rescaled = scores(0.01, 0.05)
    if (mode, head) in (("image", "ensemble"), ("ensemble", "image")):
        # the distilled head read alone at 0.05 is the model built with a temperature of 0.05
        assert torch.allclose(rescaled, scores(0.05, 0.0), atol=1e-6)
        assert not torch.allclose(rescaled[:5], scores(0.01, 0.0)[:5])
    else:  # heads trained with the classification loss keep their temperature
        assert torch.equal(rescaled, scores(0.01, 0.0))
    with pytest.raises(ValueError, match="IMAGE_TEMPERATURE"):
        scores(0.01, -1.0)
