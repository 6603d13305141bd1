"""Where compiled kernels live on disk: TileLang's cache, one directory per GPU model.

TileLang keys its cache by kernel text, target and version, not by GPU model; a directory
per model keeps kernels tuned for one GPU apart from another's. A `TILELANG_CACHE_DIR`
set by the user is respected as is.
"""

from __future__ import annotations

import functools
import os
import re
import warnings
from pathlib import Path

import torch

from . import kernels
from .config_store import cache_dir

_USER_DIRECTORY = os.environ.get("TILELANG_CACHE_DIR")


def model_slug(gpu: str) -> str:
    """A GPU model's name as one safe path component: "NVIDIA H200" -> "NVIDIA-H200".
    Runs of other characters become "-"; leading and trailing dots and dashes go, so that
    no name can be "." or ".." (or climb out of a directory)."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", gpu).strip("-.")
    if not slug:
        raise ValueError(f"gpu must name a GPU model (letters or digits); got {gpu!r}")
    return slug


def directory_for(gpu: str) -> Path:
    """The kernel cache directory of a GPU model (e.g. "NVIDIA H200")."""
    if _USER_DIRECTORY:
        return Path(_USER_DIRECTORY)
    return cache_dir() / "kernels" / model_slug(gpu)


class KernelCacheWarning(UserWarning):
    """The kernel cache cannot be used; kernels are compiled without it."""


def use_gpu_model(gpu: str) -> None:
    """Compile into, and load from, `gpu`'s directory from now on in this process.
    ValueError naming the directory if it cannot be made."""
    directory = directory_for(gpu)
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"cannot use the kernel cache directory {directory}: "
                         f"{error.strerror or error}") from None
    os.environ["TILELANG_CACHE_DIR"] = str(directory)


def use_gpu_model_or_no_cache(gpu: str) -> None:
    """`use_gpu_model`, or, where its directory cannot be made, a warning naming it and no
    disk cache for this process: the operators must not fail because of the cache."""
    try:
        use_gpu_model(gpu)
    except ValueError as error:
        warnings.warn(f"{error}; compiling without a disk cache (point SLA_TL_CACHE_DIR or "
                      "TILELANG_CACHE_DIR at a writable directory)", KernelCacheWarning,
                      stacklevel=2)
        os.environ["TILELANG_DISABLE_CACHE"] = "1"


@functools.cache
def _prepared(index: int) -> tuple[str, str]:
    device = torch.device("cuda", index)
    arch = kernels.arch_of(device)
    gpu = torch.cuda.get_device_name(device)
    use_gpu_model_or_no_cache(gpu)
    return gpu, arch


def prepare(device: torch.device) -> tuple[str, str]:
    """(GPU model, TileLang arch) of a CUDA device, with the kernel cache pointed at the
    model's directory; a clear error where no schedule serves the device."""
    return _prepared(device.index if device.index is not None else torch.cuda.current_device())
