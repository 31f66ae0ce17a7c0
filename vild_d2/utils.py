"""What every part of the package shares: one digest, one atomic write, and the error a user can
fix, which the tools report in one line."""
import contextlib
import hashlib
import json
import os
import sys
import threading
from typing import IO, Callable, Iterator, Optional

__all__ = ["ConfigError", "UserError", "atomic_write", "digest", "file_damage", "file_record", "run_tool", "write_json"]

DEBUG_ENV = "VILD_D2_DEBUG"  # set to 1 for the traceback of a UserError


class UserError(Exception):
    """An error its message tells the user how to fix (a file, a value, a command line): the
    tools print that one line and exit with 2, without a traceback unless $VILD_D2_DEBUG is set."""


class ConfigError(UserError, ValueError):
    """A config file, key or value that cannot be used."""


def run_tool(main: Callable[[], Optional[int]], prog: str) -> int:
    """``main()``'s exit status; a UserError (or one raised through detectron2's launch) becomes
    one line ``<prog>: error: <message>`` and status 2."""
    try:
        return main() or 0
    except UserError as e:
        if os.environ.get(DEBUG_ENV):
            raise
        message = str(e)
        if "Traceback (most recent call last)" in message:  # raised in a data-loading worker
            last = [line for line in message.splitlines() if line.strip()][-1]
            message = last.split(": ", 1)[1] if last.startswith(type(e).__name__ + ":") else last
        message = " ".join(message.split())  # one line, whatever the message held
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        return 2


def digest(obj=None, *, path: Optional[str] = None, length: int = 16) -> str:
    """The first ``length`` hex digits of a sha256: of the bytes of the file ``path``; else of
    ``obj`` itself when it is text (UTF-8) or bytes; else of ``obj`` as JSON with sorted keys
    (tuples read as lists, objects JSON does not know by their ``str``)."""
    h = hashlib.sha256()
    if path is not None:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    elif isinstance(obj, (str, bytes)):
        h.update(obj.encode() if isinstance(obj, str) else obj)
    else:
        h.update(json.dumps(obj, sort_keys=True, default=str).encode())
    return h.hexdigest()[:length]


@contextlib.contextmanager
def atomic_write(path: str, mode: str = "w") -> Iterator[IO]:
    """A file object whose contents replace ``path`` only once the block ends without an error:
    written to a temporary name beside ``path``, flushed to disk, then renamed over it. A reader
    of ``path`` sees the old file or the whole new one, never a part; on an error the temporary
    file is removed and ``path`` is left as it was."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
    try:
        with open(tmp, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def write_json(path: str, obj, indent: Optional[int] = 1) -> None:
    """``obj`` as JSON at ``path``, atomically (see ``atomic_write``); ``indent`` None: compact."""
    with atomic_write(path) as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def file_record(path: str) -> dict:
    """What a file was when it was written: its size and sha256, to check it against later."""
    return {"bytes": os.path.getsize(path), "sha256": digest(path=path, length=64)}


def file_damage(path: str, record: dict, checksum: bool = True) -> Optional[str]:
    """Why ``path`` is not the file ``record`` describes (missing, another size, other bytes), or
    None when it is. ``checksum`` False checks the size alone (cheap for large files)."""
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    if size != record.get("bytes"):
        return f"has {size} bytes where {record.get('bytes')} were written"
    if checksum and record.get("sha256") and digest(path=path, length=64) != record["sha256"]:
        return "differs from what was written (sha256)"
    return None
