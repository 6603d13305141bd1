"""Backward dQ with hand-written warp specialisation (FA3 style), 128-row query blocks.

Same computation, arguments and outputs as `backward_dq.backward_dq`; a different schedule:

- warpgroup 2 is the producer: TMA loads of Q and dO (one barrier each), of each critical
  key block's K and V into a ring of `num_stages` stages, and, behind the first key block,
  of this query block's tile of DQ (the linear part of dQ the query pass wrote), so the
  epilogue never waits on global memory. K and V have separate "empty" barriers: V_j is
  free once dP = dO V_j^T is done, but K_j is needed again by dQ += dS K_j, which runs
  during the next step;
- warpgroups 0 and 1 are consumers, 64 query rows each. Q is held in registers (S = Q K^T
  is an RS wgmma); dO stays in shared memory (with dQ, S, dP and dS live, registers have
  no room for it). Step t issues S(t) and dP(t), then dQ += dS(t-1) K_(t-1), waits for the first two
  (`wgmma.wait_group 1`) and forms dS(t) in float32 while the dQ GEMM is still on the
  tensor cores; dS(t) goes to the input dtype, the dQ GEMM's A operand, only after that
  GEMM has read dS(t-1);
- with `pingpong`, the two consumers take turns issuing their GEMMs (two named barriers),
  as in the forward (`forward_ws`).

LSE and delta are read by the consumers, one element per row they own, before they wait
for Q: a TMA copy of a row of a [B, H, Lq] float32 tensor needs the row stride (4 Lq bytes)
to be a multiple of 16, which an odd Lq breaks, and 1 KiB per CTA loaded once is cheap
while the Q and dO tiles are still on their way.

Whatever the routing tensors hold, no load leaves its tensor: the count is clamped to
[0, width], each entry to an existing key block. Rows past Lq are zero-filled by TMA on
the way in, read as LSE = delta = 0, and clipped by the TMA store on the way out.

The loop is written out (a count of 0 or 1 is an ordinary case, not a pipelined loop of
one iteration), and the wait that ends a step is held below the exponentials by an ordering
guard (`_ORDER_GUARD`; ptxas would otherwise move most of them below it).
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, LOG2E, rows, seq_shape
from . import SHARED_MEMORY_BYTES
from .forward_ws import _PINGPONG_BARRIER

BLOCK_Q = 128
"""Query rows per CTA: two consumer warpgroups of 64 rows."""
CONSUMER_THREADS = 256
"""Warpgroups 0 and 1; warpgroup 2 (threads 256-383) is the producer."""
THREADS = CONSUMER_THREADS + 128

# The forward's guard (`forward_ws._ORDER_GUARD`) holds the wgmma wait below a volatile
# shared-memory read, but dS, unlike the forward's probabilities, feeds no reduction before
# that wait, and ptxas sinks most of the exponentials below it. Here every dS value is folded
# into a word (a LOP3 per two values) that is stored and read back, volatile, before the wait: the
# read, and so the wait, follows all of them. The word is the function's own (one per
# consumer thread), not a TileLang buffer, so TileLang adds no proxy fence for it.
_ORDER_GUARD = f"""
__device__ __forceinline__ void sla_order_guard_after(const float* values, int n) {{
  __shared__ unsigned words[{CONSUMER_THREADS}];
  unsigned bits = 0;
  #pragma unroll
  for (int i = 0; i < n; ++i) {{ bits |= __float_as_uint(values[i]); }}
  volatile unsigned* word = words + threadIdx.x;
  *word = bits;
  if (*word == 0x7fffffffu) {{ asm volatile("" ::: "memory"); }}
}}
"""

MIN_STAGES = 2
"""K_t is released only after dQ(t), which is issued after S(t+1): with one stage the
producer could never load K_(t+1)."""
MAX_TILE = 128 * 64
"""Largest D x block_kv served: at D=128 with 128-key blocks the accumulators of S, dP and
dQ, dS in the input dtype and Q take 256 registers a consumer thread (of 240); it spilled
even with Q left in shared memory."""


def shared_bytes(dim: int, block_kv: int, num_stages: int) -> int:
    """Shared memory of one CTA: the tile buffers (the barriers and the ordering guard's
    words take up to 2 KiB more)."""
    tile = 2  # bytes of a bf16/fp16 element
    q_do_and_dq = 3 * BLOCK_Q * dim * tile
    keys = 2 * num_stages * block_kv * dim * tile
    return q_do_and_dq + keys


def fits(dim: int, block_q: int, block_kv: int, num_stages: int) -> bool:
    """Whether this schedule serves these sizes: 128-row query blocks, at least two stages,
    a tile within the consumers' registers (`MAX_TILE`), within shared memory."""
    return (block_q == BLOCK_Q and num_stages >= MIN_STAGES and dim * block_kv <= MAX_TILE
            and shared_bytes(dim, block_kv, num_stages) + 2048 <= SHARED_MEMORY_BYTES)


