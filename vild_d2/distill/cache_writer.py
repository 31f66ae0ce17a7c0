"""Resumable writing of an embedding cache: fixed chunks of images, one part file per finished
chunk, then one finalize into the ``embedding_cache`` format.

While a run is unfinished, the output directory holds::

  parts/key.json                     the key (what determines the contents) of the run
  parts/part-<start>-<stop>.npz      the entries of images [start, stop) of the global order

A part is written to a temporary name, fsync'ed and renamed, so a part name always holds a whole
chunk, whatever moment the writer was killed at. Chunks are cut from the global image order
alone, so which process wrote a part, and how often the run was interrupted, does not change the
cache; finalize reads the parts in order, writes the cache (manifest last) and removes them.
"""

import json
import logging
import os
import shutil
from dataclasses import dataclass
from typing import Dict, Iterator, List, Sequence, Tuple

import numpy as np

from ..utils import atomic_write, digest, write_json
from .embedding_cache import MANIFEST, CacheEntry, CacheError, cache_damage, read_manifest, write_cache

__all__ = ["CacheWriter", "Chunk", "make_chunks"]

logger = logging.getLogger(__name__)

PARTS = "parts"
# the manifest field that names what a key's value was computed from
SOURCE_FIELDS = {"clip_fingerprint": "clip_model", "stage1_weights_sha256": "stage1_weights"}
PART_KEY = "key.json"


@dataclass(frozen=True)
class Chunk:
    index: int
    start: int  # first image of the chunk in the global order
    stop: int  # one past its last image

    @property
    def name(self) -> str:
        return f"part-{self.start:09d}-{self.stop:09d}.npz"


def make_chunks(num_images: int, chunk_size: int) -> List[Chunk]:
    if chunk_size < 1:
        raise ValueError(f"chunk size must be at least 1, got {chunk_size}")
    starts = range(0, num_images, chunk_size)
    return [Chunk(k, s, min(s + chunk_size, num_images)) for k, s in enumerate(starts)]


def _canonical(obj):
    """JSON-equal form (tuples become lists), so that a key compares equal to its manifest copy."""
    return json.loads(json.dumps(obj, sort_keys=True))


