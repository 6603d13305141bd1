"""Fused SLA forward: block-sparse softmax attention over each query block's LUT, the linear
branch from pre-aggregated key-block states, and the projection, in one kernel.

One CTA per (query block, head, batch). The pipelined loop visits only the LUT's critical
key blocks: TMA brings K_j, V_j (and, in "marginal" mode, the block state h_j); wgmma does
S = Q K_j^T and O += P V_j with an online softmax; h_j is summed into a float32 register
accumulator. The epilogue forms the linear branch from the totals minus the excluded
blocks (H_i = H - sum h_j, Z_i = Z - sum z_j over critical and negligible j):

    O_l = phi(Q) H_i / (phi(Q) . Z_i + eps)        (0 where a row has no marginal block)
    O   = O_s + O_l W^T + b

and writes O, the natural-log LSE of the sparse branch, and for the backward O_l and
(in "marginal" mode) each query block's H_i and Z_i.
"""


import tilelang.language as T

from ..common import DTYPES, LOG2E, rows, seq_shape
from ..feature_maps import feature_map_macro

LINEAR_EPS = 1e-5
SHARED_MEMORY_BYTES = 227 * 1024
# Registers per thread the excluded-state accumulator may take before it moves to shared.
REGISTER_ACCUMULATOR_LIMIT = 64


def default_schedule(dim: int, block_q: int, block_kv: int, linear: str) -> dict:
    """Schedule knobs that compile without spills and fit shared memory for these sizes."""
    threads = 2 * block_q  # one warpgroup per 64 query rows
    marginal = linear == "marginal"
    in_shared = marginal and dim * dim // threads > REGISTER_ACCUMULATOR_LIMIT
    per_stage = 2 * block_kv * dim * 2 + (dim * dim * 2 if marginal else 0)
    fixed = block_q * dim * 2 + (dim * dim * 4 if in_shared else 0) + 2048
    stages = 2 if fixed + 2 * per_stage <= SHARED_MEMORY_BYTES else 1
    return dict(threads=threads, num_stages=stages, excluded_in_shared=in_shared)


