"""One pass over K and V: the linear branch's per-key-block states.

One CTA per (group of key blocks, head, batch). For each key block j of its group:

    h_j = phi(K_j)^T V_j   (D x D), z_j = colsum phi(K_j)   (phi is 0 on rows past Lk)

phi(K_j) is rounded to the input dtype once, as the GEMM's operand, and z_j sums those
same values, so numerator and denominator of the linear branch see one phi.

With `store_blocks` ("marginal": the linear branch needs per-block states) h_j is stored
per block, in the input dtype; otherwise ("global") the group's float32 sum of h_j is
stored, and the caller sums the groups into the total H. z_j is always stored per block.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import CONSUMER_BARRIER, DTYPES, rows, seq_shape
from ..feature_maps import feature_map_macro

STORES = ("waited", "overlapped")
"""When the store of a block's h_j is waited for ("marginal" mode; "global" stores no h_j):
at once ("waited"), or only before h_s is written again and at the end ("overlapped", so the
next block's work runs while the store reads shared memory). The same instructions
otherwise, so the same bits. "overlapped" is the default: on the H200 at the Wan2.1-1.3B
shape the key pass took 0.167 ms against 0.176 ms (benchmarks/NOTES.md)."""

SUMS = ("serial", "gemm")
"""How a block's column sums (z_j of phi(K); with `pool_keys`, routing's pooled K) are
taken: each thread adding its columns' rows one by one from shared memory ("serial"), or as
a GEMM of the tile with a column of ones on the tensor cores ("gemm"). They add the same
values in another order, so they round differently: a choice of the default, not of the
tuner. "gemm" is the default where TileLang lays it out (not at D=128 with 128-key blocks:
it finds no layout for the ones tile split over two warpgroups there): on the H200 at the
Wan2.1-1.3B shape the key pass took 0.125 ms against 0.167 ms (benchmarks/NOTES.md)."""


def _gemm_sums(dim: int, block_kv: int) -> bool:
    """Whether the column sums can be a GEMM at these sizes (see `SUMS`)."""
    return (dim, block_kv) != (128, 128)


SUM_COLUMNS = 8
"""Columns of ones in the sums' GEMM (the narrowest wgmma); the first is the sum."""


def default_schedule(dim: int, block_kv: int) -> dict:
    """Schedule knobs measured correct on the H200 for these sizes.

    At D=64 with 128-row key blocks, two consumer warpgroups gave wrong column sums from
    the second pipelined block on (a TileLang 0.1.15 lowering problem not pinned down);
    one warpgroup is exact there and fits its registers at D=64.
    """
    return dict(group=8, threads=128 if dim == 64 else 256, stores="overlapped",
                sums="gemm" if _gemm_sums(dim, block_kv) else "serial")


def search_space(dim: int, block_kv: int, linear: str) -> dict[str, tuple]:
    """Choices of each schedule knob for the autotuner. `threads` is not searched: one value
    per size is known to give exact results (see `default_schedule`). `group` is searched
    in "marginal" mode only: in "global" mode each group's float32 sum of h_j is a partial
    sum of the total H, so the group size sets the order of that sum and its rounding;
    `stores` too, since "global" stores no h_j (both values build the same kernel)."""
    return dict(group=(4, 8, 16), stores=STORES) if linear == "marginal" else {}


def alternatives(dim: int, block_kv: int) -> list[dict]:
    """Schedules that compute the same states but round differently: the column sums one
    by one (see `SUMS`) where the default takes them on the tensor cores, timed by
    `benchmarks/key_pass_variants.py` and checked against float64 by the GPU tests, never
    tuned."""
    return [dict(sums="serial")] if _gemm_sums(dim, block_kv) else []


