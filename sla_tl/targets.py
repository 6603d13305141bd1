"""Which arch's kernels serve a call: a user's arch name, or the CUDA device in hand, resolved
through the arch registry (`sla_tl.schedules.archs`), with the errors users see."""

from __future__ import annotations

import functools
import re
from typing import NamedTuple

import torch

from .schedules import archs
from .schedules.archs import Arch
from .spec import HEAD_DIMS
from .validation import check_block


class Target(NamedTuple):
    """Where a call's kernels run: the GPU model (its name, or "" when compiling for none)
    and the arch whose kernels serve it."""

    gpu: str
    arch: Arch


def model_slug(gpu: str) -> str:
    """A GPU model's name as one safe path component: "NVIDIA H200" -> "NVIDIA-H200".
    Runs of other characters become "-"; leading and trailing dots and dashes go, so that
    no name can be "." or ".." (or climb out of a directory). ValueError for a name with
    no letter or digit."""
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", gpu).strip("-.")
    if not slug:
        raise ValueError(f"gpu must name a GPU model (letters or digits); got {gpu!r}")
    return slug


def arch_named(name: object) -> Arch:
    """The arch a user names ("sm90", "sm_90" or "sm_90a", ...); ValueError listing the
    names there are kernels for, NotImplementedError for an arch whose folder declares no
    kernels yet."""
    arch = archs.named(name)
    if arch is None:
        raise ValueError(f"arch must be one of {', '.join(archs.spellings())} (the archs with "
                         f"kernels); got {name!r}")
    if not arch.kernels:
        raise NotImplementedError(f"arch {arch.name} ({arch.target}) declares no kernels yet; "
                                  f"the archs with kernels: {', '.join(archs.spellings())}")
    return arch


def normalise_arch(name: object) -> str:
    """TileLang's arch for a user's arch name ("sm90", "sm_90" or "sm_90a" -> "sm_90a")."""
    return arch_named(name).target


def arch_of_capability(capability: tuple[int, int], gpu: str) -> Arch:
    """The arch serving GPUs of `capability`; NotImplementedError naming the GPU when none
    has kernels for it."""
    arch = archs.for_capability(capability)
    if arch is None:
        served = ", ".join(f"sm_{m}{n}" for a in archs.with_kernels() for m, n in a.capabilities)
        raise NotImplementedError(
            f"sla-tl has kernels for {served} only; {gpu} is sm_{capability[0]}"
            f"{capability[1]}. Run on a GPU of those archs, or use the CPU reference.")
    return arch


@functools.cache
def _target_of(index: int) -> Target:
    device = torch.device("cuda", index)
    gpu = torch.cuda.get_device_name(device)
    return Target(gpu, arch_of_capability(torch.cuda.get_device_capability(device), gpu))


def target_of(device: torch.device) -> Target:
    """The GPU model and arch of a CUDA device (resolved once per device)."""
    return _target_of(device.index if device.index is not None else torch.cuda.current_device())


def check_block_sizes(arch: Arch, block_q: int, block_kv: int) -> None:
    """Block sizes the arch's kernels are built for (the CPU reference takes any multiple of
    16)."""
    for name, value, sizes in (("block_q", block_q, arch.block_q),
                               ("block_kv", block_kv, arch.block_kv)):
        if value not in sizes:
            raise ValueError(f"{name} must be one of {sizes} on CUDA; got {value} "
                             "(the CPU reference takes any multiple of 16)")


def check_kernel_sizes(arch: Arch, dim: object, block_q: object, block_kv: object) -> None:
    """A head dim and block sizes the arch's kernels are built for."""
    if isinstance(dim, bool) or not isinstance(dim, int) or dim not in HEAD_DIMS:
        raise ValueError(f"head dim must be one of {HEAD_DIMS}; got {dim!r}")
    check_block("block_q", block_q)
    check_block("block_kv", block_kv)
    check_block_sizes(arch, block_q, block_kv)
