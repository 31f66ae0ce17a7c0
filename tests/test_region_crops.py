"""Region crops on tensors: box growth and clipping at borders, crop geometry, normalisation,
proposal selection, and the streamed cache writer."""

import os

import numpy as np
import pytest
import torch

from vild_d2.distill.cache_writer import CacheWriter, make_chunks
from vild_d2.distill.embedding_cache import CacheEntry, CacheError, EmbeddingCache, write_cache
from vild_d2.distill.proposals import select_proposals
from vild_d2.teacher.loader import CLIP_MEAN, CLIP_STD, ClipInfo, clip_normalize
from vild_d2.distill.region_crops import (
    clip_boxes_to_image,
    crop_regions,
    crop_regions_batch,
    crops_for_clip,
    expand_boxes,
    grow_boxes,
    grow_boxes_of_images,
)


def _info(resolution):
    return ClipInfo("test", "0" * 16, resolution, 8, 77, CLIP_MEAN, CLIP_STD, None)


def _image(h=40, w=60):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8)


def test_growth_is_about_the_centre_inside_the_image():
    boxes = torch.tensor([[20.0, 10.0, 30.0, 30.0]])
    np.testing.assert_allclose(expand_boxes(boxes, 1.5, (40, 60)), [[17.5, 5.0, 32.5, 35.0]])
    np.testing.assert_allclose(expand_boxes(boxes, 1.0, (40, 60)), boxes)


def test_growth_at_a_border_keeps_only_the_in_image_part():
    # a box touching the top-left corner, and one touching the bottom-right corner
    boxes = torch.tensor([[0.0, 0.0, 16.0, 16.0], [44.0, 24.0, 60.0, 40.0]])
    grown = expand_boxes(boxes, 1.5, (40, 60))
    # 1.5x would be [-4, -4, 20, 20] and [40, 20, 64, 44]: the outside part is cut off, so the
    # grown box is no longer centred on the object
    np.testing.assert_allclose(grown, [[0, 0, 20, 20], [40, 20, 60, 40]])


def test_grow_boxes_is_scale_major():
    boxes = torch.tensor([[10.0, 10.0, 20.0, 20.0], [30.0, 10.0, 40.0, 20.0]])
    grown = grow_boxes(boxes, (1.0, 2.0), (40, 60))
    np.testing.assert_allclose(grown[:2], boxes)
    np.testing.assert_allclose(grown[2:], [[5, 5, 25, 25], [25, 5, 45, 25]])


def test_boxes_of_several_images_grow_as_each_alone():
    g = torch.Generator().manual_seed(6)
    sizes = [(40, 60), (70, 30), (25, 25), (9, 13)]
    boxes = [torch.rand(m, 4, generator=g) * 80 - 5 for m in (5, 0, 7, 3)]
    together = grow_boxes_of_images(boxes, (1.0, 1.5, 2.0), sizes)
    for b, size, t in zip(boxes, sizes, together):
        alone = torch.cat([expand_boxes(b, s, size) for s in (1.0, 1.5, 2.0)])
        assert torch.equal(t, alone)


def test_an_integer_box_at_its_own_size_crops_exact_pixels():
    image = _image()
    grown = expand_boxes(torch.tensor([[0.0, 0.0, 16.0, 16.0]]), 1.5, (40, 60))
    crop = crop_regions(image.float(), grown, 20)
    torch.testing.assert_close(crop[0], image[:, :20, :20].float())
    # a 20 x 40 box is squeezed to the square: pairs of rows are averaged (2 samples per bin)
    crop = crop_regions(image.float(), torch.tensor([[10.0, 0.0, 30.0, 40.0]]), 20)
    want = image[:, 0:40, 10:30].float().view(3, 20, 2, 20).mean(2)
    torch.testing.assert_close(crop[0], want)


def test_crops_for_clip_are_normalised_crops():
    image = _image()
    boxes = torch.tensor([[3.0, 5.0, 40.0, 33.0], [0.0, 0.0, 60.0, 40.0]])
    x = crops_for_clip(image, boxes, _info(32))
    want = clip_normalize(crop_regions(image.float() / 255, boxes, 32), _info(32))
    assert x.shape == (2, 3, 32, 32)
    torch.testing.assert_close(x, want, rtol=1e-5, atol=1e-5)


