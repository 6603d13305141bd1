"""The routing of an attention call and everything derived from it: one owner of the format.

A routing (`Routing`) is four int32 tensors, query-block-major: each row (batch, head, query
block) lists its critical key blocks (`lut`, the first `lut_count` entries) and its
negligible ones (`neg_lut`, the first `neg_count`); every other key block is marginal
(shapes: `field_shapes`). The operators take them as four arguments in this order
(`*routing`) and `sla::route` returns them so (`Routing(*results)`). What makes one
valid: `sla_tl.routing_check`.

From a routing the kernels' glue derives, with torch ops and no host synchronisation:
- the tally of the counted entries (`tally`, `listing`) and from it the block maps
  (`block_mask`: critical or negligible blocks; `marginal_map`: marginal blocks as 0/1
  weights) and the rows that break a rule of a valid routing (`row_faults`);
- the flags of each query block (`active_flags`): its linear branch on, off, or the row
  invalid;
- the key-major view the backward walks (`reverse_lut`).

`forward_flags`, `backward_flags` and `key_major` bundle what the forward and the backward
need. A routing the caller gives (`attention_with_routing`) keeps them while its four
tensors live and are not changed in place (their version counters), so a routing used for
many steps (a fixed, edited or learned one) is derived once. Changing a routing's values
other than through torch (a raw kernel writing into its buffers) is not seen: build a new
`Routing`, or change them with torch ops. Nothing is kept while a CUDA graph is being
captured, so a captured graph always derives its own.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import NamedTuple

import torch


class Routing(NamedTuple):
    """Block classification of one attention call, query-block-major.

    Every field is int32 on the device of q. Rows are (batch, head, query block).
    Entries of a row past its count are ignored and may hold anything.
    Key blocks in neither list are marginal (they feed the linear branch).
    What makes one valid: `sla_tl.routing_check` (and `attention_with_routing`).
    """

    lut: torch.Tensor
    """(B, H, Mq, Kc): critical key-block indices (`route` gives them ascending)."""
    lut_count: torch.Tensor
    """(B, H, Mq): number of valid entries of each `lut` row (0..Kc)."""
    neg_lut: torch.Tensor
    """(B, H, Mq, Kn): negligible key-block indices (Kn may be 0)."""
    neg_count: torch.Tensor
    """(B, H, Mq): number of valid entries of each `neg_lut` row (0..Kn)."""

    @property
    def widths(self) -> tuple[int, int]:
        """(Kc, Kn): the widths of `lut` and `neg_lut`."""
        return self.lut.shape[-1], self.neg_lut.shape[-1]

    def contiguous(self) -> Routing:
        """The same routing with dense tensors, as the kernels read them (no copy when they
        are dense already)."""
        return Routing(*(t.contiguous() for t in self))


DTYPE = torch.int32
"""The dtype of every field."""


def field_shapes(rows: tuple[int, int, int], widths: tuple[int, int]) -> Routing:
    """The shape of each field for rows (B, H, Mq) and widths (Kc, Kn)."""
    n_crit, n_neg = widths
    return Routing((*rows, n_crit), tuple(rows), (*rows, n_neg), tuple(rows))


def empty(rows: tuple[int, int, int], widths: tuple[int, int], device: torch.device) -> Routing:
    """An uninitialised routing of these rows and widths (fake kernels)."""
    return Routing(*(torch.empty(shape, dtype=DTYPE, device=device)
                     for shape in field_shapes(rows, widths)))


# ---------------------------------------------------------------- tally and block maps


class Listing(NamedTuple):
    """How often each key block is counted in the rows of one or two LUTs."""

    per_block: torch.Tensor
    """int32 (B, H, Mq, Nk): times key block j is among the counted entries of row i."""
    outside: torch.Tensor
    """int32 (B, H, Mq): counted entries of the row that lie outside [0, Nk)."""


def _columns(lut: torch.Tensor, count: torch.Tensor, n_kv: int) -> torch.Tensor:
    """Where each LUT entry is tallied: its key block; Nk for a counted entry outside
    [0, Nk); Nk + 1 past the row's count. Never an index outside the Nk + 2 columns."""
    counted = torch.arange(lut.shape[-1], device=lut.device) < count.unsqueeze(-1)
    # clamp sends entries below 0 to -1 and from Nk up to Nk; remainder folds -1 onto Nk.
    folded = lut.clamp(-1, n_kv).remainder(n_kv + 1)
    return torch.where(counted, folded, n_kv + 1).long()


