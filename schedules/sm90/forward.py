"""Fused SLA forward: block-sparse softmax attention over each query block's LUT, the linear
branch from the query block's state, and the projection, in one kernel.

One CTA per (query block, head, batch). The pipelined loop visits only the LUT's critical
key blocks: TMA brings K_j and V_j, wgmma does S = Q K_j^T and O += P V_j with an online
softmax. The epilogue forms the linear branch from the query block's H_i (D x D) and Z_i
(D), which the caller computes (sums of phi(K_j)^T V_j and colsum phi(K_j) over the
block's marginal key blocks), and the projection:

    O_l = phi(Q) H_i / (phi(Q) . Z_i + eps)        (0 where ACTIVE says no marginal block)
    O   = O_s + O_l W^T + b

It writes O, O_l (for the backward) and the natural-log LSE of the sparse branch. The gated
variant (a compile-time flag; the ungated kernel has no gate argument) reads a float32 gate
g per query row and scales the projection term by it: O = O_s + g (O_l W^T + b).

Whatever the LUT holds, no read leaves its tensor: a row's count is clamped to [0, width]
and each entry to an existing key block. ACTIVE < 0 marks a row whose routing the caller
found invalid; its O, O_l and LSE are written as NaN.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, LINEAR_EPS, LOG2E, NAN, rows, seq_shape
from ..feature_maps import linear_rows_macro
from . import SHARED_MEMORY_BYTES, forward_ws

WARP_SPECIALIZATION = ("auto", "manual", "pingpong")
"""How the forward's warpgroups share the work: "auto" is TileLang's automatic
producer/consumer split (this module's kernel, any block_q); "manual" and "pingpong" are the
hand-written schedule of `forward_ws` (128-row query blocks), "pingpong" with the two
consumers taking turns on the tensor cores. `entries_per_step` (1 or 2 LUT entries a loop
step) applies to the hand-written schedule only."""


def _hand_written_stages(dim: int, block_q: int, block_kv: int,
                         entries_per_step: int = 1) -> tuple[int, ...]:
    """Pipeline depths of at least two at which the hand-written schedule fits these sizes."""
    return tuple(n for n in (2, 3)
                 if forward_ws.fits(dim, block_q, block_kv, n, entries_per_step))


def default_schedule(dim: int, block_q: int, block_kv: int) -> dict:
    """Schedule knobs that compile without spills and fit shared memory for these sizes.

    The hand-written schedule where it fits two or more stages (measured on the H200 at
    the Wan2.1-1.3B shape, 128x64 blocks: 0.74 ms against 1.06 ms for TileLang's automatic
    one, benchmarks/NOTES.md); TileLang's elsewhere. The two round differently (bf16 output
    within one unit of the last place), so the choice is fixed per size, not tuned.
    """
    stages = _hand_written_stages(dim, block_q, block_kv)
    if stages:
        return dict(threads=384, num_stages=max(stages), warp_specialization="manual",
                    entries_per_step=1)
    per_stage = 2 * block_kv * dim * 2
    fixed = block_q * dim * 2 + 2048
    stages = 2 if fixed + 2 * per_stage <= SHARED_MEMORY_BYTES else 1
    # A warpgroup per 64 query rows.
    return dict(threads=2 * block_q, num_stages=stages, warp_specialization="auto",
                entries_per_step=1)


def search_space(dim: int, block_q: int, block_kv: int) -> dict[str, tuple]:
    """Choices of each schedule knob for the autotuner: only choices that give the default
    schedule's numbers bit for bit (the order of the work changes, not the arithmetic)."""
    stages = _hand_written_stages(dim, block_q, block_kv)
    if stages:
        return dict(num_stages=stages, warp_specialization=("manual", "pingpong"))
    # One warpgroup for 128 query rows is left out: it spills, and nvcc takes over ten
    # minutes to say so.
    return dict(num_stages=(1, 2, 3), warp_specialization=("auto",))