def test_select_proposals_clips_filters_and_keeps_top_m():
    boxes = torch.tensor(
        [[-5.0, 0, 10, 10], [0, 0, 3, 30], [10, 10, 40, 40], [50, 50, 70, 90], [11, 11, 40, 40]]
    )
    scores = torch.tensor([0.5, 0.9, 0.7, 0.6, 0.65])
    b, s = select_proposals(boxes, scores, (60, 64), num_proposals=3, min_box_size=4)
    # the 3-pixel-wide box is dropped despite its score; the others are clipped to the image
    np.testing.assert_allclose(s, [0.7, 0.65, 0.6])
    np.testing.assert_allclose(b[2], [50, 50, 64, 60])
    b, s = select_proposals(boxes, scores, (60, 64), num_proposals=10, min_box_size=4)
    np.testing.assert_allclose(b[3], [0, 0, 10, 10])
    b, s = select_proposals(boxes, scores, (60, 64), 10, 4, nms_thresh=0.5)
    np.testing.assert_allclose(s, [0.7, 0.6, 0.5])  # the two overlapping boxes became one


def _entries(rng, n=5, dim=6):
    out = []
    for k in range(n):
        m = int(rng.integers(0, 4))
        emb = rng.normal(size=(m, dim)).astype(np.float16)
        out.append((f"im{k}", CacheEntry(rng.uniform(0, 50, (m, 4)), rng.uniform(size=m), emb)))
    return out


