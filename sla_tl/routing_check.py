"""What makes a routing valid, checked from its values.

A routing (see `Routing`) is valid for Nk key blocks when, in every row (b, h, i):

- `lut_count` lies in [0, width of `lut`] (and `neg_count` in [0, width of `neg_lut`]);
- the counted entries (the first `lut_count` of the row) lie in [0, Nk), in any order;
- no key block is counted twice in `lut`, nor twice in `neg_lut`, nor in both.

With `linear="global"` every key block is marginal, so `neg_lut` and `neg_count` are not
used and not checked. Entries past a row's count are ignored and may hold anything.

Two ways to check, from one tally of the counted entries (`sla_tl.routing.tally`):
- `sla_tl.routing.row_faults`: torch ops only, no host synchronisation, so it runs inside a
  captured CUDA graph: a per-row flag that the CUDA forward turns into NaN outputs for
  those rows;
- `check_values` here: reads the values on the host and raises a ValueError naming the
  field, the row and the fault (the CPU operators run it on every call).
"""

from __future__ import annotations

import torch

from .routing import Routing, count_outside, tally


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
        bad = count_outside(count, width)
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
