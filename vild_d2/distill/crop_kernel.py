"""The compiled CPU kernel of the region crops (``csrc/region_crops.c``): built with the system's C
compiler on first use into a per-user cache and loaded with ctypes (which releases the GIL while it
runs). It reproduces the bits of the torch path of ``region_crops.crop_regions_batch``: at load, its
samples are compared with torch's ``grid_sample`` on this machine, in the variant with plain and
with fused multiply-adds, and the one that matches is used. Where it cannot be built or neither
variant matches, the torch path runs instead (warned once).

Environment: ``VILD_D2_CROP_KERNEL=0`` turns the kernel off; ``CC`` names the compiler (default
``cc``); ``VILD_D2_BUILD_DIR`` the build cache (default ``~/.cache/vild_d2``).
"""

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
import threading
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "region_crops.c")
# -march=native: the library is built on, and keyed to, the machine that runs it. No contraction
# into fused multiply-adds beyond the explicit ones: they round differently.
FLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fno-fast-math", "-fPIC", "-shared")
# the crops' threads join torch's own OpenMP pool (the library links the libgomp torch has loaded)
OPENMP_FLAGS = ("-fopenmp",)

_lock = threading.Lock()
_state = {"loaded": False, "lib": None, "fused": 0}

_i64 = ctypes.c_int64
_p = ctypes.c_void_p


def _build_dir() -> str:
    default = os.path.join(os.path.expanduser("~"), ".cache", "vild_d2")
    return os.environ.get("VILD_D2_BUILD_DIR", default)


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        return ""


def _library_path(compiler: str, flags: Sequence[str]) -> str:
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read())
    key = [compiler, *flags, platform.machine(), platform.processor(), _cpu_flags()]
    digest.update("\n".join(key).encode())
    return os.path.join(_build_dir(), f"region_crops-{digest.hexdigest()[:16]}.so")