def test_streamed_cache_has_the_bytes_of_the_in_memory_one(tmp_path):
    entries = _entries(np.random.default_rng(0))
    rows = sum(len(e.boxes) for _, e in entries)
    write_cache(str(tmp_path / "a"), entries, {"x": 1})
    write_cache(str(tmp_path / "b"), iter(entries), {"x": 1}, embed_dim=6, num_rows=rows)
    for name in ("boxes.npy", "scores.npy", "embeddings.npy", "index.json", "manifest.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert isinstance(EmbeddingCache(str(tmp_path / "b")).embeddings, np.memmap)


def test_parts_resume_and_finalize(tmp_path):
    entries = _entries(np.random.default_rng(1), n=5)
    ids = [i for i, _ in entries]
    chunks = make_chunks(5, 2)
    assert [(c.start, c.stop) for c in chunks] == [(0, 2), (2, 4), (4, 5)]
    writer = CacheWriter(str(tmp_path), {"a": 1})
    assert not writer.is_complete()
    writer.prepare()
    writer.write_part(chunks[2], ids[4:], [e for _, e in entries[4:]])
    # a part killed mid-write leaves only a temporary file, which does not count
    (tmp_path / "parts" / (chunks[0].name + ".tmp.123")).write_bytes(b"PK\x03")
    assert writer.done(chunks) == [2]
    with pytest.raises(CacheError, match="2 chunk"):
        writer.finalize(chunks, ids, 6, {})
    for c in chunks[:2]:
        writer.write_part(c, ids[c.start : c.stop], [e for _, e in entries[c.start : c.stop]])
    manifest = writer.finalize(chunks, ids, 6, {"note": "x"})
    assert manifest["a"] == 1 and manifest["num_images"] == 5
    assert not os.path.exists(tmp_path / "parts") and writer.is_complete()
    cache = EmbeddingCache(str(tmp_path))
    for image_id, e in entries:
        np.testing.assert_array_equal(cache.get(image_id).embeddings, e.embeddings)
        np.testing.assert_array_equal(cache.get(image_id).boxes, np.float32(e.boxes))
    with pytest.raises(CacheError, match=r"a=1, but this run asks for a=2"):
        CacheWriter(str(tmp_path), {"a": 2}).is_complete()


def test_parts_of_another_key_are_not_mixed_in(tmp_path):
    CacheWriter(str(tmp_path), {"clip_fingerprint": "aaa"}).prepare()
    with pytest.raises(
        CacheError, match="clip_fingerprint='aaa', but this run asks for clip_fingerprint='bbb'"
    ):
        CacheWriter(str(tmp_path), {"clip_fingerprint": "bbb"}).prepare()


def _box_filter_weights(lo, hi, size, extent):
    """[size, extent]: each row the overlap of one bin of [lo, hi] with every pixel, over the bin's
    length (the mean over the bin of pixels taken as constant squares)."""
    edges = np.linspace(lo, hi, size + 1)
    pixels = np.arange(extent)
    overlap = np.minimum(edges[1:, None], pixels + 1) - np.maximum(edges[:-1, None], pixels)
    return np.clip(overlap, 0, None) / np.diff(edges)[:, None]


def _bilinear_weights(lo, hi, size, extent):
    """[size, extent]: bilinear sampling at the bin centres, pixel centres at i + 0.5, clamped."""
    centres = lo + (np.arange(size) + 0.5) * (hi - lo) / size - 0.5
    centres = np.clip(centres, 0, extent - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, extent - 1)
    w = np.zeros((size, extent))
    w[np.arange(size), low] += 1 - (centres - low)
    w[np.arange(size), high] += centres - low
    return w


def test_shrunk_axes_are_box_filtered_and_enlarged_ones_bilinear():
    image = _image().double()
    # x: 45 px into 10 bins of 4.5 px (box filter); y: 6 px into 10 bins (bilinear)
    x0, y0, x1, y1 = 0.5, 31.3, 45.5, 37.3
    crop = crop_regions(image.float(), torch.tensor([[x0, y0, x1, y1]]), 10)[0].double()
    ax = _box_filter_weights(x0, x1, 10, 60)
    ay = _bilinear_weights(y0, y1, 10, 40)
    want = np.einsum("iy,cyx,jx->cij", ay, image.numpy(), ax)
    np.testing.assert_allclose(crop.numpy(), want, rtol=0, atol=1e-3)
    # both axes shrunk: the bin means of a box with fractional corners
    box = (3.25, 1.5, 58.0, 39.75)
    crop = crop_regions(image.float(), torch.tensor([box]), 7)[0].double()
    want = np.einsum(
        "iy,cyx,jx->cij",
        _box_filter_weights(box[1], box[3], 7, 40),
        image.numpy(),
        _box_filter_weights(box[0], box[2], 7, 60),
    )
    np.testing.assert_allclose(crop.numpy(), want, rtol=0, atol=1e-3)


def test_small_boxes_crop_as_roi_align_does():
    from torchvision.ops import roi_align

    image = _image().float()
    boxes = torch.tensor([[0.0, 0.0, 12.0, 9.5], [44.2, 30.7, 60.0, 40.0], [10.0, 3.0, 26.0, 19.0]])
    assert ((boxes[:, 2:] - boxes[:, :2]) <= 16).all()
    want = roi_align(image[None], torch.cat([torch.zeros(3, 1), boxes], 1), (16, 16), 1.0, 0, True)
    # to roi_align's float32 arithmetic
    torch.testing.assert_close(crop_regions(image, boxes, 16), want, rtol=0, atol=1e-3)


def test_a_batch_of_images_of_different_sizes_crops_as_each_alone():
    g = torch.Generator().manual_seed(2)
    sizes = [(40, 60), (70, 30), (25, 25)]
    images = [torch.rand(3, h, w, generator=g) * 255 for h, w in sizes]
    boxes = []
    for h, w in sizes:
        xy = torch.rand(9, 2, generator=g) * torch.tensor([w - 3.0, h - 3.0])
        wh = torch.rand(9, 2, generator=g) * torch.tensor([float(w), float(h)]) + 2
        # boxes reaching the right and bottom edges too, where a neighbour in the batch begins
        b = torch.cat([xy, xy + wh], 1)
        b[-2:, 2:] = torch.tensor([float(w), float(h)])
        boxes.append(clip_boxes_to_image(b, (h, w)))
    alone = torch.cat([crop_regions(im, b, 12) for im, b in zip(images, boxes)])
    together = crop_regions_batch(images, boxes, 12)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-4)
    nhwc = torch.empty(len(alone), 3, 12, 12).contiguous(memory_format=torch.channels_last)
    crop_regions_batch(images, boxes, 12, out=nhwc)
    torch.testing.assert_close(nhwc, alone, rtol=0, atol=1e-4)


def test_box_filter_keeps_one_pixels_precision_in_a_large_image():
    # cumulative sums reach 255 * 3000 * 3000; in float32 a bin mean here would be off by tens
    image = torch.full((3, 3000, 3000), 255.0)
    image[:, 2990:, 2990:] = 7.0
    crop = crop_regions(image, torch.tensor([[2990.0, 2990.25, 2999.5, 3000.0]]), 4)
    torch.testing.assert_close(crop, torch.full_like(crop, 7.0), rtol=0, atol=1e-6)