def sla_forward(
    dim: int,
    block_q: int,
    block_kv: int,
    dtype: str,
    feature: str,
    linear: str,
    layout: str,
    scale: float,
    threads: int,
    num_stages: int,
    excluded_in_shared: bool,
):
    """The forward kernel's TileLang program for one combination of compile-time settings.

    Schedule knobs (speed only): `threads` doing the math, pipeline `num_stages`, and
    whether the float32 sum of excluded h_j lives in shared memory instead of registers.
    """
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_q, width, neg_width = T.dynamic("Mq"), T.dynamic("Kc"), T.dynamic("Kn")
    # The block states have their own block count, so 1-block dummies can stand in for
    # them in "global" mode, which never reads them.
    n_h_state, n_z_state = T.dynamic("Nh"), T.dynamic("Nz")
    # Per-query-block states saved for the backward: Mq of them in "marginal" mode; in
    # "global" mode every block's state is the total and the caller saves that instead.
    n_saved = T.dynamic("Ns")
    marginal = linear == "marginal"
    scale_log2 = scale * LOG2E
    phi = feature_map_macro(feature)

    @T.prim_func
    def main(
        Q: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        K: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        V: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        LUT: T.Tensor([batch, heads, n_q, width], T.int32),
        COUNT: T.Tensor([batch, heads, n_q], T.int32),
        NEG_LUT: T.Tensor([batch, heads, n_q, neg_width], T.int32),
        NEG_COUNT: T.Tensor([batch, heads, n_q], T.int32),
        H_BLOCK: T.Tensor([batch, heads, n_h_state, dim, dim], dt),
        Z_BLOCK: T.Tensor([batch, heads, n_z_state, dim], acc),
        H_TOTAL: T.Tensor([batch, heads, dim, dim], acc),
        Z_TOTAL: T.Tensor([batch, heads, dim], acc),
        W: T.Tensor([dim, dim], dt),
        BIAS: T.Tensor([dim], acc),
        O: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        O_LIN: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        LSE: T.Tensor([batch, heads, lq], acc),
        H_ROWS: T.Tensor([batch, heads, n_saved, dim, dim], dt),
        Z_ROWS: T.Tensor([batch, heads, n_saved, dim], acc),
    ):
        with T.Kernel(T.ceildiv(lq, block_q), heads, batch, threads=threads) as (bx, by, bz):
            q_s = T.alloc_shared([block_q, dim], dt)
            k_s = T.alloc_shared([block_kv, dim], dt)
            v_s = T.alloc_shared([block_kv, dim], dt)
            scores = T.alloc_fragment([block_q, block_kv], acc)
            probs = T.alloc_fragment([block_q, block_kv], dt)
            acc_o = T.alloc_fragment([block_q, dim], acc)
            row_max = T.alloc_fragment([block_q], acc)
            prev_max = T.alloc_fragment([block_q], acc)
            rescale = T.alloc_fragment([block_q], acc)
            row_sum = T.alloc_fragment([block_q], acc)
            denom = T.alloc_fragment([block_q], acc)
            if excluded_in_shared:
                excluded_h = T.alloc_shared([dim, dim], acc)
            else:
                excluded_h = T.alloc_fragment([dim, dim], acc)
            count = COUNT[bz, by, bx]
            T.copy(rows(Q, bz, by, bx * block_q, block_q, layout), q_s)
            T.fill(acc_o, 0)
            T.fill(denom, 0)
            T.fill(row_max, -T.infinity(acc))
            T.clear(excluded_h)

            for t in T.Pipelined(count, num_stages=num_stages):
                j = LUT[bz, by, bx, t]
                T.copy(rows(K, bz, by, j * block_kv, block_kv, layout), k_s)
                for i, c in T.Parallel(block_q, block_kv):
                    scores[i, c] = T.if_then_else(j * block_kv + c >= lk, -T.infinity(acc), 0)
                T.gemm(q_s, k_s, scores, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                T.copy(row_max, prev_max)
                T.reduce_max(scores, row_max, dim=1, clear=False)
                for i in T.Parallel(block_q):
                    rescale[i] = T.exp2((prev_max[i] - row_max[i]) * scale_log2)
                for i, c in T.Parallel(block_q, block_kv):
                    scores[i, c] = T.exp2((scores[i, c] - row_max[i]) * scale_log2)
                T.reduce_sum(scores, row_sum, dim=1)
                for i in T.Parallel(block_q):
                    denom[i] = denom[i] * rescale[i] + row_sum[i]
                T.copy(scores, probs)
                for i, d in T.Parallel(block_q, dim):
                    acc_o[i, d] *= rescale[i]
                T.copy(rows(V, bz, by, j * block_kv, block_kv, layout), v_s)
                T.gemm(probs, v_s, acc_o, policy=T.GemmWarpPolicy.FullRow)
                if marginal:
                    h_s = T.alloc_shared([dim, dim], dt)
                    T.copy(H_BLOCK[bz, by, j, :, :], h_s)
                    for a, d in T.Parallel(dim, dim):
                        excluded_h[a, d] += h_s[a, d]

            # Sparse branch: normalise, and the natural-log LSE (-inf for an empty row).
            lse = T.alloc_fragment([block_q], acc)
            for i in T.Parallel(block_q):
                lse[i] = T.if_then_else(
                    denom[i] > 0, (T.log2(denom[i]) + row_max[i] * scale_log2) / LOG2E,
                    -T.infinity(acc))
            for i, d in T.Parallel(block_q, dim):
                acc_o[i, d] = T.if_then_else(denom[i] > 0, acc_o[i, d] / denom[i], 0)
            T.copy(lse, LSE[bz, by, bx * block_q:(bx + 1) * block_q])

            # Linear branch: H_i = H - excluded, Z_i = Z - excluded, summed in float32.
            # z_i lives in shared memory: as a fragment its layout would force one thread
            # per column onto every fragment it is combined with.
            z_i = T.alloc_shared([dim], acc)
            T.copy(Z_TOTAL[bz, by, :], z_i)
            has_marginal = T.alloc_var(T.int32)
            has_marginal = 1
            if marginal:
                neg_count = NEG_COUNT[bz, by, bx]
                for t in T.serial(neg_count):
                    jn = NEG_LUT[bz, by, bx, t]
                    for a, d in T.Parallel(dim, dim):
                        excluded_h[a, d] += H_BLOCK[bz, by, jn, a, d]
                    for d in T.Parallel(dim):
                        z_i[d] -= Z_BLOCK[bz, by, jn, d]
                for t in T.serial(count):
                    jc = LUT[bz, by, bx, t]
                    for d in T.Parallel(dim):
                        z_i[d] -= Z_BLOCK[bz, by, jc, d]
                has_marginal = T.if_then_else(count + neg_count < T.ceildiv(lk, block_kv), 1, 0)
            h_i_s = T.alloc_shared([dim, dim], dt)
            for a, d in T.Parallel(dim, dim):
                h_i_s[a, d] = H_TOTAL[bz, by, a, d] - excluded_h[a, d]
            if marginal:
                T.copy(h_i_s, H_ROWS[bz, by, bx, :, :])
                T.copy(z_i, Z_ROWS[bz, by, bx, :])

            # phi(Q) is formed in `lin`, the fragment the linear GEMM later accumulates into,
            # so it takes that GEMM's register layout. Q comes from global memory, not q_s:
            # with an empty LUT row the loop never waits for q_s's load.
            lin = T.alloc_fragment([block_q, dim], acc)
            T.copy(rows(Q, bz, by, bx * block_q, block_q, layout), lin)
            phi_max = T.alloc_fragment([block_q], acc)
            phi_sum = T.alloc_fragment([block_q], acc)
            phi(lin, phi_max, phi_sum, block_q, dim)
            phi_q_s = T.alloc_shared([block_q, dim], dt)
            T.copy(lin, phi_q_s)
            lin_den = T.alloc_fragment([block_q], acc)
            for i, d in T.Parallel(block_q, dim):
                lin[i, d] = lin[i, d] * z_i[d]
            T.reduce_sum(lin, lin_den, dim=1)
            T.gemm(phi_q_s, h_i_s, lin, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
            for i, d in T.Parallel(block_q, dim):
                lin[i, d] = T.if_then_else(has_marginal > 0, lin[i, d] / (lin_den[i] + LINEAR_EPS),
                                           0)
            lin_s = T.alloc_shared([block_q, dim], dt)
            T.copy(lin, lin_s)
            T.copy(lin_s, rows(O_LIN, bz, by, bx * block_q, block_q, layout))

            # Projection: O = O_s + O_l W^T + b.
            w_s = T.alloc_shared([dim, dim], dt)
            T.copy(W, w_s)
            T.gemm(lin_s, w_s, acc_o, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
            for i, d in T.Parallel(block_q, dim):
                acc_o[i, d] += BIAS[d]
            o_s = T.alloc_shared([block_q, dim], dt)
            T.copy(acc_o, o_s)
            T.copy(o_s, rows(O, bz, by, bx * block_q, block_q, layout))

    return main
