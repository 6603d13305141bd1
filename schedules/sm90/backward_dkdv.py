"""Backward dK, dV over each key block's reverse LUT (key-major), with the linear branch.

One CTA per (key block j, head, batch). The pipelined loop visits only the query blocks
for which j is critical (the reverse LUT), `q_slice` query rows at a time:

    P^T = exp(scale * K_j Q^T - LSE),  dV += P^T dO,  dS^T = P^T * (V_j dO^T - delta),
    dK += dS^T Q

The linear branch's key-side gradients come from dH_j (D x D) and dZ_j (D), which the
caller sums from the query pass's G_i and g_i over the query blocks for which j is
marginal:

    dV += phi(K_j) dH_j,   dK += phi'(K_j)^T (V_j dH_j^T + dZ_j)
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import CONSUMER_BARRIER, DTYPES, LOG2E, rows, seq_shape
from ..feature_maps import feature_map_macro, feature_map_vjp_macro


def default_schedule(dim: int, block_q: int, block_kv: int) -> dict:
    """Schedule knobs that compile without spills and fit shared memory for these sizes."""
    return dict(threads=256, num_stages=2, q_slice=64 if block_kv > 64 else block_q)


def backward_dkdv(dim: int, block_q: int, block_kv: int, dtype: str, feature: str,
                  layout: str, scale: float, threads: int, num_stages: int, q_slice: int):
    """The dK/dV program for one combination of compile-time settings."""
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_kv, width = T.dynamic("Nk"), T.dynamic("Wr")
    # One state per key block ("marginal"), or a single shared one ("global").
    n_states = T.dynamic("Ns")
    scale_log2 = scale * LOG2E
    slices = block_q // q_slice
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
        DH_ROWS: T.Tensor([batch, heads, n_states, dim, dim], dt),
        DZ_ROWS: T.Tensor([batch, heads, n_states, dim], acc),
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

            T.copy(rows(K, bz, by, bx * block_kv, block_kv, layout), k_s)
            T.copy(rows(V, bz, by, bx * block_kv, block_kv, layout), v_s)
            T.clear(dk)
            T.clear(dv)
            for t in T.Pipelined(RCOUNT[bz, by, bx] * slices, num_stages=num_stages):
                first = RLUT[bz, by, bx, t // slices] * block_q + (t % slices) * q_slice
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

            state = T.if_then_else(n_states == 1, 0, bx)
            dh_s = T.alloc_shared([dim, dim], dt)
            dz_s = T.alloc_shared([dim], acc)
            T.copy(DH_ROWS[bz, by, state, :, :], dh_s)
            T.copy(DZ_ROWS[bz, by, state, :], dz_s)

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