def key_pass(
    dim: int,
    block_kv: int,
    dtype: str,
    feature: str,
    layout: str,
    store_blocks: bool,
    group: int,
    threads: int,
    stores: str,
    sums: str,
    pool_keys: bool = False,
):
    """The key pass's TileLang program for one combination of compile-time settings.

    With `pool_keys` it also writes POOLED (B, H, Nk, D) float32, each key block's mean
    row (routing's pooled K, over the rows the block has), from the tile it loads anyway.
    `stores`, `sums`: see `STORES`, `SUMS`.
    """
    if stores not in STORES:
        raise ValueError(f"stores must be one of {STORES}; got {stores!r}")
    if sums not in SUMS:
        raise ValueError(f"sums must be one of {SUMS}; got {sums!r}")
    gemm_sums = sums == "gemm"
    overlapped = stores == "overlapped"
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lk")
    # H_BLOCK and H_GROUP have their own counts: a 1-entry placeholder stands in for the
    # one that is not written.
    n_kv, n_state, n_groups = T.dynamic("Nk"), T.dynamic("Ns"), T.dynamic("G")
    phi = feature_map_macro(feature)
    # A parameter annotated with None is a compile-time constant, not a kernel argument.
    pooled_tensor = T.Tensor([batch, heads, n_kv, dim], acc) if pool_keys else None

    @T.prim_func
    def main(
        K: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        V: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        H_BLOCK: T.Tensor([batch, heads, n_state, dim, dim], dt),
        Z_BLOCK: T.Tensor([batch, heads, n_kv, dim], acc),
        H_GROUP: T.Tensor([batch, heads, n_groups, dim, dim], acc),
        POOLED: pooled_tensor,
    ):
        with T.Kernel(T.ceildiv(n_kv, group), heads, batch, threads=threads) as (bx, by, bz):
            k_s = T.alloc_shared([block_kv, dim], dt)
            v_s = T.alloc_shared([block_kv, dim], dt)
            phi_s = T.alloc_shared([block_kv, dim], dt)
            keys = T.alloc_fragment([block_kv, dim], acc)
            h_j = T.alloc_fragment([dim, dim], acc)
            if store_blocks:
                h_s = T.alloc_shared([dim, dim], dt)
            else:
                h_sum = T.alloc_fragment([dim, dim], acc)
                T.clear(h_sum)
            row_max = T.alloc_fragment([block_kv], acc)
            row_sum = T.alloc_fragment([block_kv], acc)
            if gemm_sums:
                ones_s = T.alloc_shared([SUM_COLUMNS, block_kv], dt)  # K-major, as wgmma reads B
                sums_r = T.alloc_fragment([dim, SUM_COLUMNS], acc)
                T.fill(ones_s, 1)
            else:
                col = T.alloc_fragment([dim], acc)

            first = bx * group
            blocks = T.min(group, n_kv - first)
            for t in T.Pipelined(blocks, num_stages=2):
                j = first + t
                valid = T.min(block_kv, lk - j * block_kv)
                T.copy(rows(K, bz, by, j * block_kv, block_kv, layout), k_s)
                T.copy(rows(V, bz, by, j * block_kv, block_kv, layout), v_s)
                if pool_keys:
                    # Rows past Lk are zeros (TMA fills them), so the sum is the block's own.
                    if gemm_sums:
                        T.gemm(k_s, ones_s, sums_r, transpose_A=True, transpose_B=True,
                               clear_accum=True)
                        for d, c in T.Parallel(dim, SUM_COLUMNS):
                            if c == 0:
                                POOLED[bz, by, j, d] = sums_r[d, c] / valid
                    else:
                        T.clear(col)
                        for r in T.serial(block_kv):
                            for d in T.Parallel(dim):
                                col[d] += k_s[r, d]
                        for d in T.Parallel(dim):
                            POOLED[bz, by, j, d] = col[d] / valid
                T.copy(k_s, keys)
                phi(keys, row_max, row_sum, block_kv, dim)
                for r, d in T.Parallel(block_kv, dim):
                    keys[r, d] = T.if_then_else(r < valid, keys[r, d], 0)
                # Both consumer warpgroups' wgmma read all of phi_s: none may overwrite it
                # before the other's read of the previous block has finished.
                T.sync_threads(CONSUMER_BARRIER, threads)
                T.copy(keys, phi_s)
                T.gemm(phi_s, v_s, h_j, transpose_A=True, clear_accum=True)
                if gemm_sums:
                    T.gemm(phi_s, ones_s, sums_r, transpose_A=True, transpose_B=True,
                           clear_accum=True)
                    for d, c in T.Parallel(dim, SUM_COLUMNS):
                        if c == 0:
                            Z_BLOCK[bz, by, j, d] = sums_r[d, c]
                else:
                    # z_j: serial per-thread column sums of phi_s (no cross-thread reduction).
                    T.clear(col)
                    for r in T.serial(block_kv):
                        for d in T.Parallel(dim):
                            col[d] += phi_s[r, d]
                    for d in T.Parallel(dim):
                        Z_BLOCK[bz, by, j, d] = col[d]
                if store_blocks:
                    # Staged through shared memory for a coalesced store; as with phi_s, both
                    # warpgroups must be done storing the previous block's tile first.
                    if overlapped:
                        T.tma_store_wait()  # the previous block's h_j has left h_s
                    T.sync_threads(CONSUMER_BARRIER, threads)
                    T.copy(h_j, h_s)
                    if overlapped:
                        T.tma_copy(h_s, H_BLOCK[bz, by, j, :, :])
                    else:
                        T.copy(h_s, H_BLOCK[bz, by, j, :, :])
                else:
                    for a, d in T.Parallel(dim, dim):
                        h_sum[a, d] += h_j[a, d]
            if not store_blocks:
                T.copy(h_sum, H_GROUP[bz, by, bx, :, :])
            elif overlapped:
                T.tma_store_wait()

    return main