def tally(luts: Sequence[tuple[torch.Tensor, torch.Tensor]], n_kv: int) -> Listing:
    """How often each key block is counted in the rows of the (lut, count) pairs together.
    Torch ops only; safe whatever the tensors hold."""
    columns = torch.cat([_columns(lut, count, n_kv) for lut, count in luts], dim=-1)
    counts = torch.zeros((*columns.shape[:-1], n_kv + 2), dtype=torch.int32,
                         device=columns.device)
    counts.scatter_add_(-1, columns, torch.ones(columns.shape, dtype=torch.int32,
                                                device=columns.device))
    return Listing(counts[..., :n_kv], counts[..., n_kv])


def listing(routing: Routing, n_kv: int, negligible: bool) -> Listing:
    """Tally of the counted entries of `lut`, and of `neg_lut` too when `negligible`."""
    luts = [(routing.lut, routing.lut_count)]
    if negligible:
        luts.append((routing.neg_lut, routing.neg_count))
    return tally(luts, n_kv)


def block_mask(lut: torch.Tensor, count: torch.Tensor, n_kv: int,
               name: str = "lut") -> torch.Tensor:
    """Boolean (B, H, Mq, Nk) map of the key blocks listed in the counted prefix of `lut`.

    Reads the values of `lut` to check them, so it synchronises with a GPU: reference use only.
    """
    listed = tally([(lut, count)], n_kv)
    if (listed.outside > 0).any():
        raise ValueError(f"{name} entries must lie in [0, {n_kv}) within each row's count")
    return listed.per_block > 0


def marginal_map(listed: Listing, dtype: torch.dtype) -> torch.Tensor:
    """(B, H, Mq, Nk) in `dtype`: 1 where key block j is marginal for query block i, i.e.
    listed in neither LUT (`listed` tallies both). Its 0/1 weights are exact in any dtype.
    The selection kernel's variant with a block map writes the same map."""
    return (listed.per_block == 0).to(dtype)


def count_outside(count: torch.Tensor, width: int) -> torch.Tensor:
    """Rows whose count lies outside [0, width]."""
    return (count < 0) | (count > width)


def row_faults(routing: Routing, listed: Listing, negligible: bool) -> torch.Tensor:
    """bool (B, H, Mq): rows that break a rule of a valid routing (`sla_tl.routing_check`).
    `listed` is `listing(routing, n_kv, negligible)`. No host synchronisation."""
    faults = count_outside(routing.lut_count, routing.lut.shape[-1])
    if negligible:
        faults = faults | count_outside(routing.neg_count, routing.neg_lut.shape[-1])
    # A block counted twice in one list or in both lists is listed more than once.
    return faults | (listed.outside > 0) | (listed.per_block.amax(dim=-1) > 1)


def active_flags(routing: Routing, n_kv: int, linear: str,
                 faults: torch.Tensor | None = None) -> torch.Tensor:
    """int32 (B, H, Mq): 1 where a query block's linear branch is on: it has at least one
    marginal key block ("marginal"), always ("global"); -1 where `faults` marks the row's
    routing invalid (the forward writes NaN there)."""
    if linear == "global":
        active = torch.ones_like(routing.lut_count)
    else:
        active = (routing.lut_count + routing.neg_count < n_kv).to(torch.int32)
    return active if faults is None else active.masked_fill(faults, -1)


