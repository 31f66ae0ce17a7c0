"""The compiled CPU kernel of the region crops gives the torch path's bits, and the torch path takes
over where the kernel cannot be built."""

import logging
import os
import shutil

import pytest
import torch

from vild_d2.distill import crop_kernel
from vild_d2.teacher.loader import CLIP_MEAN, CLIP_STD, ClipInfo
from vild_d2.distill.region_crops import (
    _cumulative,
    clip_boxes_to_image,
    crop_regions_batch,
    normalize_for_clip,
)


@pytest.fixture
def kernel():
    if shutil.which(os.environ.get("CC", "cc")) is None:
        pytest.skip("no C compiler: the crops are cut with torch operations")
    lib = crop_kernel.kernel()
    assert lib is not None, "a C compiler is at hand, yet the crop kernel was not built or matched"
    return lib


def _torch_path(monkeypatch):
    monkeypatch.setattr(crop_kernel, "kernel", lambda: None)


def _bits(t):
    return t.contiguous().view(torch.int32)


def _problem(g, size):
    """Images of different sizes with boxes of every kind: enlarged and shrunk along each axis,
    touching the edges, thinner than a pixel's bin, and the whole image."""
    images, boxes = [], []
    for _ in range(int(torch.randint(1, 4, (), generator=g))):
        h, w = (int(v) for v in torch.randint(3, 90, (2,), generator=g))
        images.append(torch.randn(3, h, w, generator=g) * 2)
        m = int(torch.randint(0, 25, (), generator=g))
        xy = torch.rand(m, 2, generator=g) * torch.tensor([w, h])
        wh = torch.rand(m, 2, generator=g) * torch.tensor([w, h]) * 1.5
        b = torch.cat([torch.cat([xy, xy + wh], 1), torch.tensor([[0.0, 0, w, h]])])
        b = clip_boxes_to_image(b, (h, w))
        # and boxes that were not clipped: reversed, and reaching past the image
        b = torch.cat([b, b[:2].flip(1), torch.tensor([[-3.5, w + 2.0, w + 9.0, -1.0]])])
        boxes.append(b)
    return images, boxes, size


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_kernel_crops_have_the_torch_paths_bits(kernel, monkeypatch, layout):
    g = torch.Generator().manual_seed(0)
    threads = torch.get_num_threads()
    problems = [_problem(g, size) for size in (1, 5, 8, 32, 33) for _ in range(12)]
    try:
        for k, (images, boxes, size) in enumerate(problems):
            torch.set_num_threads(1 + k % 3)
            n = sum(len(b) for b in boxes)
            fast = torch.empty(n, 3, size, size).contiguous(memory_format=layout)
            crop_regions_batch(images, boxes, size, out=fast)
            with monkeypatch.context() as m:
                _torch_path(m)
                slow = torch.empty(n, 3, size, size).contiguous(memory_format=layout)
                crop_regions_batch(images, boxes, size, out=slow)
            assert torch.equal(_bits(fast), _bits(slow)), f"problem {k}: {size} px crops differ"
    finally:
        torch.set_num_threads(threads)


def test_images_and_out_of_the_wrong_shape_are_refused():
    box = [torch.tensor([[0.0, 0, 4, 4]])]
    with pytest.raises(ValueError, match="H, W > 0"):
        crop_regions_batch([torch.rand(3, 6, 6), torch.rand(3, 0, 6)], box * 2, 4)
    with pytest.raises(ValueError, match=r"\[3, H, W\]"):
        crop_regions_batch([torch.rand(3, 6, 6), torch.rand(1, 6, 6)], box * 2, 4)
    with pytest.raises(ValueError, match="out must be"):
        crop_regions_batch(
            [torch.rand(3, 6, 6)], [torch.rand(2, 4) * 5], 4, out=torch.empty(1, 3, 4, 4)
        )


@pytest.mark.parametrize("dim", [0, 1, 2, 3])
def test_kernel_cumulative_sums_are_torchs(kernel, monkeypatch, dim):
    table = torch.randn(3, 17, 2, 19, dtype=torch.float64, generator=torch.Generator().manual_seed(dim)) * 100
    fast = _cumulative(table, dim)
    _torch_path(monkeypatch)
    slow = _cumulative(table, dim)
    assert fast.shape == slow.shape
    assert torch.equal(fast.view(torch.int64), slow.view(torch.int64))


def test_kernel_normalisation_is_torchs(kernel, monkeypatch):
    # every uint8 value in every channel, and a transposed (strided) image
    image = torch.arange(256, dtype=torch.uint8).view(1, 16, 16).repeat(3, 1, 1)
    info = ClipInfo("test", "0" * 16, 32, 8, 77, CLIP_MEAN, CLIP_STD, None)
    fast = [normalize_for_clip(im, info) for im in (image, image.transpose(1, 2))]
    _torch_path(monkeypatch)
    slow = [normalize_for_clip(im, info) for im in (image, image.transpose(1, 2))]
    for a, b in zip(fast, slow):
        assert a.dtype == b.dtype == torch.float32
        assert torch.equal(_bits(a), _bits(b))


def test_kernel_samples_match_torchs_grid_sample(kernel):
    assert crop_kernel._matching_variant(kernel) in (0, 1)


def test_without_a_compiler_the_torch_path_cuts(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("VILD_D2_BUILD_DIR", str(tmp_path / "build"))
    monkeypatch.setattr(crop_kernel, "_state", {"loaded": False, "lib": None, "fused": 0})
    image = torch.rand(3, 20, 30, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0.0, 0, 30, 20], [2, 3, 9, 7]])
    with caplog.at_level(logging.WARNING, logger=crop_kernel.__name__):
        crops = crop_regions_batch([image], [boxes], 8)
    assert crop_kernel.kernel() is None
    assert "no-such-compiler" in caplog.text
    assert crops.shape == (2, 3, 8, 8) and torch.isfinite(crops).all()
    assert not any(p.suffix == ".so" for p in (tmp_path / "build").glob("*"))


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("VILD_D2_CROP_KERNEL", "0")
    monkeypatch.setattr(crop_kernel, "_state", {"loaded": False, "lib": None, "fused": 0})
    assert crop_kernel.kernel() is None
