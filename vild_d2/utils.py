"""The file helpers every part of the package shares: one digest and one atomic write."""
import contextlib
import hashlib
import json
import os
import threading
from typing import IO, Iterator, Optional

__all__ = ["atomic_write", "digest", "write_json"]


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