def backward_dq_ws(dim: int, block_kv: int, dtype: str, layout: str, scale: float,
                   num_stages: int, pingpong: bool):
    """The warp-specialised dQ's TileLang program (see the module docstring).

    Schedule knobs (speed only): pipeline `num_stages` (at least 2) and `pingpong`.
    """
    if isinstance(num_stages, bool) or not isinstance(num_stages, int) \
            or num_stages < MIN_STAGES:
        raise ValueError(f"num_stages of the warp-specialised dQ must be an int >= "
                         f"{MIN_STAGES}; got {num_stages!r}")
    if not fits(dim, BLOCK_Q, block_kv, num_stages):
        raise ValueError(f"the warp-specialised dQ does not fit D={dim}, block_kv={block_kv}, "
                         f"num_stages={num_stages} in registers and shared memory")
    dt = DTYPES[dtype]
    acc = T.float32
    block_q = BLOCK_Q
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_q, width = T.dynamic("Mq"), T.dynamic("Kc")
    scale_log2 = scale * LOG2E
    row_policy = T.GemmWarpPolicy.FullRow

    @T.macro
    def d_scores_of(scores, d_probs, lse, delta, j):
        # dS = P (dP - delta), P = exp2(S scale log2(e) - LSE log2(e)), into d_probs (the
        # tensor cores are done with it). Only the last key block can reach past Lk: its
        # columns there get dS = 0. Two whole branches, so that ptxas cannot fold the mask
        # into every step as selects.
        if (j + 1) * block_kv > lk:
            for i, c in T.Parallel(block_q, block_kv):
                d_probs[i, c] = T.if_then_else(
                    j * block_kv + c < lk,
                    T.exp2(scores[i, c] * scale_log2 - lse[i]) * (d_probs[i, c] - delta[i]), 0)
        else:
            for i, c in T.Parallel(block_q, block_kv):
                d_probs[i, c] = T.exp2(scores[i, c] * scale_log2 - lse[i]) * (
                    d_probs[i, c] - delta[i])

    @T.macro
    def load_key_block(source, j, ring, full, empty, stage, phase, b, h):
        T.barrier_wait(empty[stage], phase ^ 1)
        T.tma_copy(rows(source, b, h, j * block_kv, block_kv, layout), ring[stage, :, :],
                   barrier=full[stage])
        T.barrier_arrive(full[stage])

    @T.macro
    def load_linear_part(source, tile, full, b, h, row):
        T.tma_copy(rows(source, b, h, row, block_q, layout), tile, barrier=full)
        T.barrier_arrive(full)

    @T.prim_func
    def main(
        Q: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        K: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        V: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        DO: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        LSE: T.Tensor([batch, heads, lq], acc),
        DELTA: T.Tensor([batch, heads, lq], acc),
        LUT: T.Tensor([batch, heads, n_q, width], T.int32),
        COUNT: T.Tensor([batch, heads, n_q], T.int32),
        DQ: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
    ):
        with T.Kernel(T.ceildiv(lq, block_q), heads, batch, threads=THREADS,
                      prelude=_ORDER_GUARD) as (bx, by, bz):
            q_s = T.alloc_shared([block_q, dim], dt)
            do_s = T.alloc_shared([block_q, dim], dt)
            k_s = T.alloc_shared([num_stages, block_kv, dim], dt)
            v_s = T.alloc_shared([num_stages, block_kv, dim], dt)
            dq_s = T.alloc_shared([block_q, dim], dt)  # the linear part in, then dQ out

            q_full = T.alloc_barrier(arrive_count=128)
            do_full = T.alloc_barrier(arrive_count=128)
            dq_full = T.alloc_barrier(arrive_count=128)
            k_full = T.alloc_barrier(arrive_count=[128] * num_stages)
            v_full = T.alloc_barrier(arrive_count=[128] * num_stages)
            k_empty = T.alloc_barrier(arrive_count=[CONSUMER_THREADS] * num_stages)
            v_empty = T.alloc_barrier(arrive_count=[CONSUMER_THREADS] * num_stages)

            tx = T.get_thread_binding()
            n_kv = T.ceildiv(lk, block_kv)
            # Whatever the routing tensors hold, no load leaves the row or the key blocks.
            count = T.max(T.min(COUNT[bz, by, bx], width), 0)
            row0 = bx * block_q

            if tx >= CONSUMER_THREADS:
                # Producer: one elected thread issues each TMA; all 128 arrive.
                T.set_max_nreg(24, 0)
                T.tma_copy(rows(Q, bz, by, row0, block_q, layout), q_s, barrier=q_full)
                T.barrier_arrive(q_full)
                T.tma_copy(rows(DO, bz, by, row0, block_q, layout), do_s, barrier=do_full)
                T.barrier_arrive(do_full)
                for t in T.serial(count):
                    s = t % num_stages
                    phase = (t // num_stages) & 1
                    j = T.max(T.min(LUT[bz, by, bx, t], n_kv - 1), 0)
                    load_key_block(K, j, k_s, k_full, k_empty, s, phase, bz, by)
                    load_key_block(V, j, v_s, v_full, v_empty, s, phase, bz, by)
                    if t == 0:
                        # The epilogue's operand, behind the first key block.
                        load_linear_part(DQ, dq_s, dq_full, bz, by, row0)
                if count == 0:
                    load_linear_part(DQ, dq_s, dq_full, bz, by, row0)
            else:
                T.set_max_nreg(240, 1)
                wg = tx // 128
                q_r = T.alloc_fragment([block_q, dim], dt)
                scores = T.alloc_fragment([block_q, block_kv], acc)
                d_probs = T.alloc_fragment([block_q, block_kv], acc)
                d_scores = T.alloc_fragment([block_q, block_kv], dt)
                dq = T.alloc_fragment([block_q, dim], acc)
                lse = T.alloc_fragment([block_q], acc)
                delta = T.alloc_fragment([block_q], acc)
                # Rows past Lq: LSE = delta = 0 (their Q and dO come in as zeros).
                for i in T.Parallel(block_q):
                    lse[i] = 0.0
                    delta[i] = 0.0
                    if row0 + i < lq:
                        lse[i] = LSE[bz, by, row0 + i] * LOG2E
                        delta[i] = DELTA[bz, by, row0 + i]
                T.fill(dq, 0)
                T.barrier_wait(q_full, 0)
                T.copy(q_s, q_r)

                if count > 0:
                    if pingpong:
                        if count > 1:
                            if wg == 0:  # consumer 0 takes the first turn
                                T.named_barrier_arrive(_PINGPONG_BARRIER, CONSUMER_THREADS)
                    T.barrier_wait(k_full[0], 0)
                    T.wgmma_gemm(q_r, k_s[0, :, :], scores, transpose_B=True,
                                 clear_accum=True, policy=row_policy)
                    T.barrier_wait(do_full, 0)
                    T.barrier_wait(v_full[0], 0)
                    T.wgmma_gemm(do_s, v_s[0, :, :], d_probs, transpose_B=True,
                                 clear_accum=True, policy=row_policy)
                    T.wait_wgmma(0)
                    T.barrier_arrive(v_empty[0])
                    d_scores_of(scores, d_probs, lse, delta,
                                T.max(T.min(LUT[bz, by, bx, 0], n_kv - 1), 0))
                    T.copy(d_probs, d_scores)
                    for t in T.serial(1, count):
                        s = t % num_stages
                        sp = (t - 1) % num_stages
                        phase = (t // num_stages) & 1
                        # Read ahead of the GEMMs, so the load is not waited for after them.
                        j = T.max(T.min(LUT[bz, by, bx, t], n_kv - 1), 0)
                        T.barrier_wait(k_full[s], phase)
                        if pingpong:
                            T.sync_threads(_PINGPONG_BARRIER + wg, CONSUMER_THREADS)
                        T.wgmma_gemm(q_r, k_s[s, :, :], scores, transpose_B=True,
                                     clear_accum=True, policy=row_policy)
                        T.barrier_wait(v_full[s], phase)
                        T.wgmma_gemm(do_s, v_s[s, :, :], d_probs, transpose_B=True,
                                     clear_accum=True, policy=row_policy)
                        T.wgmma_gemm(d_scores, k_s[sp, :, :], dq, policy=row_policy)
                        if pingpong:
                            # Hand the tensor cores over; consumer 1 leaves no arrival
                            # behind after its last step.
                            if wg == 0 or t + 1 < count:
                                T.named_barrier_arrive(_PINGPONG_BARRIER + 1 - wg,
                                                       CONSUMER_THREADS)
                        # S(t) and dP(t) are ready; dQ += dS(t-1) K_(t-1) is still running.
                        T.wait_wgmma(1)
                        T.barrier_arrive(v_empty[s])
                        d_scores_of(scores, d_probs, lse, delta, j)
                        T.call_extern("handle", "sla_order_guard_after", d_probs.data,
                                      block_q * block_kv // CONSUMER_THREADS)
                        T.wait_wgmma(0)
                        T.barrier_arrive(k_empty[sp])
                        T.copy(d_probs, d_scores)
                    last = (count - 1) % num_stages
                    T.wgmma_gemm(d_scores, k_s[last, :, :], dq, policy=row_policy)
                    T.wait_wgmma(0)
                    T.barrier_arrive(k_empty[last])
                else:
                    # No step used dO: its load must still land before the CTA exits.
                    T.barrier_wait(do_full, 0)

                # dQ = scale dS K + the linear part (prefetched).
                T.barrier_wait(dq_full, 0)
                for i, d in T.Parallel(block_q, dim):
                    dq[i, d] = dq[i, d] * scale + dq_s[i, d]
                T.copy(dq, dq_s)
                T.copy(dq_s, rows(DQ, bz, by, row0, block_q, layout))

    return main
