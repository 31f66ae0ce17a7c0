"""The tool commands the main job runs, built so that a person can run each by hand: a config file,
the tool's flags, and overrides of paths and seeds only."""
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field
from typing import Dict, List

from ..utils import UserError

class StageError(UserError, RuntimeError):
    """A tool the pipeline ran that failed; its own error line and its log name the cause."""


# config keys that hold paths: the pipeline moves the ones under the configs' output root into its
# own output folder
PATH_KEYS = ("OUTPUT_DIR", "MODEL.WEIGHTS", "MODEL.VILD.DISTILL.CACHE_DIR",
             "MODEL.VILD.TEXT_EMBEDDINGS_CACHE_DIR", "MODEL.VILD.TEXT_EMBEDDINGS_PATH")


def shown(path: str) -> str:
    """A path as the commands show it: relative to the working folder when inside it."""
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else os.path.abspath(path)


def cfg_value(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


@dataclass
class Command:
    """``[ENV=...] python tools/<tool>.py --config-file <config> <flags> <KEY VALUE ...>``; paths
    in ``opts`` and ``env`` are given as ``shown`` makes them."""

    tool: str  # the script's path
    config: str  # the config file's path
    flags: List[str] = field(default_factory=list)
    opts: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)

    def words(self) -> List[str]:
        return [shown(self.tool), "--config-file", shown(self.config), *self.flags, *self.opts]

    def argv(self) -> List[str]:
        return [sys.executable, *self.words()]

    def text(self) -> str:
        """The command as a person types it in the working folder (the one it runs in)."""
        env = [f"{k}={shlex.quote(v)}" for k, v in self.env.items()]
        return " ".join(env + ["python"] + [shlex.quote(w) for w in self.words()])

    def run(self, log_path: str) -> None:
        """Run it, its output to ``log_path``; on failure, raise with the log's tail."""
        with open(log_path, "a") as log:
            log.write(f"$ {self.text()}\n")
            log.flush()
            proc = subprocess.run(self.argv(), env=dict(os.environ, PYTHONUNBUFFERED="1", **self.env),
                                  stdout=log, stderr=subprocess.STDOUT)
        if proc.returncode != 0:
            with open(log_path) as f:
                lines = [line.strip() for line in f if line.strip()]
            # a tool's own one-line error when it has one, else the log's last line
            said = next((line for line in reversed(lines) if ": error: " in line), lines[-1] if lines else "")
            raise StageError(f"{os.path.basename(self.tool)} failed (exit {proc.returncode}): {said} "
                             f"(log: {shown(log_path)})")