def reverse_lut(lut: torch.Tensor, count: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, ...]:
    """Key-major view of a LUT: for each key block, the query blocks listing it (ascending),
    as (B, H, Nk, Mq) int32 with counts (B, H, Nk). Torch ops only, no host synchronisation;
    entries outside [0, Nk) or past a row's count are left out, a repeated one counts once."""
    by_key = tally([(lut, count)], n_kv).per_block.clamp(max=1).transpose(-1, -2)
    n_q = by_key.shape[-1]
    # Each listing query block goes to its rank among the listing ones; the others to a
    # spare column past the end.
    rank = torch.cumsum(by_key, dim=-1, dtype=torch.int32) - 1
    slot = torch.where(by_key.bool(), rank, n_q).long()
    reverse = torch.zeros((*by_key.shape[:-1], n_q + 1), dtype=torch.int32, device=lut.device)
    query_block = torch.arange(n_q, dtype=torch.int32, device=lut.device).expand_as(slot)
    reverse.scatter_(-1, slot, query_block)
    return reverse[..., :n_q].contiguous(), rank[..., -1] + 1


# ---------------------------------------------------------------- selection


def select_by_sort(pooled_q: torch.Tensor, pooled_k: torch.Tensor, lk: int, block_kv: int,
                   n_crit: int, n_neg: int) -> Routing:
    """Routing from float32 pooled blocks (B, H, Mq, D) and (B, H, Nk, D): each row's
    `n_crit` highest and `n_neg` lowest blocks by score against the smoothed keys (K minus
    its mean over the Lk rows), ascending. A sort, not a selection kernel."""
    n_kv = pooled_k.shape[2]
    rows_per_block = torch.full((n_kv, 1), float(block_kv), device=pooled_k.device)
    rows_per_block[-1] = lk - (n_kv - 1) * block_kv
    mean_k = (pooled_k * rows_per_block).sum(dim=2, keepdim=True) / lk
    scores = pooled_q @ (pooled_k - mean_k).transpose(-1, -2)
    # One sort of each row (512 wide at Wan shapes: a single in-register sort kernel) gives
    # both ends; cheaper than two multi-pass top-k selections.
    order = torch.sort(scores, dim=-1, descending=True).indices
    rows = pooled_q.shape[:-1]
    return Routing(
        order[..., :n_crit].sort(dim=-1).values.to(torch.int32),
        torch.full(rows, n_crit, dtype=torch.int32, device=pooled_q.device),
        order[..., n_kv - n_neg:].sort(dim=-1).values.to(torch.int32),
        torch.full(rows, n_neg, dtype=torch.int32, device=pooled_q.device),
    )


def raw_scores(pooled_q: torch.Tensor, pooled_k: torch.Tensor, scores: torch.Tensor) -> None:
    """Write the block scores against the unsmoothed keys to `scores` (B, H, Mq, Nk, float32):
    smoothing K subtracts pooled_q . mean(k) from a whole row, which moves no row's ranking
    (what a selection kernel reads). One bmm into the plan's buffer: the product of the 4-D
    tensors would run the same GEMM after a few more ops on the host."""
    torch.bmm(pooled_q.flatten(0, 1), pooled_k.flatten(0, 1).transpose(1, 2),
              out=scores.flatten(0, 1))


# ---------------------------------------------------------------- what the kernels derive


class ForwardFlags(NamedTuple):
    """What the forward's glue derives from a routing."""

    active: torch.Tensor
    """`active_flags`, the rows that break a rule of a valid routing marked -1."""
    marginal: torch.Tensor | None
    """`marginal_map` in the linear states' dtype ("marginal"); None in "global"."""


class KeyMajor(NamedTuple):
    """What the backward's glue derives from a routing to walk it key by key."""

    reverse: torch.Tensor
    reverse_count: torch.Tensor
    """`reverse_lut` of the critical blocks."""
    marginal_t: torch.Tensor | None
    """The marginal map transposed, (B, H, Nk, Mq) ("marginal"); None in "global"."""


