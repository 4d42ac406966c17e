"""Atomic file writes: a reader (or a crash) never sees a half-written file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from cpet.errors import CpetError


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, then rename it over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write(path, json.dumps(obj, indent=2).encode())


def read_json(path: str | os.PathLike, what: str, fix: str):
    """Parse a JSON file cpet wrote; a truncated or corrupt one is a CpetError naming the file and ``fix``."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CpetError(f"{path} ({what}) is corrupt or truncated ({e}); {fix}") from None
    except OSError as e:
        raise CpetError(f"cannot read {path} ({what}): {e.strerror}; {fix}") from None


def load_safetensors(path: str | os.PathLike, what: str, fix: str) -> dict:
    """Load a safetensors file (never a pickle); a corrupt or truncated one is a CpetError naming it."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CpetError(f"{path} ({what}) is corrupt or truncated ({str(e).splitlines()[0]}); {fix}") from None


DATA_ENV = "CPET_DATA"
DEFAULT_DATA_DIR = "../shared/data"


def resolve_data_dir(data_dir: str | None) -> Path | None:
    """Config/flag value, else $CPET_DATA, else ../shared/data if it exists; None means use the hub."""
    chosen = data_dir or os.environ.get(DATA_ENV)
    if chosen:
        p = Path(chosen)
        if not p.is_dir():
            raise CpetError(f"data folder {p} does not exist; pass task.data_dir=PATH or set ${DATA_ENV}")
        return p
    p = Path(DEFAULT_DATA_DIR)
    return p if p.is_dir() else None


def require_new_folder(path: str | os.PathLike) -> Path:
    """``path`` as an output folder that does not exist or is empty (nothing is ever overwritten)."""
    out = Path(path)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CpetError(f"{out} exists and is not empty; choose a new output folder (nothing is overwritten)")
    return out


@contextmanager
def folder_lock(folder: str | os.PathLike, log=None):
    """Hold an exclusive lock on ``folder`` (a paradigm or backbone folder of a run) while checking or making
    it, so concurrent runs on one machine (``cpet grid --executor ray`` on a local Ray instance, two shells)
    make it once: the second waits, then finds it done. The lock file lives outside the run's folders
    (``<tmp>/cpet-locks/<hash of the folder's absolute path>.lock``: a refused command changes nothing in
    them) and is held with flock, released when its holder exits or dies, so a crash never leaves it stuck.
    Machines of a cluster do not see each other's locks."""
    import fcntl  # POSIX only: imported where used, so cpet.io loads anywhere

    folder = Path(folder)
    key = hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:32]
    lock_path = Path(tempfile.gettempdir()) / "cpet-locks" / f"{key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log:
                log(f"waiting for another run making {folder}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
