"""The static gate's facts about each kernel, cached on disk, so that a run over kernels
already examined compiles nothing.

An entry is one JSON file, `<key>.json`, under `$SLA_TL_CACHE_DIR/static_facts`; the key is
a hash of everything the facts depend on (the kernel's CUDA source, target, nvcc flags and
version, TileLang's version, and the code that reads the facts, see
`sla_tl.static_check.cache_key`), so a changed kernel, flag or tool is a miss, never a stale
hit. The cache never fails the gate: an entry that cannot be read or is not what this code
writes is reported in a warning naming its path and recomputed; one that cannot be written
is reported and skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from .paths import cache_dir

SUBDIRECTORY = "static_facts"

T = TypeVar("T")


class StaticCacheWarning(UserWarning):
    """A cache entry of the static gate was damaged, or could not be written."""


def directory() -> Path:
    """Where the entries live: `static_facts` in the sla_tl cache directory."""
    return cache_dir() / SUBDIRECTORY


def key(parts: Mapping[str, object]) -> str:
    """A cache key: the SHA-256 of `parts` (JSON values) in a canonical JSON form."""
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def entry_path(entry_key: str, where: Path | None = None) -> Path:
    """The file of an entry."""
    return (where or directory()) / f"{entry_key}.json"


def load(entry_key: str, read: Callable[[dict], T], where: Path | None = None) -> T | None:
    """`read` of the facts cached under `entry_key`, or None: absent, or damaged (unreadable,
    not JSON, another key's, or facts `read` rejects with ValueError or TypeError), then
    with a `StaticCacheWarning` naming the file."""
    path = entry_path(entry_key, where)
    try:
        with open(path) as f:
            entry = json.load(f)
    except (FileNotFoundError, NotADirectoryError):  # no entry (or no directory) yet
        return None
    except (OSError, ValueError) as error:
        _damaged(path, str(error))
        return None
    if not isinstance(entry, dict) or entry.get("key") != entry_key:
        _damaged(path, "not an entry for this key")
        return None
    try:
        return read(entry.get("facts"))
    except (ValueError, TypeError) as error:
        _damaged(path, str(error))
        return None


def _damaged(path: Path, reason: str) -> None:
    warnings.warn(f"damaged static-facts cache entry {path} ({reason}); recomputing it",
                  StaticCacheWarning, stacklevel=3)


def store(entry_key: str, facts: Mapping[str, object], where: Path | None = None) -> None:
    """Write an entry (atomically: parallel workers may write the same one); a warning
    naming the file, not an error, where it cannot be written."""
    path = entry_path(entry_key, where)
    temporary = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=path.stem,
                                         suffix=".tmp", delete=False) as f:
            temporary = f.name
            json.dump({"key": entry_key, "facts": dict(facts)}, f, indent=1, sort_keys=True)
        os.replace(temporary, path)
    except OSError as error:
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        warnings.warn(f"cannot write the static-facts cache entry {path}: "
                      f"{error.strerror or error}", StaticCacheWarning, stacklevel=2)
