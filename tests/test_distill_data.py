"""The embedding-cache reader and the mapper that feeds cached proposals to training."""
import numpy as np
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import transforms as T

from vild_d2 import add_vild_config
from vild_d2.data.distill_mapper import DistillDatasetMapper
from vild_d2.distill.embedding_cache import CacheEntry, CacheError, EmbeddingCache, write_cache

from voc_fixtures import write_voc_tree


def _entries(rng, ids, dim=6, m=5):
    out = []
    for i in ids:
        xy = rng.uniform(0, 30, size=(m, 2))
        boxes = np.concatenate([xy, xy + rng.uniform(5, 17, size=(m, 2))], 1).astype(np.float32)
        emb = rng.normal(size=(m, dim)).astype(np.float32)
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        out.append((i, CacheEntry(boxes, np.linspace(1, 0.1, m, dtype=np.float32), emb.astype(np.float16))))
    return out


def test_cache_round_trip_and_lookup(tmp_path):
    rng = np.random.default_rng(0)
    entries = _entries(rng, ["a", "b", 7])
    write_cache(str(tmp_path), entries, {"clip_fingerprint": "abc", "crop_scales": [1.0, 1.5]})
    cache = EmbeddingCache(str(tmp_path))
    assert len(cache) == 3 and "7" in cache and 7 in cache and cache.embed_dim == 6
    for image_id, e in entries:
        got = cache.get(image_id)
        np.testing.assert_array_equal(got.boxes, e.boxes)
        np.testing.assert_array_equal(got.embeddings, e.embeddings)
    assert len(cache.get("a", top_k=2).boxes) == 2
    assert isinstance(cache.embeddings, np.memmap)
    with pytest.raises(CacheError, match="'zzz' is not in embedding cache"):
        cache.get("zzz")


def test_unfinished_cache_is_refused(tmp_path):
    with pytest.raises(CacheError, match="missing or unfinished"):
        EmbeddingCache(str(tmp_path))


def test_manifest_mismatch_names_both_values(tmp_path):
    write_cache(str(tmp_path), _entries(np.random.default_rng(0), ["a"]),
                {"clip_fingerprint": "abc", "crop_scales": [1.0, 1.5]})
    cache = EmbeddingCache(str(tmp_path))
    cache.check_compatible(crop_scales=(1.0, 1.5), embed_dim=6)
    with pytest.raises(CacheError, match=r"crop_scales=\[1.0, 1.5\] but the config asks for crop_scales=\[1.0\]"):
        cache.check_compatible(crop_scales=[1.0])
    with pytest.raises(CacheError, match="embed_dim=6 .* embed_dim=512"):
        cache.check_compatible(embed_dim=512)


def test_mapper_applies_the_image_augmentation_to_cached_boxes(tmp_path):
    images = {"img1": (64, 48, [("dog", (1, 1, 20, 20)), ("person", (10, 10, 40, 40))])}
    root = write_voc_tree(str(tmp_path / "voc"), images, {"trainval": ["img1"]})
    entries = _entries(np.random.default_rng(1), ["img1"], dim=6, m=4)
    write_cache(str(tmp_path / "cache"), entries, {})
    cache = EmbeddingCache(str(tmp_path / "cache"))
    cfg = get_cfg()
    add_vild_config(cfg)
    mapper = DistillDatasetMapper(
        cfg, is_train=True, cache=cache, num_proposals=3,
        augmentations=[T.ResizeShortestEdge(96, 1000), T.RandomFlip(prob=1.0)],
    )
    d = {"file_name": f"{root}/JPEGImages/img1.jpg", "image_id": "img1", "height": 48, "width": 64,
         "annotations": [{"bbox": [0, 0, 20, 20], "bbox_mode": 0, "category_id": 3}]}
    out = mapper(d)
    assert tuple(out["image"].shape[1:]) == (96, 128)
    distill = out["distill"]
    boxes = entries[0][1].boxes[:3] * 2.0  # resized x2
    flipped = np.stack([128 - boxes[:, 2], boxes[:, 1], 128 - boxes[:, 0], boxes[:, 3]], 1)
    np.testing.assert_allclose(distill.proposal_boxes.tensor.numpy(), flipped, atol=1e-4)
    np.testing.assert_allclose(distill.clip_embeddings.numpy(),
                               entries[0][1].embeddings[:3].astype(np.float32))
    np.testing.assert_allclose(distill.objectness.numpy(), entries[0][1].scores[:3])
    # ground truth got the same transform
    np.testing.assert_allclose(out["instances"].gt_boxes.tensor.numpy(), [[88, 0, 128, 40]])


def test_class_agnostic_mapper_makes_every_box_one_class(tmp_path):
    images = {"img1": (64, 48, [("dog", (1, 1, 20, 20))])}
    root = write_voc_tree(str(tmp_path / "voc"), images, {"trainval": ["img1"]})
    cfg = get_cfg()
    add_vild_config(cfg)
    mapper = DistillDatasetMapper(cfg, is_train=True, class_agnostic=True,
                                  augmentations=[T.ResizeShortestEdge(48, 1000)])
    d = {"file_name": f"{root}/JPEGImages/img1.jpg", "image_id": "img1", "height": 48, "width": 64,
         "annotations": [{"bbox": [0, 0, 20, 20], "bbox_mode": 0, "category_id": 11},
                         {"bbox": [5, 5, 30, 30], "bbox_mode": 0, "category_id": 4}]}
    out = mapper(d)
    assert out["instances"].gt_classes.tolist() == [0, 0] and "distill" not in out
