"""What makes a routing valid, checked from its values.

A routing (see `Routing`) is valid for Nk key blocks when, in every row (b, h, i):

- `lut_count` lies in [0, width of `lut`] (and `neg_count` in [0, width of `neg_lut`]);
- the counted entries (the first `lut_count` of the row) lie in [0, Nk), in any order;
- no key block is counted twice in `lut`, nor twice in `neg_lut`, nor in both.

With `linear="global"` every key block is marginal, so `neg_lut` and `neg_count` are not
used and not checked. Entries past a row's count are ignored and may hold anything.

Two ways to check, from one listing of the counted entries:
- `row_faults`: torch ops only, no host synchronisation, so it runs inside a captured CUDA
  graph: a per-row flag that the CUDA forward turns into NaN outputs for those rows.
- `check_values`: reads the flags on the host and raises a ValueError naming the field,
  the row and the fault (the CPU operators run it on every call).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

from .routing import Routing


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


def _count_outside(count: torch.Tensor, width: int) -> torch.Tensor:
    return (count < 0) | (count > width)


def row_faults(routing: Routing, listed: Listing, negligible: bool) -> torch.Tensor:
    """bool (B, H, Mq): rows that break a rule of a valid routing (see the module docstring).
    `listed` is `listing(routing, n_kv, negligible)`. No host synchronisation."""
    faults = _count_outside(routing.lut_count, routing.lut.shape[-1])
    if negligible:
        faults = faults | _count_outside(routing.neg_count, routing.neg_lut.shape[-1])
    # A block counted twice in one list or in both lists is listed more than once.
    return faults | (listed.outside > 0) | (listed.per_block.amax(dim=-1) > 1)


def _first(mask: torch.Tensor) -> tuple[int, ...]:
    return tuple(int(i) for i in mask.nonzero()[0])


def check_values(routing: Routing, n_kv: int, linear: str) -> None:
    """ValueError naming the field and the first row at fault unless `routing` is valid.

    Reads tensor values, so on a GPU it synchronises with the host: the CUDA operators use
    `row_faults` instead.
    """
    negligible = linear == "marginal"
    lists = [("lut", "lut_count")] + ([("neg_lut", "neg_count")] if negligible else [])
    maps = []
    for lut_name, count_name in lists:
        lut, count = getattr(routing, lut_name), getattr(routing, count_name)
        width = lut.shape[-1]
        bad = _count_outside(count, width)
        if bad.any():
            row = _first(bad)
            raise ValueError(f"{count_name} must lie in [0, {width}] (the width of {lut_name}); "
                             f"row (b, h, i) = {row} has {int(count[row])}")
        listed = tally([(lut, count)], n_kv)
        if (listed.outside > 0).any():
            row = _first(listed.outside > 0)
            entries = lut[row][: int(count[row])].tolist()
            raise ValueError(f"{lut_name} entries must lie in [0, {n_kv}) within each row's "
                             f"count; row (b, h, i) = {row} lists {entries}")
        repeated = listed.per_block > 1
        if repeated.any():
            *row, block = _first(repeated)
            raise ValueError(f"{lut_name} lists key block {block} more than once in row "
                             f"(b, h, i) = {tuple(row)}")
        maps.append(listed.per_block > 0)
    if negligible:
        both = maps[0] & maps[1]
        if both.any():
            *row, block = _first(both)
            raise ValueError(f"key block {block} is in both lut and neg_lut (critical and "
                             f"negligible) in row (b, h, i) = {tuple(row)}")
