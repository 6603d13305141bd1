"""Checks that a collective call can go ahead: the group, its backend, and every rank's inputs.

A collective that one rank enters with other shapes than the rest hangs or returns garbage,
and an error raised on one rank only leaves the others waiting in the next collective.
`agree_across_ranks` exchanges a description of each rank's call (one small
`all_gather_object`) so that every rank raises the same error, naming the rank at fault.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def resolve_group(group: object) -> dist.ProcessGroup:
    """The process group to run on: `group`, or the default group when it is None."""
    if not dist.is_available():
        raise ValueError("group: this torch is built without torch.distributed")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        hint = " (for a DeviceMesh pass mesh.get_group())" if hasattr(group, "get_group") else ""
        raise TypeError(
            f"group must be a torch.distributed ProcessGroup or None; got "
            f"{type(group).__name__}{hint}"
        )
    if not dist.is_initialized():
        raise ValueError(
            "group: torch.distributed is not initialised; call "
            "torch.distributed.init_process_group first"
        )
    group = dist.group.WORLD if group is None else group
    if dist.get_rank(group) < 0:
        raise ValueError("group: this process is not a member of the group")
    return group


def served_device_types(backend_config: str) -> tuple[str, ...] | None:
    """Device types a backend configuration (`torch.distributed.get_backend_config`) runs
    collectives on: "cpu:gloo,cuda:nccl" serves cpu and cuda, "cuda:nccl" cuda alone;
    None where the configuration does not say (a custom backend)."""
    parts = [part.split(":") for part in backend_config.split(",")]
    if not all(len(part) == 2 for part in parts):
        return None
    return tuple(device for device, _ in parts)


def check_served(named: dict[str, torch.Tensor], group: dist.ProcessGroup) -> None:
    """Each tensor is on a device type the group's backend serves (an NCCL group serves
    cuda tensors only)."""
    config = dist.get_backend_config(group)
    served = served_device_types(config)
    if served is None:
        return
    for name, x in named.items():
        if x.device.type not in served:
            raise ValueError(
                f"{name} is on {x.device.type} but the group's backend ({config}) serves "
                f"{', '.join(served)}; move the tensors or pass a group whose backend "
                "serves them"
            )


def host_synchronisation_allowed() -> bool:
    """False while torch.compile traces or a CUDA graph is being captured: no host
    synchronisation and no untraceable collective is allowed there."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def agree_across_ranks(
    group: dist.ProcessGroup,
    description: dict[str, object] | None,
    problem: Exception | None,
    hints: dict[str, str] | None = None,
) -> None:
    """Compare every rank's `description` of its call, field by field; raise on every rank.

    A rank whose own inputs were rejected passes its `problem` (and no description): it
    raises that, and the other ranks raise a ValueError quoting it. A field that differs
    between ranks raises a ValueError listing its value per rank, followed by
    `hints[field]` where given. Costs one small collective and a host synchronisation.
    """
    mine = ("rejected", f"{type(problem).__name__}: {problem}") if problem else ("ok", description)
    everyone: list[tuple[str, object] | None] = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if problem is not None:
        raise problem
    rejected = [f"rank {rank}: {said}" for rank, (kind, said) in enumerate(everyone)
                if kind == "rejected"]
    if rejected:
        raise ValueError("inputs were rejected on another rank of the group; "
                         + "; ".join(rejected))
    for field, value in description.items():
        values = [said[field] for _, said in everyone]
        if any(other != value for other in values):
            per_rank = ", ".join(f"rank {rank}: {v}" for rank, v in enumerate(values))
            hint = f"; {hints[field]}" if hints and field in hints else ""
            raise ValueError(
                f"{field} must be the same on every rank of the group; got {per_rank}{hint}"
            )
