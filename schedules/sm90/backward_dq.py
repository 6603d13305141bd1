"""Backward dQ over each query block's LUT (query-major), completing the linear part.

One CTA per (query block, head, batch). The pipelined loop visits the critical key blocks
only: P = exp(scale * Q K_j^T - LSE), dS = P * (dO V_j^T - delta), dQ += dS K_j. The
epilogue adds scale * dQ to the linear branch's dQ that the query pass left in DQ.
Whatever the LUT holds, no read leaves its tensor: a row's count is clamped to [0, width]
and each entry to an existing key block.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, LOG2E, element, rows, seq_shape
from . import SHARED_MEMORY_BYTES, backward_dq_ws

WARP_SPECIALIZATION = ("auto", "manual", "pingpong")
"""How dQ's warpgroups share the work: "auto" is TileLang's automatic producer/consumer
split (this module's kernel, any block_q); "manual" and "pingpong" are the hand-written
schedule of `backward_dq_ws` (128-row query blocks), "pingpong" with the two consumers
taking turns on the tensor cores."""


def _hand_written_stages(dim: int, block_q: int, block_kv: int) -> tuple[int, ...]:
    """Pipeline depths at which the hand-written schedule fits these sizes."""
    return tuple(n for n in (2, 3) if backward_dq_ws.fits(dim, block_q, block_kv, n))


def _automatic_stages(dim: int, block_q: int, block_kv: int) -> tuple[int, ...]:
    """Pipeline depths at which TileLang's split fits shared memory: the Q and dO tiles,
    and K and V a stage, of 16-bit elements (at D=128 with 128x128 blocks, 3 stages ask for
    256 KiB, which the H200 refuses at launch)."""
    fixed = 2 * block_q * dim * 2
    per_stage = 2 * block_kv * dim * 2
    return tuple(n for n in (1, 2, 3) if fixed + n * per_stage <= SHARED_MEMORY_BYTES)


def default_schedule(dim: int, block_q: int, block_kv: int) -> dict:
    """Schedule knobs that compile without spills and fit shared memory for these sizes.

    The hand-written schedule at its deepest pipeline where it fits (measured on the H200
    at the Wan2.1-1.3B shape, 128x64 blocks: 0.71 ms against 0.85 ms for TileLang's
    automatic split at its best, benchmarks/NOTES.md); TileLang's elsewhere. The two round
    differently, so the choice is fixed per size, not tuned.
    """
    stages = _hand_written_stages(dim, block_q, block_kv)
    if stages:
        return dict(threads=backward_dq_ws.THREADS, num_stages=max(stages),
                    warp_specialization="manual")
    # A warpgroup per 64 query rows.
    return dict(threads=2 * block_q, num_stages=2, warp_specialization="auto")


def search_space(dim: int, block_q: int, block_kv: int) -> dict[str, tuple]:
    """Choices of each schedule knob for the autotuner: only choices that give the default
    schedule's numbers bit for bit (the order of the work changes, not the arithmetic)."""
    stages = _hand_written_stages(dim, block_q, block_kv)
    if stages:
        return dict(num_stages=stages, warp_specialization=("manual", "pingpong"))
    return dict(num_stages=_automatic_stages(dim, block_q, block_kv))


def alternatives(dim: int, block_q: int, block_kv: int) -> list[dict]:
    """Schedules that compute the same function as the default but round differently
    (the hand-written kernel orders its wgmma and exponent arithmetic its own way):
    candidates for the default, timed by `benchmarks/dq_variants.py` and checked against
    float64 by the GPU tests, never tuned. TileLang's automatic split where the default is
    hand-written."""
    if default_schedule(dim, block_q, block_kv)["warp_specialization"] == "auto":
        return []
    return [dict(threads=2 * block_q, num_stages=n, warp_specialization="auto")
            for n in _automatic_stages(dim, block_q, block_kv) if n >= 2]


def backward_dq(dim: int, block_q: int, block_kv: int, dtype: str, layout: str, scale: float,
                threads: int, num_stages: int):
    """The dQ program for one combination of compile-time settings."""
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_q, width = T.dynamic("Mq"), T.dynamic("Kc")
    scale_log2 = scale * LOG2E

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
        with T.Kernel(T.ceildiv(lq, block_q), heads, batch, threads=threads) as (bx, by, bz):
            q_s = T.alloc_shared([block_q, dim], dt)
            do_s = T.alloc_shared([block_q, dim], dt)
            k_s = T.alloc_shared([block_kv, dim], dt)
            v_s = T.alloc_shared([block_kv, dim], dt)
            scores = T.alloc_fragment([block_q, block_kv], acc)
            d_probs = T.alloc_fragment([block_q, block_kv], acc)
            d_scores = T.alloc_fragment([block_q, block_kv], dt)
            dq = T.alloc_fragment([block_q, dim], acc)
            lse = T.alloc_fragment([block_q], acc)
            delta = T.alloc_fragment([block_q], acc)

            T.copy(rows(Q, bz, by, bx * block_q, block_q, layout), q_s)
            T.copy(rows(DO, bz, by, bx * block_q, block_q, layout), do_s)
            # Element loads, not a 1-D bulk copy, ahead of the warp-specialised loop.
            for i in T.Parallel(block_q):
                lse[i] = LSE[bz, by, bx * block_q + i] * LOG2E
                delta[i] = DELTA[bz, by, bx * block_q + i]
            T.clear(dq)
            count = T.max(T.min(COUNT[bz, by, bx], width), 0)
            last_block = T.ceildiv(lk, block_kv) - 1
            for t in T.Pipelined(count, num_stages=num_stages):
                j = T.max(T.min(LUT[bz, by, bx, t], last_block), 0)
                T.copy(rows(K, bz, by, j * block_kv, block_kv, layout), k_s)
                T.gemm(q_s, k_s, scores, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullRow)
                T.copy(rows(V, bz, by, j * block_kv, block_kv, layout), v_s)
                T.gemm(do_s, v_s, d_probs, transpose_B=True, clear_accum=True,
                       policy=T.GemmWarpPolicy.FullRow)
                for i, c in T.Parallel(block_q, block_kv):
                    d_scores[i, c] = T.if_then_else(
                        j * block_kv + c < lk,
                        T.exp2(scores[i, c] * scale_log2 - lse[i]) * (d_probs[i, c] - delta[i]),
                        0)
                T.gemm(d_scores, k_s, dq, policy=T.GemmWarpPolicy.FullRow)
            for i, d in T.Parallel(block_q, dim):
                dq[i, d] = dq[i, d] * scale + element(DQ, bz, by, bx * block_q + i, d, layout)
            T.copy(dq, rows(DQ, bz, by, bx * block_q, block_q, layout))

    return main