def _first_difference(have: dict, want: dict):
    for k, v in _canonical(want).items():
        if have.get(k) != v:
            return k, have.get(k), v
    return None


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CacheWriter:
    """The output directory of one cache key: its state, its parts and their finalize.

    Only one process (rank 0) calls :meth:`prepare` and :meth:`finalize`; any process may write
    the parts of its own chunks.
    """

    def __init__(self, output_dir: str, key: dict, sources: Dict[str, str] = None):
        """``sources``: for a key, what its value was computed from in this run (the CLIP model
        behind ``clip_fingerprint``, the file behind ``stage1_weights_sha256``), named in the error
        when an existing cache differs there; the manifest records the same of the cache."""
        self.output_dir = output_dir
        self.sources = dict(sources or {})
        self.key = _canonical(key)
        self.key_hash = digest(self.key)
        self.parts_dir = os.path.join(output_dir, PARTS)

    # ------------------------------------------------------------------ state

    def is_complete(self) -> bool:
        """True for a finished cache of this key whose files are the ones written (sizes and
        sha256); False for none, or for a damaged one, which is then no longer marked finished;
        CacheError for a finished cache of another key."""
        path = os.path.join(self.output_dir, MANIFEST)
        if not os.path.isfile(path):
            return False
        manifest = read_manifest(self.output_dir)
        diff = _first_difference(manifest, self.key)
        if diff is not None:
            k, have, want = diff
            was, now = manifest.get(SOURCE_FIELDS.get(k, ""), ""), self.sources.get(k, "")
            raise CacheError(
                f"{self.output_dir} already holds an embedding cache with {k}={have!r}"
                f"{f' ({was})' if was else ''}, but this run asks for {k}={want!r}"
                f"{f' ({now})' if now else ''}; pass another --output-dir, or delete that one to "
                "rebuild it"
            )
        damaged = cache_damage(self.output_dir, manifest)
        if damaged:
            logger.warning(f"embedding cache {damaged}: rebuilding it")
            os.remove(path)
            return False
        return True

    def prepare(self) -> None:
        """Make the parts folder, or check that the parts already there are of this key."""
        os.makedirs(self.parts_dir, exist_ok=True)
        path = os.path.join(self.parts_dir, PART_KEY)
        if os.path.isfile(path):
            with open(path) as f:
                diff = _first_difference(json.load(f), self.key)
            if diff is not None:
                k, have, want = diff
                raise CacheError(
                    f"{self.parts_dir} holds the unfinished parts of a run with {k}={have!r}, but "
                    f"this run asks for {k}={want!r}; pass another --output-dir, or delete "
                    f"{self.parts_dir} to discard them"
                )
        else:
            write_json(path, self.key)
            _fsync_dir(self.parts_dir)

    def done(self, chunks: Sequence[Chunk]) -> List[int]:
        """Indices of the chunks whose part is written."""
        present = set(os.listdir(self.parts_dir)) if os.path.isdir(self.parts_dir) else set()
        return [c.index for c in chunks if c.name in present]

    # ------------------------------------------------------------------ parts

    def write_part(
        self, chunk: Chunk, image_ids: Sequence[str], entries: Sequence[CacheEntry]
    ) -> int:
        """Write one chunk's entries atomically; returns the bytes written."""
        if len(image_ids) != chunk.stop - chunk.start or len(entries) != len(image_ids):
            raise ValueError(f"chunk {chunk} needs {chunk.stop - chunk.start} entries")
        dim = entries[0].embeddings.shape[1] if entries else 0
        offsets = np.cumsum([0] + [len(e.boxes) for e in entries]).astype(np.int64)
        arrays = {
            "key_hash": np.array(self.key_hash),
            "image_ids": np.array([str(i) for i in image_ids]),
            "offsets": offsets,
            "boxes": np.concatenate(
                [np.asarray(e.boxes, np.float32).reshape(-1, 4) for e in entries]
            ),
            "scores": np.concatenate(
                [np.asarray(e.scores, np.float32).reshape(-1) for e in entries]
            ),
            "embeddings": np.concatenate(
                [np.asarray(e.embeddings, np.float16).reshape(-1, dim) for e in entries]
            ),
        }
        path = os.path.join(self.parts_dir, chunk.name)
        with atomic_write(path, "wb") as f:
            np.savez(f, **arrays)
            size = f.tell()
        _fsync_dir(self.parts_dir)
        return size

    def read_part(self, chunk: Chunk, image_ids: Sequence[str]) -> Iterator[Tuple[str, CacheEntry]]:
        path = os.path.join(self.parts_dir, chunk.name)
        with np.load(path, allow_pickle=False) as part:
            ids = [str(i) for i in part["image_ids"]]
            if str(part["key_hash"]) != self.key_hash or ids != [str(i) for i in image_ids]:
                raise CacheError(
                    f"part {path} does not belong to this run (other key or images); delete "
                    f"{self.parts_dir} and run again"
                )
            offsets = part["offsets"]
            boxes, scores, embs = part["boxes"], part["scores"], part["embeddings"]
        for k, image_id in enumerate(ids):
            rows = slice(int(offsets[k]), int(offsets[k + 1]))
            yield image_id, CacheEntry(boxes[rows], scores[rows], embs[rows])

    def _part_rows(self, chunk: Chunk) -> int:
        with np.load(os.path.join(self.parts_dir, chunk.name), allow_pickle=False) as part:
            return int(part["offsets"][-1])

    # ------------------------------------------------------------------ finalize

    def finalize(
        self, chunks: Sequence[Chunk], image_ids: Sequence[str], embed_dim: int, manifest: Dict
    ) -> dict:
        """All parts, in order, into the cache (manifest last); then the parts are removed."""
        done = set(self.done(chunks))
        missing = [c.name for c in chunks if c.index not in done]
        if missing:
            raise CacheError(
                f"cannot finalize {self.output_dir}: {len(missing)} chunk(s) unfinished, e.g. "
                f"{missing[0]}; run the tool again to compute them"
            )
        num_rows = sum(self._part_rows(c) for c in chunks)

        def entries():
            for c in chunks:
                yield from self.read_part(c, image_ids[c.start : c.stop])

        write_cache(
            self.output_dir,
            entries(),
            dict(manifest, **self.key),
            embed_dim=embed_dim,
            num_rows=num_rows,
        )
        self.remove_parts()
        with open(os.path.join(self.output_dir, MANIFEST)) as f:
            return json.load(f)

    def remove_parts(self) -> None:
        shutil.rmtree(self.parts_dir, ignore_errors=True)

    def cache_bytes(self) -> int:
        names = ("boxes.npy", "scores.npy", "embeddings.npy", "index.json", MANIFEST)
        return sum(
            os.path.getsize(os.path.join(self.output_dir, n))
            for n in names
            if os.path.isfile(os.path.join(self.output_dir, n))
        )
