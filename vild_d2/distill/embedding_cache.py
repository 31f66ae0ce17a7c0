"""The cache of CLIP embeddings of stage-1 proposals, read by training and written by
tools/precompute_clip_embeddings.py.

Layout of a finished cache directory (all arrays memory-mappable):
  boxes.npy       float32 [N, 4]  proposal boxes, XYXY in the original image's pixels
  scores.npy      float32 [N]     stage-1 objectness (after NMS, sorted descending per image)
  embeddings.npy  float16 [N, D]  L2-normalised CLIP image embeddings of the crops
  index.json      {"image_ids": [...], "offsets": [...]}: image i owns rows offsets[i]:offsets[i+1]
  manifest.json   what produced the cache and each file's size and sha256; written last, so its
                  presence marks completion
"""

import contextlib
import json
import os
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np

from ..utils import UserError, atomic_write, file_damage, file_record, write_json

MANIFEST = "manifest.json"
CACHE_FORMAT_VERSION = 1
FILES = ("boxes.npy", "scores.npy", "embeddings.npy", "index.json")


class CacheError(UserError, RuntimeError):
    """A cache that is missing, incomplete or does not match its consumer."""


@dataclass
class CacheEntry:
    boxes: np.ndarray  # float32 [M, 4]
    scores: np.ndarray  # float32 [M]
    embeddings: np.ndarray  # float16 [M, D]


class EmbeddingCache:
    """Read-only, memory-mapped access to a finished cache: O(1) lookup by image id."""

    def __init__(self, cache_dir: str):
        manifest_path = os.path.join(cache_dir, MANIFEST)
        if not os.path.isfile(manifest_path):
            raise CacheError(
                f"embedding cache {cache_dir} is missing or unfinished (no {MANIFEST}); run "
                "tools/precompute_clip_embeddings.py, which resumes an interrupted run"
            )
        self.cache_dir = cache_dir
        self.manifest = read_manifest(cache_dir)
        # sizes only: reading a real cache through (tens of GB) is the precompute tool's check
        damaged = cache_damage(cache_dir, self.manifest, checksum=False)
        if damaged:
            raise CacheError(f"embedding cache {damaged}; rerun tools/precompute_clip_embeddings.py "
                             "with the same arguments, which rebuilds it")
        try:
            with open(os.path.join(cache_dir, "index.json")) as f:
                index = json.load(f)
            offsets = index["offsets"]
            self.boxes = np.load(os.path.join(cache_dir, "boxes.npy"), mmap_mode="r")
            self.scores = np.load(os.path.join(cache_dir, "scores.npy"), mmap_mode="r")
            self.embeddings = np.load(os.path.join(cache_dir, "embeddings.npy"), mmap_mode="r")
        except (OSError, ValueError, KeyError) as e:  # a cache written before files were recorded
            raise CacheError(f"embedding cache {cache_dir} does not read ({e}); rebuild it with "
                             "tools/precompute_clip_embeddings.py") from None
        self._rows: Dict[str, Tuple[int, int]] = {
            str(i): (offsets[k], offsets[k + 1]) for k, i in enumerate(index["image_ids"])
        }

    @property
    def embed_dim(self) -> int:
        return int(self.embeddings.shape[1])

    def __len__(self) -> int:
        return len(self._rows)

    def __contains__(self, image_id) -> bool:
        return str(image_id) in self._rows

    def image_ids(self):
        return list(self._rows)

    def get(self, image_id, top_k: Optional[int] = None) -> CacheEntry:
        """The entries of one image, at most ``top_k`` (highest objectness first)."""
        try:
            start, end = self._rows[str(image_id)]
        except KeyError:
            raise CacheError(
                f"image '{image_id}' is not in embedding cache {self.cache_dir}; the cache was "
                "built for another dataset (see its manifest.json) - rebuild it for this one"
            ) from None
        if top_k is not None:
            end = min(end, start + top_k)
        return CacheEntry(
            np.asarray(self.boxes[start:end], dtype=np.float32),
            np.asarray(self.scores[start:end], dtype=np.float32),
            np.asarray(self.embeddings[start:end]),
        )

    def check_compatible(self, sources: Optional[Dict[str, str]] = None, **expected) -> None:
        """Raise one line naming both values when the manifest disagrees with ``expected``.

        Keys compared: any manifest key, e.g. clip_fingerprint, embed_dim, crop_scales.
        ``sources``: for a key, what the expected value was computed from (the config's CLIP
        model behind clip_fingerprint), named beside the cache's own (its manifest's clip_model).
        """
        sources = sources or {}
        cache_sources = {"clip_fingerprint": self.manifest.get("clip_model")}
        for key, want in expected.items():
            have = self.manifest.get(key)
            if isinstance(want, (list, tuple)):
                same = have is not None and [float(x) for x in have] == [float(x) for x in want]
            else:
                same = have == want
            if not same:
                was, now = cache_sources.get(key), sources.get(key)
                raise CacheError(
                    f"embedding cache {self.cache_dir} has {key}={have!r}"
                    f"{f' (from {was})' if was else ''} but the config asks for {key}={want!r}"
                    f"{f' (from {now})' if now else ''}; rebuild the cache with "
                    "tools/precompute_clip_embeddings.py or point MODEL.VILD.DISTILL.CACHE_DIR at a "
                    "matching one"
                )


