"""tools/precompute_clip_embeddings.py on a tiny world: the cache round trip, its embeddings against
a direct encoding, resume after SIGKILL, a 2-process run, and the manifest checks."""

import copy
import os
import shutil
import signal
import subprocess
import sys
import time

import clip
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from clip.model import CLIP
from detectron2.config import get_cfg
from detectron2.data.detection_utils import read_image

from vild_d2 import add_vild_config
from vild_d2.data.distill_mapper import DistillDatasetMapper
from vild_d2.distill.embedding_cache import CacheError, EmbeddingCache
from vild_d2.shapes_world.generator import WorldConfig, ensure_world
from vild_d2.distill.precision import cast_for_precision, resolve_precision
from vild_d2.distill.region_encoder import RegionEncoder
from vild_d2.teacher import clip_normalize, load_clip
from vild_d2.shapes_world.teacher_crops import CropBank, fixed_crops
from vild_d2.distill.region_crops import crops_for_clip, expand_boxes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "precompute_clip_embeddings.py")
STAGE1 = os.path.join(ROOT, "configs", "shapes_ovd", "stage1_proposals.yaml")
M = 8
CACHE_FILES = ("boxes.npy", "scores.npy", "embeddings.npy", "index.json", "manifest.json")


def _tiny_clip(path, seed):
    torch.manual_seed(seed)
    model = CLIP(64, 64, (1, 1, 1, 1), 8, None, 77, 49408, 64, 1, 1).float()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    torch.save(model.state_dict(), path)


