"""Fused SLA forward with hand-written warp specialisation (FA3 style), 128-row query blocks.

Same computation, arguments and outputs as `forward.sla_forward`; a different schedule:

- warpgroup 2 is the producer: TMA loads of Q, of each critical key block's K and V into a
  ring of `num_stages` buffers (mbarriers "full"/"empty" per stage), and, early in the loop,
  of everything the epilogue reads (H_i, Z_i, W, the bias), so the epilogue never waits on
  global memory;
- warpgroups 0 and 1 are consumers, 64 query rows each. Q is held in registers (the QK^T
  wgmma takes its A operand from registers, which halves the shared-memory traffic of a
  64-key step). Each step issues QK^T(t) and PV(t-1) asynchronously, then runs the softmax
  of step t while PV(t-1) is still on the tensor cores;
- with `pingpong`, the two consumers take turns issuing their GEMMs (two named barriers),
  so one's softmax overlaps the other's GEMMs instead of both colliding on the tensor cores.

Whatever the routing tensors hold, no load leaves its tensor (the count is clamped to the
row, each entry to an existing key block); ACTIVE < 0 marks a row whose routing the caller
found invalid, written as NaN.

The gated variant (a compile-time flag) reads a float32 gate g per query row and scales
the projection term by it: O = O_s + g (O_l W^T + b).

Arithmetic: exp2 with the softmax scale and log2(e) folded into one multiplier, per-row
reciprocals instead of per-element division (compiled with flush-to-zero, see
`schedules.compile`).

Guarded against two traps of TileLang 0.1.15 / ptxas 13.0 (see the project notes):
a pipelined loop of one iteration (the loop here is written out, so one critical block is
an ordinary case), and ptxas hoisting the final wgmma wait above the softmax's
exponentials (an opaque shared-memory read and branch before that wait, `_ORDER_GUARD`).
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, LINEAR_EPS, LN2, LOG2E, NAN, rows, seq_shape
from ..feature_maps import linear_rows_macro
from . import SHARED_MEMORY_BYTES

BLOCK_Q = 128
"""Query rows per CTA: two consumer warpgroups of 64 rows."""
THREADS = 384

# Named barriers 0 (__syncthreads) and the low ids are TileLang's own; the two consumers'
# turn-taking barriers sit above them.
_PINGPONG_BARRIER = 8

# A volatile shared-memory read feeding a branch that never runs: ptxas cannot move the
# wgmma wait that follows above it, so the softmax's exponentials stay between the two
# waits of a step. The word read is the function's own, not a TileLang buffer: an access
# TileLang can see would make it fence the proxies before every step's wgmma.
_ORDER_GUARD = """
__device__ __forceinline__ void sla_order_guard() {
  __shared__ int word;
  if (*((volatile int*)&word) == 0x7fffffff) { asm volatile("" ::: "memory"); }
}
"""


def shared_bytes(dim: int, block_kv: int, num_stages: int, entries_per_step: int = 1) -> int:
    """Shared memory of one CTA (the tile buffers; barriers and scratch take ~1 KiB more)."""
    tile = 2  # bytes of a bf16/fp16 element
    q_and_out = BLOCK_Q * dim * tile
    keys = 2 * num_stages * entries_per_step * block_kv * dim * tile
    epilogue = 2 * dim * dim * tile + 2 * dim * 4
    # With one LUT entry a step, O_l has a tile of its own; with two, it reuses Q's.
    lin = BLOCK_Q * dim * tile if entries_per_step == 1 else 0
    return q_and_out + keys + epilogue + lin


def fits(dim: int, block_q: int, block_kv: int, num_stages: int,
         entries_per_step: int = 1) -> bool:
    """Whether this schedule serves these sizes: 128-row query blocks, within shared memory."""
    return block_q == BLOCK_Q and shared_bytes(dim, block_kv, num_stages, entries_per_step) + \
        2048 <= SHARED_MEMORY_BYTES


def sla_forward_ws(
    dim: int,
    block_kv: int,
    dtype: str,
    feature: str,
    layout: str,
    scale: float,
    num_stages: int,
    pingpong: bool,
    entries_per_step: int = 1,
    gated: bool = False,
):
    """The warp-specialised forward's TileLang program (see the module docstring).

    Schedule knobs (speed only): pipeline `num_stages` and `pingpong`. `entries_per_step`
    (1 or 2) is how many LUT entries (key blocks) a loop step takes: with 2, the step's
    fixed costs (rescaling O, the row reductions' shuffles, barriers) are paid once per two
    key blocks, and the online softmax's running maximum moves per pair, which rounds
    differently from taking the blocks one by one.
    """
    if entries_per_step not in (1, 2):
        raise ValueError(f"entries_per_step must be 1 or 2; got {entries_per_step}")
    if not fits(dim, BLOCK_Q, block_kv, num_stages, entries_per_step):
        raise ValueError(f"the warp-specialised forward does not fit D={dim}, "
                         f"block_kv={block_kv}, num_stages={num_stages}, "
                         f"entries_per_step={entries_per_step} in shared memory")
    dt = DTYPES[dtype]
    acc = T.float32
    block_q = BLOCK_Q
    pair = entries_per_step == 2
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_q, width = T.dynamic("Mq"), T.dynamic("Kc")
    n_states = T.dynamic("Ns")
    scale_log2 = scale * LOG2E
    linear_rows = linear_rows_macro(feature)
    neg_inf = -T.infinity(acc)
    row_policy = T.GemmWarpPolicy.FullRow
    # A parameter annotated with None is a compile-time constant, not a kernel argument.
    gate_tensor = T.Tensor([batch, heads, lq], acc) if gated else None

    @T.macro
    def mask_tail(scores, j):
        # Only the last key block can reach past Lk.
        if (j + 1) * block_kv > lk:
            for i, c in T.Parallel(block_q, block_kv):
                scores[i, c] = T.if_then_else(j * block_kv + c >= lk, neg_inf, scores[i, c])

    @T.macro
    def exponentiate(scores, scaled_max, row_sum):
        for i, c in T.Parallel(block_q, block_kv):
            scores[i, c] = T.exp2(scores[i, c] * scale_log2 - scaled_max[i])
        T.reduce_sum(scores, row_sum, dim=1)

    @T.macro
    def new_maximum(row_max, prev_max, rescale, scaled_max):
        for i in T.Parallel(block_q):
            rescale[i] = T.exp2((prev_max[i] - row_max[i]) * scale_log2)
            scaled_max[i] = row_max[i] * scale_log2

    @T.macro
    def online_softmax(scores, row_max, prev_max, rescale, scaled_max, row_sum, denom, j):
        mask_tail(scores, j)
        T.copy(row_max, prev_max)
        T.reduce_max(scores, row_max, dim=1, clear=False)
        new_maximum(row_max, prev_max, rescale, scaled_max)
        exponentiate(scores, scaled_max, row_sum)
        for i in T.Parallel(block_q):
            denom[i] = denom[i] * rescale[i] + row_sum[i]

    @T.macro
    def online_softmax_pair(scores, scores_b, row_max, prev_max, rescale, scaled_max, row_sum,
                            row_sum_b, denom, j, j_b, valid_b):
        mask_tail(scores, j)
        if valid_b:
            mask_tail(scores_b, j_b)
        else:  # an odd count: the step's second entry is a copy of its first
            T.fill(scores_b, neg_inf)
        T.copy(row_max, prev_max)
        T.reduce_max(scores, row_max, dim=1, clear=False)
        T.reduce_max(scores_b, row_max, dim=1, clear=False)
        new_maximum(row_max, prev_max, rescale, scaled_max)
        exponentiate(scores, scaled_max, row_sum)
        exponentiate(scores_b, scaled_max, row_sum_b)
        for i in T.Parallel(block_q):
            denom[i] = denom[i] * rescale[i] + row_sum[i] + row_sum_b[i]

    @T.macro
    def load_epilogue(h_rows, w, z_rows, bias, b, h, state, h_s, w_s, z_s, bias_s, barrier):
        T.tma_copy(h_rows[b, h, state, :, :], h_s, barrier=barrier)
        T.tma_copy(w[:, :], w_s, barrier=barrier)
        T.tma_copy(z_rows[b, h, state, :], z_s, barrier=barrier)
        T.tma_copy(bias[:], bias_s, barrier=barrier)
        T.barrier_arrive(barrier)

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
        with T.Kernel(T.ceildiv(lq, block_q), heads, batch, threads=THREADS,
                      prelude=_ORDER_GUARD) as (bx, by, bz):
            q_s = T.alloc_shared([block_q, dim], dt)  # Q, then the output tile
            # Stage s's key blocks (one, or the step's pair) are rows [entries * s + e].
            k_s = T.alloc_shared([num_stages * entries_per_step, block_kv, dim], dt)
            v_s = T.alloc_shared([num_stages * entries_per_step, block_kv, dim], dt)
            h_s = T.alloc_shared([dim, dim], dt)
            w_s = T.alloc_shared([dim, dim], dt)
            z_s = T.alloc_shared([dim], acc)
            bias_s = T.alloc_shared([dim], acc)
            # With pairs the stages take O_l's tile: O_l goes through Q's once phi(Q) is used.
            lin_s = q_s if pair else T.alloc_shared([block_q, dim], dt)

            q_full = T.alloc_barrier(arrive_count=128)
            epilogue_full = T.alloc_barrier(arrive_count=128)
            k_full = T.alloc_barrier(arrive_count=[128] * num_stages)
            v_full = T.alloc_barrier(arrive_count=[128] * num_stages)
            k_empty = T.alloc_barrier(arrive_count=[256] * num_stages)
            v_empty = T.alloc_barrier(arrive_count=[256] * num_stages)

            tx = T.get_thread_binding()
            n_kv = T.ceildiv(lk, block_kv)
            # Whatever the routing tensors hold, no load leaves the row or the key blocks.
            count = T.max(T.min(COUNT[bz, by, bx], width), 0)
            steps = T.ceildiv(count, entries_per_step)
            state = T.if_then_else(n_states == 1, 0, bx)

            if tx >= 256:
                # Producer: one elected thread issues each TMA; all 128 arrive.
                T.set_max_nreg(24, 0)
                T.tma_copy(rows(Q, bz, by, bx * block_q, block_q, layout), q_s, barrier=q_full)
                T.barrier_arrive(q_full)
                for t in T.serial(steps):
                    s = t % num_stages
                    phase = (t // num_stages) & 1
                    first = t * entries_per_step
                    j = T.max(T.min(LUT[bz, by, bx, first], n_kv - 1), 0)
                    if pair:
                        # An odd count's last step loads its one block twice (masked).
                        j_b = T.if_then_else(
                            first + 1 < count,
                            T.max(T.min(LUT[bz, by, bx, first + 1], n_kv - 1), 0), j)
                    T.barrier_wait(k_empty[s], phase ^ 1)
                    T.tma_copy(rows(K, bz, by, j * block_kv, block_kv, layout),
                               k_s[entries_per_step * s, :, :], barrier=k_full[s])
                    if pair:
                        T.tma_copy(rows(K, bz, by, j_b * block_kv, block_kv, layout),
                                   k_s[2 * s + 1, :, :], barrier=k_full[s])
                    T.barrier_arrive(k_full[s])
                    T.barrier_wait(v_empty[s], phase ^ 1)
                    T.tma_copy(rows(V, bz, by, j * block_kv, block_kv, layout),
                               v_s[entries_per_step * s, :, :], barrier=v_full[s])
                    if pair:
                        T.tma_copy(rows(V, bz, by, j_b * block_kv, block_kv, layout),
                                   v_s[2 * s + 1, :, :], barrier=v_full[s])
                    T.barrier_arrive(v_full[s])
                    if t == 0:
                        # The epilogue's operands, behind the first key blocks.
                        load_epilogue(H_ROWS, W, Z_ROWS, BIAS, bz, by, state, h_s, w_s, z_s,
                                      bias_s, epilogue_full)
                if count == 0:
                    load_epilogue(H_ROWS, W, Z_ROWS, BIAS, bz, by, state, h_s, w_s, z_s,
                                  bias_s, epilogue_full)
            else:
                T.set_max_nreg(240, 1)
                wg = tx // 128
                q_r = T.alloc_fragment([block_q, dim], dt)
                scores = T.alloc_fragment([block_q, block_kv], acc)
                probs = T.alloc_fragment([block_q, block_kv], dt)
                if pair:
                    scores_b = T.alloc_fragment([block_q, block_kv], acc)
                    probs_b = T.alloc_fragment([block_q, block_kv], dt)
                    row_sum_b = T.alloc_fragment([block_q], acc)
                acc_o = T.alloc_fragment([block_q, dim], acc)
                row_max = T.alloc_fragment([block_q], acc)
                prev_max = T.alloc_fragment([block_q], acc)
                rescale = T.alloc_fragment([block_q], acc)
                scaled_max = T.alloc_fragment([block_q], acc)
                row_sum = T.alloc_fragment([block_q], acc)
                denom = T.alloc_fragment([block_q], acc)
                T.fill(acc_o, 0)
                T.fill(denom, 0)
                T.fill(row_max, neg_inf)
                T.barrier_wait(q_full, 0)
                T.copy(q_s, q_r)

                if steps > 0:
                    if pingpong:
                        if steps > 1:
                            if wg == 0:  # consumer 0 takes the first turn
                                T.named_barrier_arrive(_PINGPONG_BARRIER, 256)
                    T.barrier_wait(k_full[0], 0)
                    T.wgmma_gemm(q_r, k_s[0, :, :], scores, transpose_B=True, clear_accum=True,
                                 policy=row_policy)
                    if pair:
                        T.wgmma_gemm(q_r, k_s[1, :, :], scores_b, transpose_B=True,
                                     clear_accum=True, policy=row_policy)
                    T.wait_wgmma(0)
                    T.barrier_arrive(k_empty[0])
                    j = T.max(T.min(LUT[bz, by, bx, 0], n_kv - 1), 0)
                    if pair:
                        online_softmax_pair(
                            scores, scores_b, row_max, prev_max, rescale, scaled_max, row_sum,
                            row_sum_b, denom, j, T.max(T.min(LUT[bz, by, bx, 1], n_kv - 1), 0),
                            1 < count)
                        T.copy(scores_b, probs_b)
                    else:
                        online_softmax(scores, row_max, prev_max, rescale, scaled_max, row_sum,
                                       denom, j)
                    T.copy(scores, probs)
                    for t in T.serial(1, steps):
                        s = t % num_stages
                        sp = (t - 1) % num_stages
                        T.barrier_wait(k_full[s], (t // num_stages) & 1)
                        if pingpong:
                            T.sync_threads(_PINGPONG_BARRIER + wg, 256)
                        T.wgmma_gemm(q_r, k_s[entries_per_step * s, :, :], scores,
                                     transpose_B=True, clear_accum=True, policy=row_policy)
                        if pair:
                            T.wgmma_gemm(q_r, k_s[2 * s + 1, :, :], scores_b, transpose_B=True,
                                         clear_accum=True, policy=row_policy)
                        # O is rescaled for step t-1's max before P(t-1) V is added.
                        for i, d in T.Parallel(block_q, dim):
                            acc_o[i, d] *= rescale[i]
                        T.barrier_wait(v_full[sp], ((t - 1) // num_stages) & 1)
                        T.wgmma_gemm(probs, v_s[entries_per_step * sp, :, :], acc_o,
                                     policy=row_policy)
                        if pair:
                            T.wgmma_gemm(probs_b, v_s[2 * sp + 1, :, :], acc_o,
                                         policy=row_policy)
                        if pingpong:
                            # Hand the tensor cores over; consumer 1 leaves no arrival
                            # behind after its last step.
                            if wg == 0 or t + 1 < steps:
                                T.named_barrier_arrive(_PINGPONG_BARRIER + 1 - wg, 256)
                        # S(t) is ready; P(t-1) V is still running.
                        T.wait_wgmma(entries_per_step)
                        T.barrier_arrive(k_empty[s])
                        first = t * entries_per_step
                        j = T.max(T.min(LUT[bz, by, bx, first], n_kv - 1), 0)
                        if pair:
                            online_softmax_pair(
                                scores, scores_b, row_max, prev_max, rescale, scaled_max,
                                row_sum, row_sum_b, denom, j,
                                T.max(T.min(LUT[bz, by, bx, first + 1], n_kv - 1), 0),
                                first + 1 < count)
                        else:
                            online_softmax(scores, row_max, prev_max, rescale, scaled_max,
                                           row_sum, denom, j)
                        T.call_extern("handle", "sla_order_guard")
                        T.wait_wgmma(0)
                        T.barrier_arrive(v_empty[sp])
                        T.copy(scores, probs)
                        if pair:
                            T.copy(scores_b, probs_b)
                    for i, d in T.Parallel(block_q, dim):
                        acc_o[i, d] *= rescale[i]
                    last = (steps - 1) % num_stages
                    T.barrier_wait(v_full[last], ((steps - 1) // num_stages) & 1)
                    T.wgmma_gemm(probs, v_s[entries_per_step * last, :, :], acc_o,
                                 policy=row_policy)
                    if pair:
                        T.wgmma_gemm(probs_b, v_s[2 * last + 1, :, :], acc_o, policy=row_policy)
                    T.wait_wgmma(0)
                    T.barrier_arrive(v_empty[last])

                # Linear branch from this query block's H_i and Z_i (prefetched). Both of its
                # GEMMs take their A operand from registers (phi(Q), then O_l), as the loop
                # takes P: no shared-memory round trip and no barrier between the two
                # consumers stands before either, and phi(Q) H_i runs while the sparse branch
                # is normalised.
                active = ACTIVE[bz, by, bx]
                T.barrier_wait(epilogue_full, 0)
                lin = T.alloc_fragment([block_q, dim], acc)
                lin_r = T.alloc_fragment([block_q, dim], dt)  # phi(Q), then O_l
                linear_rows(q_s, lin, lin_r, z_s, row_sum, prev_max, row_sum, block_q, dim)
                for i in T.Parallel(block_q):
                    row_sum[i] = T.if_then_else(
                        active > 0, 1.0 / (row_sum[i] + LINEAR_EPS),
                        T.if_then_else(active < 0, NAN, 0.0))
                T.wgmma_gemm(lin_r, h_s, lin, clear_accum=True, policy=row_policy)

                # Sparse branch: normalise, and the natural-log LSE (-inf for an empty row).
                # ACTIVE < 0: the caller found this row's routing invalid; it comes out NaN.
                for i in T.Parallel(block_q):
                    rescale[i] = T.if_then_else(denom[i] > 0, 1.0 / denom[i], 0.0)
                    scaled_max[i] = T.if_then_else(
                        active < 0, NAN, T.if_then_else(
                            denom[i] > 0, (T.log2(denom[i]) + row_max[i] * scale_log2) * LN2,
                            neg_inf))
                for i, d in T.Parallel(block_q, dim):
                    acc_o[i, d] *= rescale[i]
                for i in T.Parallel(block_q):
                    if bx * block_q + i < lq:
                        LSE[bz, by, bx * block_q + i] = scaled_max[i]

                T.wait_wgmma(0)
                for i, d in T.Parallel(block_q, dim):
                    lin[i, d] *= row_sum[i]
                T.copy(lin, lin_r)

                # Projection: O = O_s + O_l W^T + b, or O_s + g (O_l W^T + b) with a gate.
                # O_l's store goes out while the projection runs.
                if gated:
                    # `lin` is dead once stored: it takes the projection, scaled row by row.
                    T.copy(lin, lin_s)
                    T.tma_copy(lin_s, rows(O_LIN, bz, by, bx * block_q, block_q, layout))
                    for i in T.Parallel(block_q):
                        row_sum[i] = T.if_then_else(bx * block_q + i < lq,
                                                    GATE[bz, by, bx * block_q + i], 0.0)
                    T.wgmma_gemm(lin_r, w_s, lin, transpose_B=True, clear_accum=True,
                                 policy=row_policy)
                    T.wait_wgmma(0)
                    for i, d in T.Parallel(block_q, dim):
                        acc_o[i, d] = T.if_then_else(
                            active < 0, NAN, acc_o[i, d] + row_sum[i] * (lin[i, d] + bias_s[d]))
                else:
                    T.wgmma_gemm(lin_r, w_s, acc_o, transpose_B=True, policy=row_policy)
                    T.copy(lin, lin_s)
                    T.tma_copy(lin_s, rows(O_LIN, bz, by, bx * block_q, block_q, layout))
                    T.wait_wgmma(0)
                    for i, d in T.Parallel(block_q, dim):
                        acc_o[i, d] = T.if_then_else(active < 0, NAN, acc_o[i, d] + bias_s[d])
                if pair:
                    # O_l's store must have read the tile before O overwrites it.
                    T.tma_store_wait()
                T.copy(acc_o, q_s)
                T.copy(q_s, rows(O, bz, by, bx * block_q, block_q, layout))

    return main
