"""Where compiled kernels live on disk: one rule for every path that compiles.

Every kernel sla-tl compiles (the operators' first call, `sla-tl warm`, `sla-tl tune`, also
with `--compile-only`, `sla-tl kernels`, `sla-tl demo`, the benchmarks) goes into TileLang's
cache at `kernel_directory(target)`:

- `$TILELANG_CACHE_DIR` when the user sets it, as is;
- else `$SLA_TL_CACHE_DIR/kernels/<target>` (`SLA_TL_CACHE_DIR` defaults to
  `~/.cache/sla_tl`), e.g. `~/.cache/sla_tl/kernels/sm_90a`.

One directory per target arch, not per GPU model: TileLang keys a kernel by its text, target,
flags and version, so a kernel compiled for sm_90a on a machine without a GPU is the one an
H100 or an H200 loads, and a machine without a GPU knows the arch it compiles for but not
the model. Tuned schedules stay per GPU model (`sla_tl.config_store`); their kernels are
kernels of other texts, side by side in the arch's directory.

The directory is given to TileLang only around sla-tl's own compiles (TileLang 0.1.15 reads
`tilelang.env.env.TILELANG_CACHE_DIR` on every use, and a forced value there is restored
afterwards): nothing is set in `os.environ`, so other TileLang code in the process keeps its
own cache. A directory that cannot be made is refused by the commands (`require`), and
gives the operators one warning and compiles without a disk cache (`compiling_for`).
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path

from .paths import cache_dir

USER_VARIABLE = "TILELANG_CACHE_DIR"


def kernel_directory(target: str) -> Path:
    """The kernel cache directory for an arch's target (e.g. "sm_90a")."""
    user = os.environ.get(USER_VARIABLE)
    if user:
        return Path(user).expanduser()
    return cache_dir() / "kernels" / target


class KernelCacheWarning(UserWarning):
    """The kernel cache cannot be used; kernels are compiled without it."""


def require(target: str) -> Path:
    """`kernel_directory(target)`, made if missing; ValueError naming it if it cannot be."""
    directory = kernel_directory(target)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot use the kernel cache directory {directory}: "
                         f"{error.strerror or error}") from None
    return directory


@functools.cache
def _usable(directory: Path) -> bool:
    """Whether the operators can compile into `directory` (warned once when not)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        return True
    except OSError as error:
        warnings.warn(f"cannot use the kernel cache directory {directory}: "
                      f"{error.strerror or error}; compiling without a disk cache (point "
                      f"SLA_TL_CACHE_DIR or {USER_VARIABLE} at a writable directory)",
                      KernelCacheWarning, stacklevel=4)
        return False


_compiling = threading.RLock()


def _forced(name: str) -> object:
    """TileLang's forced value of one of its variables (None: it reads the environment)."""
    from tilelang.env import env

    return type(env).__dict__[name]._forced_value


@contextlib.contextmanager
def compiling_for(target: str) -> Iterator[Path | None]:
    """Around one of sla-tl's compiles for `target`: TileLang's cache at `kernel_directory`
    (no disk cache, warned once, where it cannot be made), as it was before afterwards.
    Yields the directory, None without a disk cache. Serialised across threads."""
    from tilelang.env import env

    directory = kernel_directory(target)
    usable = _usable(directory)
    with _compiling:
        before = {name: _forced(name) for name in (USER_VARIABLE, "TILELANG_DISABLE_CACHE")}
        if not usable:
            env.TILELANG_DISABLE_CACHE = "1"
        elif not os.environ.get(USER_VARIABLE):
            env.TILELANG_CACHE_DIR = str(directory)
        try:
            yield directory if usable else None
        finally:
            for name, value in before.items():
                setattr(env, name, value)