def read_manifest(cache_dir: str) -> dict:
    """The manifest of a finished cache; CacheError, naming the folder, when there is none."""
    path = os.path.join(cache_dir, MANIFEST)
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CacheError(
            f"embedding cache {cache_dir} is missing or unfinished ({MANIFEST}: {e}); run "
            "tools/precompute_clip_embeddings.py, which resumes an interrupted run"
        ) from None


def cache_damage(cache_dir: str, manifest: dict, checksum: bool = True) -> Optional[str]:
    """What is wrong with a finished cache's files against the sizes and sha256 its manifest
    recorded when they were written ("<dir>/<file> has N bytes where M were written"), or None."""
    for name, record in manifest.get("files", {}).items():
        why = file_damage(os.path.join(cache_dir, name), record, checksum)
        if why:
            return f"{os.path.join(cache_dir, name)} {why}"
    return None


def write_cache(
    cache_dir: str,
    entries: Iterable[Tuple[str, CacheEntry]],
    manifest: dict,
    embed_dim: Optional[int] = None,
    num_rows: Optional[int] = None,
) -> None:
    """Write a finished cache atomically: arrays and index first, manifest last.

    With ``num_rows`` (the total number of entries' rows) and ``embed_dim`` known in advance, the
    arrays are streamed to disk entry by entry instead of being assembled in memory.
    """
    os.makedirs(cache_dir, exist_ok=True)
    if os.path.exists(os.path.join(cache_dir, MANIFEST)):
        os.remove(os.path.join(cache_dir, MANIFEST))  # the old arrays stop being complete now
    if num_rows and embed_dim is not None:
        ids, offsets = _stream_arrays(cache_dir, entries, num_rows, embed_dim)
        dim = embed_dim
    else:
        ids, offsets, dim = _save_arrays(cache_dir, entries, embed_dim)
    write_json(os.path.join(cache_dir, "index.json"), {"image_ids": ids, "offsets": offsets})
    manifest = dict(
        manifest,
        format_version=CACHE_FORMAT_VERSION,
        num_images=len(ids),
        num_proposals_total=offsets[-1],
        embed_dim=int(dim),
        files={name: file_record(os.path.join(cache_dir, name)) for name in FILES},
    )
    write_json(os.path.join(cache_dir, MANIFEST), manifest)


def _save_arrays(cache_dir, entries, embed_dim):
    ids, boxes, scores, embs, offsets = [], [], [], [], [0]
    for image_id, e in entries:
        ids.append(str(image_id))
        boxes.append(np.asarray(e.boxes, np.float32).reshape(-1, 4))
        scores.append(np.asarray(e.scores, np.float32).reshape(-1))
        embs.append(np.asarray(e.embeddings, np.float16))
        offsets.append(offsets[-1] + len(boxes[-1]))
    dim = embed_dim if embed_dim is not None else (embs[0].shape[1] if embs else 0)
    arrays = {
        "boxes.npy": np.concatenate(boxes) if boxes else np.zeros((0, 4), np.float32),
        "scores.npy": np.concatenate(scores) if scores else np.zeros((0,), np.float32),
        "embeddings.npy": (
            np.concatenate([e.reshape(-1, dim) for e in embs])
            if embs
            else np.zeros((0, dim), np.float16)
        ),
    }
    for name, arr in arrays.items():
        with atomic_write(os.path.join(cache_dir, name), "wb") as f:
            np.save(f, arr)
    return ids, offsets, dim


def _stream_arrays(cache_dir, entries, num_rows: int, embed_dim: int):
    """The arrays written row block by row block into .npy files mapped in memory (same bytes as
    np.save), each renamed into place once all are written; returns (image ids, offsets)."""
    specs = {
        "boxes.npy": (np.float32, (num_rows, 4)),
        "scores.npy": (np.float32, (num_rows,)),
        "embeddings.npy": (np.float16, (num_rows, embed_dim)),
    }
    with contextlib.ExitStack() as files:
        out = {}
        for name, (dtype, shape) in specs.items():
            f = files.enter_context(atomic_write(os.path.join(cache_dir, name), "wb"))
            out[name] = np.lib.format.open_memmap(f.name, "w+", dtype, shape)
        ids, offsets = [], [0]
        for image_id, e in entries:
            start = offsets[-1]
            end = start + len(e.boxes)
            if end > num_rows:
                raise ValueError(f"the entries hold more than the announced {num_rows} rows")
            out["boxes.npy"][start:end] = np.asarray(e.boxes, np.float32).reshape(-1, 4)
            out["scores.npy"][start:end] = np.asarray(e.scores, np.float32).reshape(-1)
            embeddings = np.asarray(e.embeddings, np.float16).reshape(-1, embed_dim)
            out["embeddings.npy"][start:end] = embeddings
            ids.append(str(image_id))
            offsets.append(end)
        if offsets[-1] != num_rows:
            raise ValueError(f"the entries hold {offsets[-1]} rows, not the announced {num_rows}")
        for arr in out.values():
            arr.flush()
        out.clear()  # unmaps the files before they are synced and renamed
    return ids, offsets