class _Kept:
    """What has been derived from one routing, valid while its tensors live unchanged."""

    __slots__ = ("refs", "versions", "parts")

    def __init__(self, routing: Routing, forget) -> None:
        self.refs = tuple(weakref.ref(t, forget) for t in routing)
        self.versions = tuple(t._version for t in routing)
        self.parts: dict[tuple, object] = {}

    def holds(self, routing: Routing) -> bool:
        return (all(ref() is t for ref, t in zip(self.refs, routing, strict=True))
                and self.versions == tuple(t._version for t in routing))


_kept: dict[int, _Kept] = {}


def _capturing(routing: Routing) -> bool:
    return routing.lut.is_cuda and torch.cuda.is_current_stream_capturing()


def _kept_part(routing: Routing, part: tuple) -> object | None:
    entry = _kept.get(id(routing.lut))
    if entry is None or _capturing(routing) or not entry.holds(routing):
        return None
    return entry.parts.get(part)


def _keep(routing: Routing, part: tuple, value: object) -> None:
    if _capturing(routing):
        return
    key = id(routing.lut)
    entry = _kept.get(key)
    if entry is None or not entry.holds(routing):

        def forget(ref: weakref.ref, key: int = key) -> None:
            found = _kept.get(key)
            if found is not None and ref in found.refs:
                del _kept[key]

        entry = _kept[key] = _Kept(routing, forget)
    entry.parts[part] = value


def _derived(routing: Routing, part: tuple, keep: bool, compute):
    found = _kept_part(routing, part)
    if found is not None:
        return found
    value = compute()
    if keep:
        _keep(routing, part, value)
    return value


def forward_flags(routing: Routing, n_kv: int, linear: str, dtype: torch.dtype,
                  keep: bool, check: bool = True) -> ForwardFlags:
    """The forward's flags and marginal map of `routing` over `n_kv` key blocks: what is
    kept for it, or computed now (and kept when `keep`). `check`: the rows that break a
    rule of a valid routing are flagged (a routing from the caller); a routing the call
    made itself is valid by construction."""
    def compute() -> ForwardFlags:
        marginal = linear == "marginal"
        listed = listing(routing, n_kv, negligible=marginal) if check or marginal else None
        faults = row_faults(routing, listed, negligible=marginal) if check else None
        return ForwardFlags(active_flags(routing, n_kv, linear, faults),
                            marginal_map(listed, dtype) if marginal else None)

    return _derived(routing, ("forward", n_kv, linear, dtype, check), keep, compute)


def backward_flags(routing: Routing, n_kv: int, linear: str, keep: bool) -> torch.Tensor:
    """`active_flags` of `routing` for the backward (the forward has written NaN where the
    routing is invalid): kept for it, or computed now (kept when `keep`)."""
    return _derived(routing, ("backward", n_kv, linear), keep,
                    lambda: active_flags(routing, n_kv, linear))


def key_major(routing: Routing, n_kv: int, linear: str, dtype: torch.dtype,
              keep: bool) -> KeyMajor:
    """The backward's reverse LUT and transposed marginal map of `routing` (the forward's
    map where it was kept): kept for it, or computed now (kept when `keep`)."""
    def compute() -> KeyMajor:
        marginal_t = None
        if linear == "marginal":
            forward = _kept_part(routing, ("forward", n_kv, linear, dtype, True))
            marginal = forward.marginal if forward is not None else marginal_map(
                listing(routing, n_kv, negligible=True), dtype)
            marginal_t = marginal.transpose(-1, -2)
        return KeyMajor(*reverse_lut(routing.lut, routing.lut_count, n_kv), marginal_t)

    return _derived(routing, ("key", n_kv, linear, dtype), keep, compute)
