"""Stages that are skipped when their outputs are the ones they wrote and match their inputs.

A stage's stamp (``<output>/stages/<name>.json``) holds the key its inputs hash to, what it
returned, and each output file's size and sha256 when it finished; it is written last, so a stage
killed midway runs again (and resumes where the stage itself can, like training from its last
checkpoint). A stage whose inputs changed keeps its old outputs aside (``<path>.previous``) while
it runs: they come back if it fails, and are deleted once it has finished.
"""
import json
import os
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, Iterable, List, Optional

from ..utils import digest, file_damage, file_record, write_json

ASIDE = ".previous"


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


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
            after: Iterable[str] = (), replaces: Iterable[str] = ()) -> dict:
        """Run ``fn`` unless a stamp for the same key (and the same upstream stages) exists and
        every path in ``outputs`` is the file the stage wrote. Returns what ``fn`` returned (or the
        stamped copy).

        ``replaces``: the files and folders the stage writes. When the stage last started under
        another key, they are moved aside before ``fn`` runs (stale work), restored if it fails and
        deleted once it succeeds; when the same key was interrupted they stay, and ``fn`` resumes
        (e.g. training from its last checkpoint)."""
        full_key, stamp_digest, stamp_path = self._identify(name, key, after)
        with self._lock:
            self._count += 1
            n = self._count
        stamp = _read(stamp_path)
        outputs = list(outputs)
        why = self._not_current(stamp, stamp_digest, outputs)
        if why is None:
            self.log(f"[{n}] {name}: up to date, skipped")
            self.seconds[name] = stamp.get("seconds", 0.0)
            self.digests[name] = stamp_digest
            return stamp.get("result", {})
        self.log(f"[{n}] {name}: running" + (f" ({why})" if why != "not run yet" else ""))
        started_path = os.path.join(self.dir, f"{name}.started")
        started = _read(started_path)
        replaces = [p for p in replaces]
        if started is not None and started.get("digest") != stamp_digest:
            moved = [p for p in replaces if os.path.lexists(p)]
            if moved:
                self.log(f"[{n}] {name}: inputs changed; its old outputs stay aside until it is done")
            for p in moved:
                _remove(p + ASIDE)
                os.rename(p, p + ASIDE)
        write_json(started_path, {"digest": stamp_digest})
        start = time.perf_counter()
        try:
            result = fn() or {}
        except BaseException:
            if self._restore(replaces):  # the old outputs are back: so is their key
                if started is None:
                    os.remove(started_path)
                else:
                    write_json(started_path, started)
            raise
        seconds = time.perf_counter() - start
        records = {p: file_record(p) for p in outputs if os.path.isfile(p)}
        write_json(stamp_path, {"digest": stamp_digest, "key": full_key, "result": result,
                                "seconds": seconds, "outputs": records})
        for p in replaces:
            if os.path.lexists(p + ASIDE):
                _remove(p + ASIDE)
        self.seconds[name] = seconds
        self.digests[name] = stamp_digest
        self.log(f"[{n}] {name}: done in {seconds:.1f} s")
        return result

    @staticmethod
    def _restore(paths: List[str]) -> bool:
        """After a failure: the previous outputs back in place of the partial new ones; whether
        there were any."""
        restored = False
        for p in paths:
            if os.path.lexists(p + ASIDE):
                if os.path.lexists(p):
                    _remove(p)
                os.rename(p + ASIDE, p)
                restored = True
        return restored

    def _identify(self, name, key, after):
        full_key = {"key": key, "after": {a: self.digests[a] for a in after}}
        return full_key, digest(full_key), os.path.join(self.dir, f"{name}.json")

    @staticmethod
    def _not_current(stamp, stamp_digest, outputs) -> Optional[str]:
        """Why the stage must run, or None when its stamp and every output are as it left them."""
        if not stamp:
            return "not run yet"
        if stamp.get("digest") != stamp_digest:
            return "inputs changed"
        records = stamp.get("outputs", {})
        for p in outputs:
            if not os.path.exists(p):
                return f"{p} is missing"
            damage = file_damage(p, records[p]) if p in records else None
            if damage:
                return f"{p} {damage}"
        return None

    def is_current(self, name: str, key: dict, outputs: Iterable[str] = (), after: Iterable[str] = (),
                   **_) -> bool:
        """Whether ``run`` with these arguments would skip the stage."""
        _, stamp_digest, stamp_path = self._identify(name, key, after)
        return self._not_current(_read(stamp_path), stamp_digest, list(outputs)) is None

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
