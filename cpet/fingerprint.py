"""Fingerprints: what produced a result, so a rerun reuses it only when nothing that matters changed.

A fingerprint is the SHA-256 of a canonical JSON record of the inputs (config values, digests of the
backbone's weight files and of the exact examples used). Run folders, checkpoints and compressed
backbones store the record beside their outputs; a rerun recomputes it and compares, and a
difference is reported key by key (``diff``) instead of silently reusing stale results.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
from pathlib import Path

import torch
import transformers

import cpet

FORMAT = 1  # bump when a change to cpet makes old results incomparable

_FILE_CACHE: dict[tuple, str] = {}


def _canonical(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(obj) -> str:
    """Short SHA-256 of a JSON-able object (key order does not matter; tuples == lists)."""
    return hashlib.sha256(_canonical(obj).encode()).hexdigest()[:16]


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (cached per path, size and mtime for this process)."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _FILE_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 22), b""):
                h.update(chunk)
        _FILE_CACHE[key] = h.hexdigest()[:16]
    return _FILE_CACHE[key]


WEIGHT_FILES = ("*.safetensors", "*.bin", "*.pt", "config.json", "compression.json")


def folder_digest(path: str | os.PathLike) -> str:
    """Digest of a model folder's weights and config (not its tokenizer or README)."""
    p = Path(path)
    files = sorted({f for pattern in WEIGHT_FILES for f in p.glob(pattern) if f.is_file()})
    return digest({f.name: file_digest(f) for f in files})


def model_digest(path: str) -> str:
    """A backbone's identity (``path`` as ``cpet.models.resolve_model_path`` gives it): the digest of its
    local folder, or its hub id (cpet loads the hub's default revision)."""
    return folder_digest(path) if Path(path).is_dir() else f"hub:{path}"


def examples_digest(*splits) -> str:
    """Digest of the exact examples (text, labels, answers) in each split, in order."""
    h = hashlib.sha256()
    for split in splits:
        h.update(b"\x00split\x00")
        for e in split:
            h.update(repr(e).encode())
    return h.hexdigest()[:16]


def tensor_digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().contiguous().numpy().tobytes()).hexdigest()[:16]


def flatten(obj, prefix: str = "") -> dict[str, object]:
    """{"a": {"b": 1}} -> {"a.b": 1}; lists stay values."""
    if not isinstance(obj, dict):
        return {prefix: obj}
    out: dict[str, object] = {}
    for k, v in obj.items():
        out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def diff(old: dict, new: dict, limit: int = 6) -> str:
    """What changed between two records, as ``key: old -> new`` (at most ``limit``, then a count)."""
    a, b = flatten(json.loads(_canonical(old))), flatten(json.loads(_canonical(new)))
    keys = sorted(k for k in set(a) | set(b) if a.get(k, "<unset>") != b.get(k, "<unset>"))
    parts = [f"{k}: {a.get(k, '<unset>')!r} -> {b.get(k, '<unset>')!r}" for k in keys[:limit]]
    if len(keys) > limit:
        parts.append(f"and {len(keys) - limit} more")
    return "; ".join(parts) or "nothing (the record format changed)"


def provenance() -> dict:
    """Versions and machine a result was produced with."""
    return {"cpet": cpet.__version__, "commit": _COMMIT, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "cpu": _cpu_name()}


def _cpu_name() -> str:
    """The CPU's model name where the OS says it (Linux), else what ``platform`` knows (often just x86_64)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit() -> str | None:
    """The commit of the cpet checkout, if cpet runs from one (read from .git, no subprocess)."""
    root = Path(__file__).resolve().parent.parent / ".git"
    try:
        head = (root / "HEAD").read_text().strip()
        if head.startswith("ref: "):
            ref = root / head[5:]
            if ref.is_file():
                return ref.read_text().strip()[:12]
            packed = (root / "packed-refs").read_text().splitlines() if (root / "packed-refs").is_file() else []
            return next((line.split()[0][:12] for line in packed if line.endswith(head[5:])), None)
        return head[:12]
    except OSError:
        return None


# read once, when cpet is imported: a long run records the code it started with, not a commit made while it ran
_COMMIT = _git_commit()