def alternatives(dim: int, block_q: int, block_kv: int) -> list[dict]:
    """Schedules that compute the same function as the default but round differently:
    candidates for the default (timed by `benchmarks/forward_variants.py`, checked against
    float64 by the GPU tests), never tuned. TileLang's automatic split where the default is
    hand-written, and the hand-written kernel taking two LUT entries a step."""
    default = default_schedule(dim, block_q, block_kv)
    found = []
    if default["warp_specialization"] != "auto":
        found.append(dict(threads=2 * block_q, num_stages=2, warp_specialization="auto",
                          entries_per_step=1))
    if block_kv == 64:
        found += [dict(num_stages=n, warp_specialization=variant, entries_per_step=2)
                  for n in _hand_written_stages(dim, block_q, block_kv, 2)
                  for variant in ("manual", "pingpong")]
    return found


def sla_forward(
    dim: int,
    block_q: int,
    block_kv: int,
    dtype: str,
    feature: str,
    layout: str,
    scale: float,
    threads: int,
    num_stages: int,
    gated: bool = False,
):
    """The forward kernel's TileLang program for one combination of compile-time settings.

    Schedule knobs (speed only): `threads` doing the math and pipeline `num_stages`.
    `gated` adds the GATE argument, float32 (B, H, Lq).
    """
    if threads != 2 * block_q:
        # TileLang's automatic split lays each GEMM's rows over the math warps, 64 rows a
        # warpgroup; any other count fails deep in its layout inference.
        raise ValueError(f"threads must be 2 * block_q ({2 * block_q}) for TileLang's "
                         f"automatic warp specialisation; got {threads}")
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_q, width = T.dynamic("Mq"), T.dynamic("Kc")
    # One state per query block ("marginal"), or a single shared one ("global").
    n_states = T.dynamic("Ns")
    scale_log2 = scale * LOG2E
    linear_rows = linear_rows_macro(feature)
    # A parameter annotated with None is a compile-time constant, not a kernel argument.
    gate_tensor = T.Tensor([batch, heads, lq], acc) if gated else None

    @T.prim_func
    def main(
        Q: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        K: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        V: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        LUT: T.Tensor([batch, heads, n_q, width], T.int32),
        COUNT: T.Tensor([batch, heads, n_q], T.int32),
        H_ROWS: T.Tensor([batch, heads, n_states, dim, dim], dt),
        Z_ROWS: T.Tensor([batch, heads, n_states, dim], acc),
        ACTIVE: T.Tensor([batch, heads, n_q], T.int32),
        W: T.Tensor([dim, dim], dt),
        BIAS: T.Tensor([dim], acc),
        GATE: gate_tensor,
        O: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        O_LIN: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        LSE: T.Tensor([batch, heads, lq], acc),
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
            scaled_max = T.alloc_fragment([block_q], acc)
            row_sum = T.alloc_fragment([block_q], acc)
            denom = T.alloc_fragment([block_q], acc)

            count = T.max(T.min(COUNT[bz, by, bx], width), 0)
            last_block = T.ceildiv(lk, block_kv) - 1
            T.copy(rows(Q, bz, by, bx * block_q, block_q, layout), q_s)
            T.fill(acc_o, 0)
            T.fill(denom, 0)
            T.fill(row_max, -T.infinity(acc))

            for t in T.Pipelined(count, num_stages=num_stages):
                j = T.max(T.min(LUT[bz, by, bx, t], last_block), 0)
                T.copy(rows(K, bz, by, j * block_kv, block_kv, layout), k_s)
                T.gemm(q_s, k_s, scores, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullRow)
                # Only the last key block can reach past Lk.
                if (j + 1) * block_kv > lk:
                    for i, c in T.Parallel(block_q, block_kv):
                        scores[i, c] = T.if_then_else(j * block_kv + c >= lk, -T.infinity(acc),
                                                      scores[i, c])
                T.copy(row_max, prev_max)
                T.reduce_max(scores, row_max, dim=1, clear=False)
                for i in T.Parallel(block_q):
                    rescale[i] = T.exp2((prev_max[i] - row_max[i]) * scale_log2)
                    scaled_max[i] = row_max[i] * scale_log2
                for i, c in T.Parallel(block_q, block_kv):
                    scores[i, c] = T.exp2(scores[i, c] * scale_log2 - scaled_max[i])
                T.reduce_sum(scores, row_sum, dim=1)
                for i in T.Parallel(block_q):
                    denom[i] = denom[i] * rescale[i] + row_sum[i]
                T.copy(scores, probs)
                for i, d in T.Parallel(block_q, dim):
                    acc_o[i, d] *= rescale[i]
                T.copy(rows(V, bz, by, j * block_kv, block_kv, layout), v_s)
                T.gemm(probs, v_s, acc_o, policy=T.GemmWarpPolicy.FullRow)

            # Sparse branch: normalise, and the natural-log LSE (-inf for an empty row).
            active = ACTIVE[bz, by, bx]
            lse = T.alloc_fragment([block_q], acc)
            for i in T.Parallel(block_q):
                lse[i] = T.if_then_else(
                    active < 0, NAN,
                    T.if_then_else(denom[i] > 0,
                                   (T.log2(denom[i]) + row_max[i] * scale_log2) / LOG2E,
                                   -T.infinity(acc)))
            for i, d in T.Parallel(block_q, dim):
                acc_o[i, d] = T.if_then_else(denom[i] > 0, acc_o[i, d] / denom[i], 0)
            T.copy(lse, LSE[bz, by, bx * block_q:(bx + 1) * block_q])

            # Linear branch from this query block's H_i and Z_i.
            state = T.if_then_else(n_states == 1, 0, bx)
            h_i_s = T.alloc_shared([dim, dim], dt)
            # z_i lives in shared memory: as a fragment its layout would force one thread
            # per column onto every fragment it is combined with.
            z_i = T.alloc_shared([dim], acc)
            T.copy(H_ROWS[bz, by, state, :, :], h_i_s)
            T.copy(Z_ROWS[bz, by, state, :], z_i)

            # phi(Q) is formed in `lin`, the fragment the linear GEMM later accumulates into,
            # so it takes that GEMM's register layout. Q comes from global memory, not q_s:
            # with an empty LUT row the loop never waits for q_s's load.
            lin = T.alloc_fragment([block_q, dim], acc)
            phi_max = T.alloc_fragment([block_q], acc)
            phi_sum = T.alloc_fragment([block_q], acc)
            phi_q_s = T.alloc_shared([block_q, dim], dt)
            lin_den = T.alloc_fragment([block_q], acc)
            linear_rows(rows(Q, bz, by, bx * block_q, block_q, layout), lin, phi_q_s, z_i,
                        lin_den, phi_max, phi_sum, block_q, dim)
            T.gemm(phi_q_s, h_i_s, lin, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)
            for i, d in T.Parallel(block_q, dim):
                lin[i, d] = T.if_then_else(active > 0, lin[i, d] / (lin_den[i] + LINEAR_EPS),
                                           T.if_then_else(active < 0, NAN, 0))
            lin_s = T.alloc_shared([block_q, dim], dt)
            T.copy(lin, lin_s)
            T.copy(lin_s, rows(O_LIN, bz, by, bx * block_q, block_q, layout))

            # Projection: O = O_s + O_l W^T + b, or O_s + g (O_l W^T + b) with a gate.
            w_s = T.alloc_shared([dim, dim], dt)
            T.copy(W, w_s)
            if gated:
                # `lin` is dead once stored: it takes the projection, scaled row by row.
                gate_rows = T.alloc_fragment([block_q], acc)
                T.copy(GATE[bz, by, bx * block_q:(bx + 1) * block_q], gate_rows)
                T.gemm(lin_s, w_s, lin, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullRow)
                for i, d in T.Parallel(block_q, dim):
                    acc_o[i, d] = T.if_then_else(
                        active < 0, NAN, acc_o[i, d] + gate_rows[i] * (lin[i, d] + BIAS[d]))
            else:
                T.gemm(lin_s, w_s, acc_o, transpose_B=True, policy=T.GemmWarpPolicy.FullRow)
                for i, d in T.Parallel(block_q, dim):
                    acc_o[i, d] = T.if_then_else(active < 0, NAN, acc_o[i, d] + BIAS[d])
            o_s = T.alloc_shared([block_q, dim], dt)
            T.copy(acc_o, o_s)
            T.copy(o_s, rows(O, bz, by, bx * block_q, block_q, layout))

    return main
