"""Stages that are skipped when their outputs exist and match their inputs.

A stage's stamp (``<output>/stages/<name>.json``) holds the key its inputs hash to and what it
returned; it is written last, so a stage killed midway runs again (and resumes where the stage
itself can, like training from its last checkpoint).
"""
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional

from ..utils import digest, write_json


class StageRunner:
    def __init__(self, output_dir: str, log: Callable[[str], None] = print):
        self.dir = os.path.join(output_dir, "stages")
        os.makedirs(self.dir, exist_ok=True)
        self.log = log
        self.seconds: Dict[str, float] = {}
        self.digests: Dict[str, str] = {}
        self._count = 0
        self._lock = threading.Lock()

    def run(self, name: str, key: dict, fn: Callable[[], dict], outputs: Iterable[str] = (),
            after: Iterable[str] = (), clean: Optional[Callable[[], None]] = None) -> dict:
        """Run ``fn`` unless a stamp for the same key (and the same upstream stages) exists and
        every path in ``outputs`` does. Returns what ``fn`` returned (or the stamped copy).

        ``clean`` removes a stage's partial outputs: it is called before ``fn`` when the stage last
        started under another key (stale work), but not when the same key was interrupted (then
        ``fn`` resumes, e.g. training from its last checkpoint)."""
        full_key, stamp_digest, stamp_path = self._identify(name, key, after)
        with self._lock:
            self._count += 1
            n = self._count
        stamp = _read(stamp_path)
        outputs = list(outputs)
        if self._current(stamp, stamp_digest, outputs):
            self.log(f"[{n}] {name}: up to date, skipped")
            self.seconds[name] = stamp.get("seconds", 0.0)
            self.digests[name] = stamp_digest
            return stamp.get("result", {})
        self.log(f"[{n}] {name}: running")
        started_path = os.path.join(self.dir, f"{name}.started")
        started = _read(started_path)
        if clean is not None and started is not None and started.get("digest") != stamp_digest:
            self.log(f"[{n}] {name}: inputs changed, removing its old outputs")
            clean()
        write_json(started_path, {"digest": stamp_digest})
        start = time.perf_counter()
        result = fn() or {}
        seconds = time.perf_counter() - start
        write_json(stamp_path, {"digest": stamp_digest, "key": full_key, "result": result, "seconds": seconds})
        self.seconds[name] = seconds
        self.digests[name] = stamp_digest
        self.log(f"[{n}] {name}: done in {seconds:.1f} s")
        return result

    def _identify(self, name, key, after):
        full_key = {"key": key, "after": {a: self.digests[a] for a in after}}
        return full_key, digest(full_key), os.path.join(self.dir, f"{name}.json")

    @staticmethod
    def _current(stamp, stamp_digest, outputs) -> bool:
        return bool(stamp) and stamp.get("digest") == stamp_digest and all(os.path.exists(p) for p in outputs)

    def is_current(self, name: str, key: dict, outputs: Iterable[str] = (), after: Iterable[str] = (),
                   **_) -> bool:
        """Whether ``run`` with these arguments would skip the stage."""
        _, stamp_digest, stamp_path = self._identify(name, key, after)
        return self._current(_read(stamp_path), stamp_digest, list(outputs))

    def run_parallel(self, stages: List[dict], workers: int) -> List[dict]:
        """Run independent stages (each a dict of ``run``'s arguments) ``workers`` at a time;
        their results in the given order. The first failure is raised once all have stopped."""
        if workers <= 1 or len(stages) <= 1:
            return [self.run(**s) for s in stages]
        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(self.run, **s) for s in stages]
            errors = [f.exception() for f in futures]
        for e in errors:
            if e is not None:
                raise e
        return [f.result() for f in futures]


def _read(path: str) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