def _compile(compiler: str, flags: Sequence[str], path: str) -> None:
    """Builds the library at ``path`` through a temporary file, so that concurrent builders and a
    killed build never leave a partial library under the final name."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        cmd = [compiler, *flags, "-o", tmp, SOURCE, "-lm"]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True)
        except OSError as e:
            raise OSError(f"cannot run the C compiler '{compiler}' ({e})") from e
        if done.returncode:
            raise OSError(f"'{' '.join(cmd)}' failed: {done.stderr.strip()[:300]}")
        os.chmod(tmp, 0o755)  # mkstemp's 0600 would keep other users of the cache out
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _open(compiler: str) -> ctypes.CDLL:
    """The library, built with OpenMP where the compiler can, else without (one thread)."""
    errors = []
    for flags in (FLAGS + OPENMP_FLAGS, FLAGS):
        path = _library_path(compiler, flags)
        try:
            if not os.path.isfile(path):
                _compile(compiler, flags, path)
            return ctypes.CDLL(path)
        except OSError as e:
            errors.append(str(e))
    raise OSError(errors[-1])


def _declare(lib: ctypes.CDLL) -> None:
    lib.vild_cumulative.restype = None
    lib.vild_cumulative.argtypes = [_p, _p, _i64, _i64, _i64]
    lib.vild_normalize_u8.restype = None
    lib.vild_normalize_u8.argtypes = [_p] + [_i64] * 6 + [_p, _p, _p]
    lib.vild_pad_replicate.restype = None
    lib.vild_pad_replicate.argtypes = [_p] + [_i64] * 6 + [_p] + [_i64] * 4
    lib.vild_cut_crops.restype = ctypes.c_int
    lib.vild_cut_crops.argtypes = [_p] * 5 + [_i64, _p, _p, _i64, _p, _i64, _p, _p, _i64, _i64]
    lib.vild_cut_crops.argtypes += [ctypes.c_int]
    lib.vild_sample_lattice.restype = None
    lib.vild_sample_lattice.argtypes = [_p, _i64, _i64, _i64, _p, _i64, _p, _i64, ctypes.c_int, _p]


def _matching_variant(lib: ctypes.CDLL) -> Optional[int]:
    """0 (plain) or 1 (fused multiply-adds): the variant whose samples equal torch's grid_sample
    bit for bit on a lattice that covers clamped, masked and interior points; None if neither."""
    g = torch.Generator().manual_seed(0)
    table = torch.randn(37, 53, generator=g, dtype=torch.float64) * 1e3
    gx = torch.rand(67, generator=g, dtype=torch.float64).mul(2.2).sub(1.1).sort().values
    gy = torch.rand(61, generator=g, dtype=torch.float64).mul(2.2).sub(1.1).sort().values
    grid = torch.stack(torch.broadcast_tensors(gx[None, :], gy[:, None]), -1)
    ref = F.grid_sample(
        table[None, None], grid[None], mode="bilinear", padding_mode="border", align_corners=False
    )[0, 0]
    for fused in (1, 0):
        mine = torch.full_like(ref, float("nan"))
        lib.vild_sample_lattice(
            table.data_ptr(),
            37,
            53,
            53,
            gx.data_ptr(),
            67,
            gy.data_ptr(),
            61,
            fused,
            mine.data_ptr(),
        )
        if torch.equal(mine.view(torch.int64), ref.view(torch.int64)):
            return fused
    return None


def _load():
    if os.environ.get("VILD_D2_CROP_KERNEL", "1") == "0":
        return None
    try:
        lib = _open(os.environ.get("CC", "cc"))
    except OSError as e:
        logger.warning(f"region crops: no C kernel ({e}); cutting with torch operations")
        return None
    _declare(lib)
    fused = _matching_variant(lib)
    if fused is None:
        logger.warning(
            "region crops: the C kernel's samples differ from torch's grid_sample on this machine; "
            "cutting with torch operations"
        )
        return None
    _state["fused"] = fused
    return lib


def kernel() -> Optional[ctypes.CDLL]:
    """The library, or None when it is turned off, cannot be built or does not match torch."""
    if not _state["loaded"]:
        with _lock:
            if not _state["loaded"]:
                _state["lib"] = _load()
                _state["loaded"] = True
    return _state["lib"]


def cumulative(table: torch.Tensor, dim: int) -> torch.Tensor:
    """``region_crops._cumulative`` of a contiguous float64 CPU ``table``: cumulative sums along
    ``dim``, preceded by a zero."""
    shape = list(table.shape)
    outer = 1
    for s in shape[:dim]:
        outer *= s
    inner = table.stride(dim)
    shape[dim] += 1
    out = table.new_empty(shape)
    kernel().vild_cumulative(table.data_ptr(), out.data_ptr(), outer, table.shape[dim], inner)
    return out


def normalize_u8(image: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """A uint8 CPU image [C, H, W] as ``(image / 255 - mean) / std`` in float32, in one pass."""
    out = torch.empty(image.shape, dtype=torch.float32)
    m = torch.tensor(mean, dtype=torch.float32)
    s = torch.tensor(std, dtype=torch.float32)
    kernel().vild_normalize_u8(
        image.data_ptr(), *image.shape, *image.stride(), m.data_ptr(), s.data_ptr(), out.data_ptr()
    )
    return out


def pad_replicate(image: torch.Tensor, dst: torch.Tensor) -> None:
    """``dst`` [C, H, W] (float64, unit stride along W) = float32 ``image`` [C, h, w] with one
    repeated edge row and column before it and as many as fill ``dst`` after it."""
    kernel().vild_pad_replicate(
        image.data_ptr(),
        *image.shape,
        *image.stride(),
        dst.data_ptr(),
        *dst.shape[1:],
        *dst.stride()[:2],
    )


def _array(values, ctype):
    return (ctype * len(values))(*values)


def cut_crops(
    tables: Sequence[Optional[torch.Tensor]],
    channels: int,
    boxes: torch.Tensor,
    which: torch.Tensor,
    images: int,
    case: torch.Tensor,
    size: int,
    out: torch.Tensor,
    threads: int,
) -> None:
    """Every crop of a batch into ``out``. ``tables[c]``: case c's float64 table as an atlas
    [C, H, W] view of ``images`` images side by side, or None; ``boxes``: float64 [N, 4] (XYXY
    pixels of image ``which``, int64 [N]); ``case``: int64 [N]; ``out``: float32
    [N, C, size, size] in any layout. All on the CPU and, except ``out``, contiguous."""

    def field(get):
        return [get(t) if t is not None else 0 for t in tables]

    code = kernel().vild_cut_crops(
        _array(field(lambda t: t.data_ptr()), ctypes.c_void_p),
        _array(field(lambda t: t.shape[1]), _i64),
        _array(field(lambda t: t.shape[2]), _i64),
        _array(field(lambda t: t.stride(1)), _i64),
        _array(field(lambda t: t.stride(0)), _i64),
        channels,
        boxes.data_ptr(),
        which.data_ptr(),
        images,
        case.data_ptr(),
        size,
        out.data_ptr(),
        _array(list(out.stride()), _i64),
        len(case),
        threads,
        _state["fused"],
    )
    if code:
        raise MemoryError("region crops: the C kernel could not allocate its scratch memory")