def _stage1_cfg():
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.merge_from_file(STAGE1)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A world of 8 80-px images, a random stage-1 model, two tiny random CLIPs and a reference
    cache."""
    from detectron2.modeling import build_model

    base = tmp_path_factory.mktemp("precompute")
    cfg = WorldConfig(
        seed=5, num_trainval=8, num_test=2, num_teacher=0, num_teacher_val=0, image_size=80
    )
    ensure_world(str(base / "datasets" / "shapes_ovd"), cfg, progress=False)
    torch.manual_seed(0)
    torch.save({"model": build_model(_stage1_cfg()).state_dict()}, base / "stage1.pth")
    _tiny_clip(base / "clip.pth", 0)
    _tiny_clip(base / "clip_other.pth", 1)
    _run(base, "ref")
    return base


def _cmd(base, out, args=(), opts=()):
    return [
        sys.executable,
        TOOL,
        "--config-file",
        STAGE1,
        "--clip-model",
        str(base / "clip.pth"),
        "--num-proposals",
        str(M),
        "--chunk-size",
        "3",
        "--num-workers",
        "0",
        "--threads",
        "1",
        "--output-dir",
        str(base / out),
        "--precision",
        "fp32",
        *args,
        "MODEL.WEIGHTS",
        str(base / "stage1.pth"),
        "MODEL.DEVICE",
        "cpu",
        "MODEL.VILD.EMBED_DIM",
        "64",
        "OUTPUT_DIR",
        str(base / "output"),
        *opts,
    ]


def _env(base):
    return dict(os.environ, DETECTRON2_DATASETS=str(base / "datasets"))


def _run(base, out, args=(), opts=(), ok=True):
    proc = subprocess.run(
        _cmd(base, out, args, opts),
        env=_env(base),
        capture_output=True,
        text=True,
        cwd=str(base),
        timeout=300,
    )
    assert (proc.returncode == 0) == ok, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _assert_same_cache(a, b):
    for name in CACHE_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_cache_round_trip(tiny):
    cache = EmbeddingCache(str(tiny / "ref"))
    m = cache.manifest
    assert len(cache) == 8 and cache.embed_dim == 64
    assert m["datasets"] == ["shapes_ovd_trainval_base"] and m["num_images"] == 8
    assert m["crop_scales"] == [1.0, 1.5] and m["num_proposals"] == M and m["ensemble_crops"]
    assert m["clip_fingerprint"] == load_clip(str(tiny / "clip.pth"))[1].fingerprint
    assert m["input_resolution"] == 64 and len(m["stage1_weights_sha256"]) == 16
    assert m["num_proposals_total"] == len(cache.boxes) > 0
    for image_id in cache.image_ids():
        e = cache.get(image_id)
        assert 0 < len(e.boxes) <= M and e.embeddings.dtype == np.float16
        wh = e.boxes[:, 2:] - e.boxes[:, :2]
        assert (wh >= 4).all() and (e.boxes >= 0).all() and (e.boxes <= 80).all()
        assert (np.diff(e.scores) <= 0).all()
        np.testing.assert_allclose(
            np.linalg.norm(e.embeddings.astype(np.float32), axis=1), 1, atol=2e-3
        )
    stamps = [os.stat(tiny / "ref" / n).st_mtime_ns for n in CACHE_FILES]
    assert "already complete" in _run(tiny, "ref")
    assert stamps == [os.stat(tiny / "ref" / n).st_mtime_ns for n in CACHE_FILES]


def test_cached_embedding_is_the_direct_embedding_of_its_crops(tiny):
    cache = EmbeddingCache(str(tiny / "ref"))
    model, info = load_clip(str(tiny / "clip.pth"))
    for image_id in cache.image_ids()[:2]:
        entry = cache.get(image_id)
        path = tiny / "datasets" / "shapes_ovd" / "JPEGImages" / f"{image_id}.jpg"
        image = torch.from_numpy(read_image(str(path), format="RGB").copy()).permute(2, 0, 1)
        n = len(entry.boxes)
        bank = CropBank(
            image[None],
            torch.tensor([image.shape[1:]], dtype=torch.float32),
            torch.from_numpy(entry.boxes.copy()),
            torch.zeros(n, dtype=torch.long),
            torch.zeros(n, dtype=torch.long),
        )
        with torch.no_grad():
            per_scale = [
                F.normalize(
                    model.encode_image(clip_normalize(fixed_crops(bank, 64, s), info)), dim=-1
                )
                for s in (1.0, 1.5)
            ]
        want = F.normalize(sum(per_scale), dim=-1).numpy()
        np.testing.assert_allclose(entry.embeddings.astype(np.float32), want, atol=1e-3)


def test_resume_after_sigkill_gives_the_same_cache(tiny):
    out = tiny / "killed"
    proc = subprocess.Popen(
        _cmd(tiny, "killed"),
        env=_env(tiny),
        cwd=str(tiny),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 120
    parts = out / "parts"
    while time.time() < deadline and proc.poll() is None:
        if parts.is_dir() and any(p.endswith(".npz") for p in os.listdir(parts)):
            break
        time.sleep(0.002)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "manifest.json").exists(), "the run ended before it could be killed"
    with pytest.raises(CacheError, match="unfinished"):
        EmbeddingCache(str(out))
    # a finalize killed half-way leaves arrays without a manifest, and a killed part writer a
    # temporary file: neither counts
    (out / "boxes.npy").write_bytes(b"partial")
    (parts / "part-000000003-000000006.npz.tmp.999").write_bytes(b"partial")
    log = _run(tiny, "killed")
    assert "done before" in log and "embedding cache:" in log
    assert not parts.exists()
    _assert_same_cache(tiny / "ref", out)


def test_two_processes_give_the_one_process_cache(tiny):
    log = _run(tiny, "ddp", args=["--num-gpus", "2", "--dist-url", "auto"])
    assert "by 2 process(es)" in log
    _assert_same_cache(tiny / "ref", tiny / "ddp")


def test_another_key_in_the_same_directory_is_refused(tiny):
    stamps = [os.stat(tiny / "ref" / n).st_mtime_ns for n in CACHE_FILES]
    log = _run(tiny, "ref", args=["--crop-scales", "1.0"], ok=False)
    assert "crop_scales=[1.0, 1.5], but this run asks for crop_scales=[1.0]" in log
    log = _run(tiny, "ref", args=["--precision", "bf16"], ok=False)
    assert "precision='fp32', but this run asks for precision='bf16'" in log
    assert stamps == [os.stat(tiny / "ref" / n).st_mtime_ns for n in CACHE_FILES]


def test_a_damaged_cache_is_rebuilt_and_one_of_another_clip_size_never_started(tiny):
    shutil.copytree(tiny / "ref", tiny / "damaged")
    os.truncate(tiny / "damaged" / "embeddings.npy", 100)
    log = _run(tiny, "damaged")
    assert f"{tiny / 'damaged' / 'embeddings.npy'} has 100 bytes where" in log and "rebuilding it" in log
    _assert_same_cache(tiny / "ref", tiny / "damaged")
    # the config's embedding size is checked against the CLIP model before anything is written
    proc = subprocess.run(_cmd(tiny, "dim", opts=["MODEL.VILD.EMBED_DIM", "32"]), env=_env(tiny),
                          capture_output=True, text=True, cwd=str(tiny), timeout=300)
    assert proc.returncode == 2 and not (tiny / "dim").exists()
    assert proc.stderr.strip().splitlines()[-1].startswith("precompute_clip_embeddings.py: error: CLIP model ")
    assert "embeds in 64 dimensions but the config's MODEL.VILD.EMBED_DIM is 32" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_default_output_dir_is_keyed(tiny):
    log = _run(
        tiny, "unused", opts=["MODEL.VILD.DISTILL.MIN_BOX_SIZE", "6.0"], args=["--output-dir", ""]
    )
    line = [x for x in log.splitlines() if x.startswith("embedding cache:")][0]
    path = line.split(": ", 1)[1]
    assert os.path.dirname(path) == str(tiny / "output" / "clip_cache")
    assert os.path.basename(path).startswith("shapes_ovd_trainval_base-")
    assert EmbeddingCache(path).manifest["min_box_size"] == 6.0


@pytest.mark.parametrize(
    "opts, message",
    [
        ({"MODEL.VILD.CLIP_MODEL": "clip_other.pth"}, "clip_fingerprint="),
        ({"MODEL.VILD.EMBED_DIM": 32}, "embed_dim=64 but the config asks for embed_dim=32"),
        (
            {"MODEL.VILD.DISTILL.CROP_SCALES": [1.0]},
            r"crop_scales=[1.0, 1.5] but the config asks for crop_scales=[1.0]",
        ),
        ({}, None),
    ],
)
def test_training_config_must_match_the_cache(tiny, opts, message):
    cfg = get_cfg()
    add_vild_config(cfg)
    cfg.MODEL.VILD.DISTILL.CACHE_DIR = str(tiny / "ref")
    cfg.MODEL.VILD.CLIP_MODEL = str(tiny / "clip.pth")
    cfg.MODEL.VILD.EMBED_DIM = 64
    for k, v in opts.items():
        if k == "MODEL.VILD.CLIP_MODEL":
            v = str(tiny / v)
        cfg.merge_from_list([k, v])
    if message is None:
        assert DistillDatasetMapper(cfg, is_train=True).cache is not None
        return
    with pytest.raises(CacheError) as e:
        DistillDatasetMapper(cfg, is_train=True)
    assert message in str(e.value)
    assert len(str(e.value).splitlines()) == 1
    if "clip_fingerprint" in message:  # the checkpoints behind both fingerprints are named
        assert f"(from {tiny / 'clip.pth'})" in str(e.value)
        assert f"(from MODEL.VILD.CLIP_MODEL {tiny / 'clip_other.pth'})" in str(e.value)


def test_region_encoder_batches_across_images_and_ensembles_scales(tiny):
    model, info = load_clip(str(tiny / "clip.pth"))
    g = torch.Generator().manual_seed(0)
    images = [torch.randint(0, 256, (3, 50, 70), generator=g, dtype=torch.uint8) for _ in range(3)]
    xy = [torch.rand(n, 2, generator=g) * 40 for n in (5, 0, 7)]
    boxes = [torch.cat([p, p + 4 + torch.rand(len(p), 2, generator=g) * 30], 1) for p in xy]
    one_batch = RegionEncoder(model, info, (1.0, 1.5), batch_size=256, precision="fp32")(images, boxes)
    small = RegionEncoder(model, info, (1.0, 1.5), batch_size=3, precision="fp32")(images, boxes)
    assert [e.shape for e in small] == [(5, 64), (0, 64), (7, 64)]
    for a, b in zip(one_batch, small):
        np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    only_1x = RegionEncoder(model, info, (1.0, 1.5), ensemble_crops=False, precision="fp32")(images, boxes)
    with torch.no_grad():
        crops = crops_for_clip(images[2], expand_boxes(boxes[2], 1.0, (50, 70)), info)
        want = F.normalize(model.encode_image(crops), dim=-1).numpy()
    np.testing.assert_allclose(only_1x[2].astype(np.float32), want, atol=2e-3)


def test_bf16_encoder_matches_fp32_to_bf16_precision(tiny):
    model, info = load_clip(str(tiny / "clip.pth"))
    g = torch.Generator().manual_seed(1)
    images = [torch.randint(0, 256, (3, 60, 60), generator=g, dtype=torch.uint8)]
    boxes = [torch.tensor([[0.0, 0, 30, 30], [10, 5, 59, 40], [20, 20, 50, 58]])]
    fp32 = RegionEncoder(copy.deepcopy(model), info, (1.0, 1.5), precision="fp32")
    bf16 = RegionEncoder(model, info, (1.0, 1.5), precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    a, b = fp32(images, boxes)[0].astype(np.float32), bf16(images, boxes)[0].astype(np.float32)
    assert (a * b).sum(1).min() > 0.999  # cosine of unit vectors
    assert not np.array_equal(a, b)  # bf16 did run


def _small_clip(tower: str) -> CLIP:
    torch.manual_seed(0)
    layers, width, patch = ((1, 1, 1, 1), 8, None) if tower == "resnet" else (2, 64, 16)
    return CLIP(64, 64, layers, width, patch, 77, 49408, 64, 1, 1).eval()


def _norms_are_float32(model) -> bool:
    norm_types = (torch.nn.LayerNorm, torch.nn.BatchNorm2d)
    norms = [m for m in model.modules() if isinstance(m, norm_types)]
    return bool(norms) and all(p.dtype == torch.float32 for m in norms for p in m.parameters())


@pytest.mark.parametrize("tower", ["resnet", "vit"])
def test_bf16_weights_cast_once_give_autocasts_results_bit_for_bit(tower):
    model = _small_clip(tower)
    x = torch.randn(3, 3, 64, 64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        reference = model.encode_image(x)
        cast = cast_for_precision(copy.deepcopy(model), "bf16")
        out = cast.encode_image(x)
    weights = [m.weight for m in cast.visual.modules() if isinstance(m, torch.nn.Linear)]
    assert weights and all(w.dtype == torch.bfloat16 for w in weights)
    assert _norms_are_float32(cast)
    assert torch.equal(out, reference)
    # the text tower, which reads the model's dtype, is left as it was
    assert cast.dtype == torch.float32
    tokens = clip.tokenize(["a photo of a red star"])
    with torch.no_grad():
        assert torch.equal(cast.encode_text(tokens), model.encode_text(tokens))


@pytest.mark.parametrize("tower", ["resnet", "vit"])
def test_fp16_cast_is_clips_own_and_runs(tower):
    # CLIP's LayerNorm computes in float32: a model made half() whole fails on a ViT
    # ("expected scalar type Float but found Half" on CUDA); the norms must stay float32
    model = _small_clip(tower)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model.encode_image(x)
        half = cast_for_precision(model, "fp16")
        assert half.dtype == torch.float16
        assert _norms_are_float32(half)
        out = half.encode_image(x.half())
    assert out.dtype == torch.float16
    assert F.cosine_similarity(out.float(), reference, dim=1).min() > 0.999


@pytest.mark.parametrize("avx512_bf16, amx, expected", [(True, False, "bf16"), (False, True, "bf16"),
                                                        (False, False, "fp32")])
def test_precision_resolution(monkeypatch, avx512_bf16, amx, expected):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("fp32", "cpu") == "fp32"
    assert resolve_precision("bf16", "cpu") == "bf16"
    assert resolve_precision("auto", "cuda") == "fp16"
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="'fp8' is not one of"):
        resolve_precision("fp8", "cpu")

