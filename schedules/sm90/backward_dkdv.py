"""Backward dK, dV over each key block's reverse LUT (key-major), with the linear branch.

One CTA per (key block j, head, batch). The pipelined loop visits only the query blocks
for which j is critical (the reverse LUT), `q_slice` query rows at a time:

    P^T = exp(scale * K_j Q^T - LSE),  dV += P^T dO,  dS^T = P^T * (V_j dO^T - delta),
    dK += dS^T Q

The linear branch's key-side gradients come from the query pass's G_i, g_i:

    dH_j = G - sum G_i,  dZ_j = g - sum g_i   over i with j critical or negligible
                                               ("marginal"; "global" subtracts nothing)
    dV += phi(K_j) dH_j,   dK += phi'(K_j)^T (V_j dH_j^T + dZ_j)
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import CONSUMER_BARRIER, DTYPES, LOG2E, rows, seq_shape
from ..feature_maps import feature_map_macro, feature_map_vjp_macro


@T.macro
def add_rows(accumulator, tile, n_rows, dim):
    for a, d in T.Parallel(n_rows, dim):
        accumulator[a, d] += tile[a, d]


@T.macro
def finish_rows(accumulator, row0, G_ROWS, G_TOTAL, NEG_RLUT, NEG_RCOUNT, dh_s, bz, by, bx,
                n_rows, dim):
    """Rows row0.. of dH_j: the total minus the accumulated G_i and the negligible ones."""
    for t in T.serial(NEG_RCOUNT[bz, by, bx]):
        i = NEG_RLUT[bz, by, bx, t]
        for a, d in T.Parallel(n_rows, dim):
            accumulator[a, d] += G_ROWS[bz, by, i, row0 + a, d]
    for a, d in T.Parallel(n_rows, dim):
        dh_s[row0 + a, d] = G_TOTAL[bz, by, row0 + a, d] - accumulator[a, d]


def default_schedule(dim: int, block_q: int, block_kv: int) -> dict:
    """Schedule knobs that compile without spills and fit shared memory for these sizes.

    `g_in_loop`: sum the excluded G_i inside the pipelined loop, a 1/slices share of its rows
    per step, TMA-loaded (64-key blocks); otherwise in serial loops after it (128-key
    blocks, where the loop's accumulators leave no registers for it).
    """
    return dict(threads=256, num_stages=2, q_slice=64, g_in_loop=block_kv == 64)


def backward_dkdv(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, linear: str,
                  layout: str, scale: float, threads: int, num_stages: int, q_slice: int,
                  g_in_loop: bool):
    """The dK/dV program for one combination of compile-time settings."""
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_q, n_kv = T.dynamic("Mq"), T.dynamic("Nk")
    width, neg_width = T.dynamic("Wr"), T.dynamic("Wn")
    scale_log2 = scale * LOG2E
    slices = block_q // q_slice
    marginal = linear == "marginal"
    g_in_loop = g_in_loop and marginal
    g_rows = dim // slices  # rows of G_i summed per step when g_in_loop
    phi = feature_map_macro(feature)
    phi_vjp = feature_map_vjp_macro(feature)
    policy = T.GemmWarpPolicy.FullCol

    @T.prim_func
    def main(
        Q: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        K: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        V: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        DO: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        LSE: T.Tensor([batch, heads, lq], acc),
        DELTA: T.Tensor([batch, heads, lq], acc),
        RLUT: T.Tensor([batch, heads, n_kv, width], T.int32),
        RCOUNT: T.Tensor([batch, heads, n_kv], T.int32),
        NEG_RLUT: T.Tensor([batch, heads, n_kv, neg_width], T.int32),
        NEG_RCOUNT: T.Tensor([batch, heads, n_kv], T.int32),
        G_ROWS: T.Tensor([batch, heads, n_q, dim, dim], dt),
        GZ_ROWS: T.Tensor([batch, heads, n_q, dim], acc),
        G_TOTAL: T.Tensor([batch, heads, dim, dim], acc),
        GZ_TOTAL: T.Tensor([batch, heads, dim], acc),
        DK: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        DV: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
    ):
        with T.Kernel(T.ceildiv(lk, block_kv), heads, batch, threads=threads) as (bx, by, bz):
            k_s = T.alloc_shared([block_kv, dim], dt)
            v_s = T.alloc_shared([block_kv, dim], dt)
            q_s = T.alloc_shared([q_slice, dim], dt)
            do_s = T.alloc_shared([q_slice, dim], dt)
            p_s = T.alloc_shared([block_kv, q_slice], dt)
            ds_s = T.alloc_shared([block_kv, q_slice], dt)
            probs = T.alloc_fragment([block_kv, q_slice], acc)
            d_probs = T.alloc_fragment([block_kv, q_slice], acc)
            dk = T.alloc_fragment([block_kv, dim], acc)
            dv = T.alloc_fragment([block_kv, dim], acc)

            # One accumulator per share of G_i's rows (at most two), chosen by the step's slice.
            if g_in_loop:
                excluded_0 = T.alloc_fragment([g_rows, dim], acc)
                T.clear(excluded_0)
                if slices == 2:
                    excluded_1 = T.alloc_fragment([g_rows, dim], acc)
                    T.clear(excluded_1)
            T.copy(rows(K, bz, by, bx * block_kv, block_kv, layout), k_s)
            T.copy(rows(V, bz, by, bx * block_kv, block_kv, layout), v_s)
            T.clear(dk)
            T.clear(dv)
            for t in T.Pipelined(RCOUNT[bz, by, bx] * slices, num_stages=num_stages):
                i = RLUT[bz, by, bx, t // slices]
                first = i * block_q + (t % slices) * q_slice
                T.copy(rows(Q, bz, by, first, q_slice, layout), q_s)
                T.gemm(k_s, q_s, probs, transpose_B=True, clear_accum=True, policy=policy)
                for r, c in T.Parallel(block_kv, q_slice):
                    probs[r, c] = T.if_then_else(
                        first + c < lq,
                        T.exp2(probs[r, c] * scale_log2 - LSE[bz, by, first + c] * LOG2E), 0)
                # Both consumer warpgroups' wgmma read all of p_s and ds_s: none may overwrite
                # them before the other's reads of the previous step have finished.
                T.sync_threads(CONSUMER_BARRIER, threads)
                T.copy(probs, p_s)
                T.copy(rows(DO, bz, by, first, q_slice, layout), do_s)
                T.gemm(p_s, do_s, dv, policy=policy)
                T.gemm(v_s, do_s, d_probs, transpose_B=True, clear_accum=True, policy=policy)
                for r, c in T.Parallel(block_kv, q_slice):
                    d_probs[r, c] = probs[r, c] * (d_probs[r, c] - DELTA[bz, by, first + c])
                T.sync_threads(CONSUMER_BARRIER, threads)
                T.copy(d_probs, ds_s)
                T.gemm(ds_s, q_s, dk, policy=policy)
                if g_in_loop:
                    g_s = T.alloc_shared([g_rows, dim], dt)
                    T.copy(G_ROWS[bz, by, i, (t % slices) * g_rows:(t % slices + 1) * g_rows, :],
                           g_s)
                    if slices == 1:
                        add_rows(excluded_0, g_s, g_rows, dim)
                    else:
                        if t % 2 == 0:
                            add_rows(excluded_0, g_s, g_rows, dim)
                        else:
                            add_rows(excluded_1, g_s, g_rows, dim)

            # dH_j, dZ_j: totals minus the query blocks for which j is not marginal.
            dz_s = T.alloc_shared([dim], acc)
            dh_s = T.alloc_shared([dim, dim], dt)
            T.copy(GZ_TOTAL[bz, by, :], dz_s)
            if g_in_loop:
                finish_rows(excluded_0, 0, G_ROWS, G_TOTAL, NEG_RLUT, NEG_RCOUNT, dh_s, bz, by,
                            bx, g_rows, dim)
                if slices == 2:
                    finish_rows(excluded_1, g_rows, G_ROWS, G_TOTAL, NEG_RLUT, NEG_RCOUNT, dh_s,
                                bz, by, bx, g_rows, dim)
            else:
                # Serially, half the rows of dH_j at a time to keep the accumulator small.
                half = dim // 2
                excluded_g = T.alloc_fragment([half, dim], acc)
                for part in T.serial(2):
                    T.clear(excluded_g)
                    if marginal:
                        for t in T.serial(RCOUNT[bz, by, bx]):
                            i = RLUT[bz, by, bx, t]
                            for a, d in T.Parallel(half, dim):
                                excluded_g[a, d] += G_ROWS[bz, by, i, part * half + a, d]
                        for t in T.serial(NEG_RCOUNT[bz, by, bx]):
                            i = NEG_RLUT[bz, by, bx, t]
                            for a, d in T.Parallel(half, dim):
                                excluded_g[a, d] += G_ROWS[bz, by, i, part * half + a, d]
                    for a, d in T.Parallel(half, dim):
                        dh_s[part * half + a, d] = (G_TOTAL[bz, by, part * half + a, d]
                                                    - excluded_g[a, d])
            if marginal:
                for t in T.serial(RCOUNT[bz, by, bx]):
                    i = RLUT[bz, by, bx, t]
                    for d in T.Parallel(dim):
                        dz_s[d] -= GZ_ROWS[bz, by, i, d]
                for t in T.serial(NEG_RCOUNT[bz, by, bx]):
                    i = NEG_RLUT[bz, by, bx, t]
                    for d in T.Parallel(dim):
                        dz_s[d] -= GZ_ROWS[bz, by, i, d]

            # dV += phi(K_j) dH_j (phi is 0 on rows past Lk).
            keys = T.alloc_fragment([block_kv, dim], acc)
            row_a = T.alloc_fragment([block_kv], acc)
            row_b = T.alloc_fragment([block_kv], acc)
            phi_s = T.alloc_shared([block_kv, dim], dt)
            T.copy(rows(K, bz, by, bx * block_kv, block_kv, layout), keys)
            phi(keys, row_a, row_b, block_kv, dim)
            for r, d in T.Parallel(block_kv, dim):
                keys[r, d] = T.if_then_else(bx * block_kv + r < lk, keys[r, d], 0)
            T.copy(keys, phi_s)
            T.gemm(phi_s, dh_s, dv, policy=policy)
            T.copy(dv, rows(DV, bz, by, bx * block_kv, block_kv, layout))

            # dK = scale * dK_s + phi'(K_j)^T (V_j dH_j^T + dZ_j).
            d_phi = T.alloc_fragment([block_kv, dim], acc)
            T.gemm(v_s, dh_s, d_phi, transpose_B=True, clear_accum=True, policy=policy)
            for r, d in T.Parallel(block_kv, dim):
                d_phi[r, d] = d_phi[r, d] + dz_s[d]
            T.copy(rows(K, bz, by, bx * block_kv, block_kv, layout), keys)
            phi_vjp(keys, d_phi, row_a, row_b, block_kv, dim)
            for r, d in T.Parallel(block_kv, dim):
                dk[r, d] = dk[r, d] * scale + d_phi[r, d]
            T.copy(dk, rows(DK, bz, by, bx * block_kv, block_kv, layout))

    return main