def test_crops_cut_in_several_calls_equal_crops_cut_in_one(monkeypatch):
    import torch.nn.functional as F

    import vild_d2.distill.region_crops as region_crops
    from vild_d2.distill import crop_kernel

    # the limit is the torch path's (grid_sample's temporaries); the kernel has none
    monkeypatch.setattr(crop_kernel, "kernel", lambda: None)
    calls = []
    grid_sample = F.grid_sample
    monkeypatch.setattr(F, "grid_sample", lambda *a, **k: calls.append(len(a[1])) or grid_sample(*a, **k))

    g = torch.Generator().manual_seed(3)
    images = [torch.rand(3, 50, 40, generator=g), torch.rand(3, 30, 70, generator=g)]
    boxes = [torch.tensor([[0.0, 0, 40, 50], [5, 5, 9, 9], [1, 2, 39, 6]]),
             torch.tensor([[3.0, 1, 69, 29], [0, 0, 7, 30], [10, 10, 20, 20], [2, 2, 60, 12]])]
    one_call = crop_regions_batch(images, boxes, 8)
    calls_before = len(calls)
    monkeypatch.setattr(region_crops, "MAX_SAMPLES_PER_CALL", 100)  # one crop per call
    assert torch.equal(crop_regions_batch(images, boxes, 8), one_call)
    assert len(calls) - calls_before > calls_before  # the limit did split the sampling


@pytest.mark.parametrize("path", ["kernel", "torch"])
def test_crops_sampled_over_several_threads_equal_crops_sampled_over_one(monkeypatch, path):
    # crops are split into one part per thread; 7 crops of one kind over 3 threads leave the last
    # part short (on the torch path it is filled with copies that must not reach the output)
    if path == "torch":
        from vild_d2.distill import crop_kernel

        monkeypatch.setattr(crop_kernel, "kernel", lambda: None)
    g = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 50, 40, generator=g), torch.rand(3, 30, 70, generator=g)]
    xy = torch.rand(14, 2, generator=g) * 20
    wh = torch.rand(14, 2, generator=g) * 18 + 1
    boxes = [clip_boxes_to_image(torch.cat([xy[:7], xy[:7] + wh[:7]], 1), (50, 40)),
             clip_boxes_to_image(torch.cat([xy[7:], xy[7:] + wh[7:]], 1), (30, 70))]
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = crop_regions_batch(images, boxes, 8)
        torch.set_num_threads(3)
        several = crop_regions_batch(images, boxes, 8)
        nhwc = torch.empty(14, 3, 8, 8).contiguous(memory_format=torch.channels_last)
        crop_regions_batch(images, boxes, 8, out=nhwc)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(several, one)
    assert torch.equal(nhwc, one)


def test_images_cut_in_groups_equal_images_cut_in_one_atlas(monkeypatch):
    import vild_d2.distill.region_crops as region_crops

    g = torch.Generator().manual_seed(4)
    images = [torch.rand(3, h, w, generator=g) for h, w in ((50, 40), (30, 70), (20, 20), (60, 60))]
    boxes = [torch.tensor([[0.0, 0, w, h], [1, 2, w / 2, h - 1]]) for _, h, w in
             (im.shape for im in images)]
    one_atlas = crop_regions_batch(images, boxes, 8)
    monkeypatch.setattr(region_crops, "MAX_ATLAS_PIXELS", 5000)  # about two images per group
    groups = []
    cut = region_crops.crop_regions_batch
    monkeypatch.setattr(region_crops, "crop_regions_batch", lambda ims, *a, **k: groups.append(len(ims)) or cut(ims, *a, **k))
    torch.testing.assert_close(region_crops.crop_regions_batch(images, boxes, 8), one_atlas, rtol=0, atol=1e-6)
    assert groups[0] == 4 and len(groups) > 2 and max(groups[1:]) < 4  # the images were cut in groups


def test_a_float16_image_is_box_filtered_without_overflow():
    # the bin sums (200 x 150 x 150) exceed float16's range; the means do not
    image = torch.full((3, 300, 300), 200.0, dtype=torch.float16)
    crop = crop_regions(image, torch.tensor([[0.0, 0, 300, 300]]), 2)
    assert crop.dtype == torch.float16
    torch.testing.assert_close(crop, torch.full_like(crop, 200.0))
