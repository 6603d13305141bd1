"""The two all-to-alls of Ulysses sequence parallelism, differentiable and traceable.

On each of the P ranks of a group, `sequence_to_heads` turns a sequence shard,
(B, L/P, H, D) in layout "bshd" or (B, H, L/P, D) in "bhsd", into the whole sequence for
the rank's share of the heads, (B, L, H/P, D) or (B, H/P, L, D): rank r gets heads
[r H/P, (r + 1) H/P), and the sequence is the ranks' shards in rank order.
`heads_to_sequence` is its inverse. Both go through torch's functional collectives, so
autograd differentiates them (the backward of each is the other) and torch.compile traces
them into its graph.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def sequence_axis(layout: str) -> int:
    """The axis of L in a (B, L, H, D) ("bshd") or (B, H, L, D) ("bhsd") tensor."""
    return 1 if layout == "bshd" else 2


def head_axis(layout: str) -> int:
    """The axis of H in a (B, L, H, D) ("bshd") or (B, H, L, D) ("bhsd") tensor."""
    return 2 if layout == "bshd" else 1


def sequence_to_heads(x: torch.Tensor, group: dist.ProcessGroup, layout: str) -> torch.Tensor:
    """This rank's sequence shard -> the whole sequence for this rank's heads."""
    return _all_to_all(x, group, split_axis=head_axis(layout), concat_axis=sequence_axis(layout))


def heads_to_sequence(x: torch.Tensor, group: dist.ProcessGroup, layout: str) -> torch.Tensor:
    """The whole sequence for this rank's heads -> this rank's sequence shard, all heads."""
    return _all_to_all(x, group, split_axis=sequence_axis(layout), concat_axis=head_axis(layout))


def _all_to_all(
    x: torch.Tensor, group: dist.ProcessGroup, split_axis: int, concat_axis: int
) -> torch.Tensor:
    """Cut `split_axis` into P equal parts, send part j to rank j, and concatenate what
    arrives along `concat_axis` in rank order. The caller checks that P divides the axis."""
    # Imported here: importing sla_tl must not need a torch built with distributed support.
    from torch.distributed._functional_collectives import all_to_all_single_autograd

    world = dist.get_world_size(group)
    # all_to_all_single exchanges equal slices of dim 0, so the destination rank goes first.
    parts = x.unflatten(split_axis, (world, x.shape[split_axis] // world)).movedim(split_axis, 0)
    received = all_to_all_single_autograd(parts.contiguous(), None, None, group)
    # received[i] came from rank i; it takes its place ahead of `concat_axis`, then merges.
    return received.movedim(0, concat_axis).flatten(concat_axis, concat_axis + 1)
