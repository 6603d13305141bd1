"""Sequence parallelism for SLA: Ulysses all-to-all over torch.distributed.

Each of the P ranks of a process group holds a shard of the sequence: (B, L/P, H, D)
(layout "bshd"; (B, H, L/P, D) with "bhsd"). One all-to-all per input gives every rank
the whole sequence for H/P of the heads; SLA runs there, so routing sees every token of
those heads; a second all-to-all brings the output back to the rank's shard, all heads.
The result equals SLA over the whole sequence on one device, cut into the same shards.

Gradients flow through both all-to-alls. The projection is shared across heads, so each
rank's gradient of it covers its own heads only, just as each rank's gradient of any other
parameter the ranks share covers its own tokens: the model's gradient is their sum over
the group. This module does not reduce it; the caller's gradient reduction does, with the
rest of the parameters (see `ulysses_attention`).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import spec
from .api import attention
from .module import SparseLinearAttention
from .rank_agreement import (
    agree_across_ranks,
    check_served,
    host_synchronisation_allowed,
    resolve_group,
)
from .sequence_collectives import head_axis, heads_to_sequence, sequence_axis, sequence_to_heads
from .validation import check_projection, check_qkv, check_ratio, check_settings, check_tensors


def ulysses_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    *,
    group: dist.ProcessGroup | None = None,
    topk: float = spec.DEFAULT_TOPK,
    k_low: float = spec.DEFAULT_K_LOW,
    block_q: int = spec.DEFAULT_BLOCK_Q,
    block_kv: int = spec.DEFAULT_BLOCK_KV,
    feature_map: str = spec.DEFAULT_FEATURE_MAP,
    linear: str = spec.DEFAULT_LINEAR,
    scale: float | None = None,
    layout: str = spec.DEFAULT_LAYOUT,
    q_length: int | None = None,
    kv_length: int | None = None,
    check_shards: bool = True,
) -> torch.Tensor:
    """`sla_tl.attention` over a sequence sharded across the ranks of `group` (Ulysses).

    q: this rank's shard, (B, Lq/P, H, D) with layout="bshd" or (B, H, Lq/P, D) with
    "bhsd"; k and v likewise with Lk/P rows (Lk may differ from Lq). Rank r holds rows
    [r L/P, (r + 1) L/P) of the sequence; every rank's shards have the same shape, and P
    (the group's size) must divide H. Returns this rank's shard of the output, q's shape.
    The other arguments are those of `sla_tl.attention`, the same on every rank.

    A sequence whose length P does not divide is padded at its end to a multiple of P
    (`shard_sequence` does it) and its true lengths passed as `q_length` / `kv_length`:
    the padded rows are dropped before attention and come back as zeros.

    proj_weight and proj_bias must hold the same values on every rank. Their gradient on
    a rank covers that rank's heads; the full gradient is the sum over the group, as for
    every parameter the ranks share, and this function does not reduce it. DDP or FSDP
    over a process group that contains these ranks reduces it with the rest (averaging:
    the gradient of the mean of the ranks' losses); without them, sum each shared
    parameter's gradient over the group (`torch.distributed.all_reduce`).

    With `check_shards` (eager calls only; skipped under torch.compile and CUDA-graph
    capture) the ranks first compare their shapes, dtypes and settings in one small
    collective, so that a mismatch raises a ValueError naming the field and the rank on
    every rank instead of hanging or mixing shards; it synchronises the host with the GPU.
    """
    group = resolve_group(group)
    options = dict(topk=topk, k_low=k_low, block_q=block_q, block_kv=block_kv,
                   feature_map=feature_map, linear=linear, scale=scale)
    lengths = _checked_lengths(q, k, v, proj_weight, proj_bias, group, layout, options,
                               q_length, kv_length, check_shards)
    axis = sequence_axis(layout)
    whole = [sequence_to_heads(x, group, layout).narrow(axis, 0, length)
             for x, length in zip((q, k, v), (lengths[0], lengths[1], lengths[1]), strict=True)]
    out = attention(*whole, proj_weight, proj_bias, layout=layout, **options)
    padded_length = q.shape[axis] * dist.get_world_size(group)
    return heads_to_sequence(_pad_rows(out, axis, padded_length), group, layout)


class UlyssesAttention(nn.Module):
    """A `SparseLinearAttention` module run over a sequence sharded across `group` (Ulysses).

    Takes and returns sequence shards in the wrapped module's layout and behaves as the
    module would on the whole sequence (its settings, its projection, its compute dtype:
    the all-to-alls carry that dtype). The wrapped module is the submodule `attention`,
    so its parameters are `attention.proj_l.weight` and `attention.proj_l.bias`.
    See `ulysses_attention` for the arguments, padding and the projection's gradient.
    `group=None` means the default process group at call time.
    """

    def __init__(
        self,
        attention: SparseLinearAttention,
        group: dist.ProcessGroup | None = None,
        check_shards: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(attention, SparseLinearAttention):
            raise TypeError(
                f"attention must be a sla_tl.SparseLinearAttention; got {type(attention).__name__}"
            )
        if attention.gate_proj is not None:
            raise ValueError("attention has SALAD's gate (gate=True), which the Ulysses wrapper "
                             "does not carry across the all-to-all yet; use a module without it")
        if group is not None:
            resolve_group(group)
        self.attention = attention
        self.group = group
        self.check_shards = check_shards

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        return_sparsity: bool = False,
        q_length: int | None = None,
        kv_length: int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """This rank's output shard in q's dtype; with `return_sparsity`, also the share of
        key blocks the sparse branch computes over the whole sequence."""
        inner = self.attention
        # A non-tensor goes through to be rejected with the other ranks told (no hang).
        q_in, k_in, v_in = (x.to(inner.dtype) if isinstance(x, torch.Tensor) else x
                            for x in (q, k, v))
        out = ulysses_attention(
            q_in, k_in, v_in, inner.proj_l.weight, inner.proj_l.bias, group=self.group,
            q_length=q_length, kv_length=kv_length, check_shards=self.check_shards,
            **inner.attention_options(),
        ).to(q.dtype)
        if not return_sparsity:
            return out
        world = dist.get_world_size(resolve_group(self.group))
        shard = k.shape[sequence_axis(inner.layout)]
        return out, inner.density(shard * world if kv_length is None else kv_length)


def shard_sequence(
    x: torch.Tensor, dim: int, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """This rank's shard of a whole sequence along `dim`, as `ulysses_attention` takes it:
    the sequence padded with zeros at its end to a multiple of P, then cut into P equal
    parts, rank r taking part r. Differentiable."""
    check_tensors(x=x)
    group = resolve_group(group)
    if isinstance(dim, bool) or not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim must be an int axis of x (rank {x.dim()}); got {dim!r}")
    dim %= x.dim()
    world = dist.get_world_size(group)
    shard = spec.num_blocks(x.shape[dim], world)
    padded = _pad_rows(x, dim, shard * world)
    return padded.narrow(dim, dist.get_rank(group) * shard, shard)


# ---------------------------------------------------------------- checks


# What to do about each per-rank difference a user can fix, for the error message.
_FIX_HINTS = {
    "q shard length": "every rank needs a shard of the same length: pad the sequence at its "
                      "end to a multiple of the group's size (shard_sequence) and pass q_length",
    "k shard length": "every rank needs a shard of the same length: pad the sequence at its "
                      "end to a multiple of the group's size (shard_sequence) and pass kv_length",
}


def _checked_lengths(
    q: object, k: object, v: object, proj_weight: object, proj_bias: object,
    group: dist.ProcessGroup, layout: object, options: dict[str, object],
    q_length: object, kv_length: object, check_shards: bool,
) -> tuple[int, int]:
    """Check the call on this rank and, with `check_shards`, against every other rank;
    return the whole sequence's q and k lengths (without padding)."""
    problem, description, lengths = None, None, None
    try:
        lengths = _check_local(q, k, v, proj_weight, proj_bias, group, layout, options,
                               q_length, kv_length)
        description = _describe(q, k, layout, options, lengths)
    except (TypeError, ValueError) as error:
        problem = error
    if check_shards and host_synchronisation_allowed():
        agree_across_ranks(group, description, problem, _FIX_HINTS)
    elif problem is not None:
        raise problem
    return lengths


def _check_local(
    q: object, k: object, v: object, proj_weight: object, proj_bias: object,
    group: dist.ProcessGroup, layout: object, options: dict[str, object],
    q_length: object, kv_length: object,
) -> tuple[int, int]:
    """What one rank can check of its own call; returns the whole q and k lengths."""
    named = {"q": q, "k": k, "v": v, "proj_weight": proj_weight, "proj_bias": proj_bias}
    check_tensors(**named)
    for name, x in named.items():
        if x.layout != torch.strided:
            raise TypeError(f"{name} must be a dense (strided) tensor; got {x.layout}")
    check_qkv(q, k, v, layout)
    check_projection(proj_weight, proj_bias, q)
    check_ratio("topk", options["topk"])
    check_ratio("k_low", options["k_low"])
    check_settings(options["block_q"], options["block_kv"], options["feature_map"],
                   options["linear"], options["scale"])
    if host_synchronisation_allowed():  # reading the backend's configuration is not traceable
        check_served(named, group)
    world = dist.get_world_size(group)
    heads = q.shape[head_axis(layout)]
    if heads % world:
        raise ValueError(
            f"the number of heads ({heads}) must be divisible by the group's size ({world})"
        )
    axis = sequence_axis(layout)
    return (_whole_length("q_length", q_length, q.shape[axis], world),
            _whole_length("kv_length", kv_length, k.shape[axis], world))


def _whole_length(name: str, given: object, shard: int, world: int) -> int:
    """The sequence's length without padding: `given`, or all the shards' rows."""
    padded = shard * world
    if given is None:
        return padded
    if isinstance(given, bool) or not isinstance(given, int):
        raise TypeError(f"{name} must be an int or None; got {type(given).__name__}")
    if not 1 <= given <= padded:
        raise ValueError(
            f"{name} must lie in [1, {padded}] ({world} shards of {shard} rows); got {given}"
        )
    return given


def _describe(
    q: torch.Tensor, k: torch.Tensor, layout: str, options: dict[str, object],
    lengths: tuple[int, int],
) -> dict[str, object]:
    """Everything that must agree between the ranks for the all-to-alls and the numbers."""
    axis = sequence_axis(layout)
    return {"layout": layout, "dtype": str(q.dtype).removeprefix("torch."),
            "device type": q.device.type, "batch": q.shape[0],
            "heads": q.shape[head_axis(layout)], "head dim": q.shape[-1],
            "q shard length": q.shape[axis], "k shard length": k.shape[axis],
            "q_length": lengths[0], "kv_length": lengths[1], **options}


def _pad_rows(x: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    """`x` with zero rows appended along `axis` up to `length` (`x` itself when it has them)."""
    missing = length - x.shape[axis]
    if missing == 0:
        return x
    # F.pad lists (before, after) pairs from the last axis backwards.
    return F.pad(x, (0, 0) * (x.dim() - 1 - axis) + (0, missing))
