"""Backward dK, dV over each key block's reverse LUT (key-major), with the linear branch.

One CTA per (key block j, head, batch), a warpgroup per 64 key rows. The pipelined loop
visits only the query blocks for which j is critical (the reverse LUT), `q_slice` query
rows at a time:

    P^T = exp(scale * K_j Q^T - LSE),  dV += P^T dO,  dS^T = P^T * (V_j dO^T - delta),
    dK += dS^T Q

P^T and dS^T stay in registers as the A operands of their GEMMs: each warpgroup owns
whole key rows, so no tile goes through shared memory and no warpgroup waits for another.

The linear branch's key-side gradients come from dH_j (D x D) and dZ_j (D), which the
caller sums from the query pass's G_i and g_i over the query blocks for which j is
marginal:

    dV += phi(K_j) dH_j,   dK += phi'(K_j)^T (V_j dH_j^T + dZ_j)

With `linear_first` they are formed before the loop, while the producer fills the
pipeline; otherwise after it. Code before the loop runs on every warp, producer included,
so `linear_first` needs a tile that the CTA's warps can split (one consumer warpgroup).

Whatever the reverse LUT holds, no read leaves its tensor: a key block's count is clamped
to [0, width] and each entry to an existing query block.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, LOG2E, rows, seq_shape
from ..feature_maps import feature_map_macro, feature_map_vjp_macro
from . import backward_dkdv_ws

WARP_SPECIALIZATION = ("auto", "manual")
"""How dK/dV's warpgroups share the work: "auto" is TileLang's automatic producer/consumer
split (this module's kernel); "manual" the hand-written schedule of `backward_dkdv_ws`
(64-key blocks, two consumer warpgroups a key block, a ring of 2 * num_stages query slices;
its `q_slice` is 64 and it has no `linear_first`)."""


def _hand_written_stages(dim: int, block_q: int, block_kv: int) -> tuple[int, ...]:
    """Pipeline depths (a ring of twice as many query slices) at which the hand-written
    schedule fits these sizes."""
    return tuple(n for n in (2, 3) if backward_dkdv_ws.fits(dim, block_q, block_kv, 2 * n))


def _automatic_default(block_kv: int) -> dict:
    return dict(num_stages=2, q_slice=64, linear_first=block_kv == 64,
                warp_specialization="auto")


def default_schedule(dim: int, block_q: int, block_kv: int) -> dict:
    """Schedule knobs that compile without spills and fit shared memory for these sizes.

    The hand-written schedule where it fits (measured on the H200 at the Wan2.1-1.3B shape,
    128x64 blocks: 1.25 ms against 2.17 ms for TileLang's automatic split,
    benchmarks/NOTES.md); TileLang's elsewhere. The two round differently (the hand-written
    kernel sums two warpgroups' halves), so the choice is fixed per size, not tuned.
    """
    stages = _hand_written_stages(dim, block_q, block_kv)
    if stages:
        return dict(num_stages=min(stages), q_slice=backward_dkdv_ws.SLICE,
                    linear_first=False, warp_specialization="manual")
    return _automatic_default(block_kv)


def search_space(dim: int, block_q: int, block_kv: int) -> dict[str, tuple]:
    """Choices of each schedule knob for the autotuner, each of which compiles (the tuner
    still prunes any that fail) and gives the default's numbers bit for bit. For
    TileLang's split, left out as compiling showed: 128-row slices at D=128 (dK, dV and a
    slice's probabilities spill ~270 bytes), and the linear part first with 128-key blocks
    (TileLang cannot lay that GEMM over the kernel's 12 warps)."""
    stages = _hand_written_stages(dim, block_q, block_kv)
    if stages:
        return dict(num_stages=stages)
    slices = tuple(q for q in (32, 64, 128) if q <= block_q and not (dim == 128 and q == 128))
    return dict(num_stages=(1, 2), q_slice=slices,
                linear_first=(False, True) if block_kv == 64 else (False,))


def alternatives(dim: int, block_q: int, block_kv: int) -> list[dict]:
    """Schedules that compute dK and dV with another rounding: candidates for the default,
    checked against float64 by the GPU tests and timed by `benchmarks/backward_breakdown.py`,
    never tuned. TileLang's split where the default is hand-written."""
    if not _hand_written_stages(dim, block_q, block_kv):
        return []
    return [_automatic_default(block_kv)]


def backward_dkdv(dim: int, block_q: int, block_kv: int, dtype: str, feature: str,
                  layout: str, scale: float, num_stages: int, q_slice: int,
                  linear_first: bool):
    """The dK/dV program for one combination of compile-time settings.

    Schedule knobs (speed only): pipeline `num_stages`, query rows per step `q_slice`
    (divides block_q), and `linear_first` (where the linear branch's part is computed).
    """
    if block_q % q_slice:
        raise ValueError(f"q_slice ({q_slice}) must divide block_q ({block_q})")
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_kv, width = T.dynamic("Nk"), T.dynamic("Wr")
    # LSE and delta come padded to a multiple of TMA_ROW_FLOATS rows (TMA's stride rule).
    lse_rows = T.dynamic("Lr")
    # One state per key block ("marginal"), or a single shared one ("global").
    n_states = T.dynamic("Ns")
    scale_log2 = scale * LOG2E
    slices = block_q // q_slice
    phi = feature_map_macro(feature)
    phi_vjp = feature_map_vjp_macro(feature)
    policy = T.GemmWarpPolicy.FullRow
    threads = 2 * block_kv  # a warpgroup per 64 key rows

    @T.macro
    def linear_part(K, V, DH_ROWS, DZ_ROWS, DK, v_s, dv, dk_s, bx, by, bz):
        """dV += phi(K_j) dH_j, and phi'(K_j)^T (V_j dH_j^T + dZ_j): into dk_s before the
        loop; after it, added to the scaled sparse dK waiting in dk_s and stored."""
        state = T.if_then_else(n_states == 1, 0, bx)
        dh_s = T.alloc_shared([dim, dim], dt)
        T.copy(DH_ROWS[bz, by, state, :, :], dh_s)
        keys = T.alloc_fragment([block_kv, dim], acc)
        row_a = T.alloc_fragment([block_kv], acc)
        row_b = T.alloc_fragment([block_kv], acc)
        phi_s = T.alloc_shared([block_kv, dim], dt)
        T.copy(rows(K, bz, by, bx * block_kv, block_kv, layout), keys)
        phi(keys, row_a, row_b, block_kv, dim)
        # phi is 0 on rows past Lk.
        for r, d in T.Parallel(block_kv, dim):
            keys[r, d] = T.if_then_else(bx * block_kv + r < lk, keys[r, d], 0)
        T.copy(keys, phi_s)
        T.gemm(phi_s, dh_s, dv, policy=policy)
        d_phi = T.alloc_fragment([block_kv, dim], acc)
        T.gemm(v_s, dh_s, d_phi, transpose_B=True, clear_accum=True, policy=policy)
        # dZ_j is read from global memory: a 1-D copy to shared memory next to a
        # warp-specialised loop is one of TileLang's known hazards.
        for r, d in T.Parallel(block_kv, dim):
            d_phi[r, d] = d_phi[r, d] + DZ_ROWS[bz, by, state, d]
        T.copy(rows(K, bz, by, bx * block_kv, block_kv, layout), keys)
        phi_vjp(keys, d_phi, row_a, row_b, block_kv, dim)
        if linear_first:
            T.copy(d_phi, dk_s)
        else:
            for r, d in T.Parallel(block_kv, dim):
                d_phi[r, d] = d_phi[r, d] + dk_s[r, d]
            T.copy(d_phi, rows(DK, bz, by, bx * block_kv, block_kv, layout))

    @T.prim_func
    def main(
        Q: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        K: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        V: T.Tensor(seq_shape(batch, heads, lk, dim, layout), dt),
        DO: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        LSE: T.Tensor([batch, heads, lse_rows], acc),
        DELTA: T.Tensor([batch, heads, lse_rows], acc),
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
            lse_s = T.alloc_shared([q_slice], acc)
            delta_s = T.alloc_shared([q_slice], acc)
            probs = T.alloc_fragment([block_kv, q_slice], acc)
            d_probs = T.alloc_fragment([block_kv, q_slice], acc)
            p_op = T.alloc_fragment([block_kv, q_slice], dt)
            ds_op = T.alloc_fragment([block_kv, q_slice], dt)
            dk = T.alloc_fragment([block_kv, dim], acc)
            dv = T.alloc_fragment([block_kv, dim], acc)
            # One part of dK waits here (the linear one before the loop, or the sparse one
            # after it), so that both parts and phi'(K_j)'s inputs are never all in registers.
            dk_s = T.alloc_shared([block_kv, dim], acc)

            T.copy(rows(K, bz, by, bx * block_kv, block_kv, layout), k_s)
            T.copy(rows(V, bz, by, bx * block_kv, block_kv, layout), v_s)
            T.clear(dv)
            if linear_first:
                linear_part(K, V, DH_ROWS, DZ_ROWS, DK, v_s, dv, dk_s, bx, by, bz)
            T.clear(dk)
            count = T.max(T.min(RCOUNT[bz, by, bx], width), 0)
            last_block = T.ceildiv(lq, block_q) - 1
            for t in T.Pipelined(count * slices, num_stages=num_stages):
                query_block = T.max(T.min(RLUT[bz, by, bx, t // slices], last_block), 0)
                first = query_block * block_q + (t % slices) * q_slice
                T.copy(rows(Q, bz, by, first, q_slice, layout), q_s)
                T.copy(LSE[bz, by, first:first + q_slice], lse_s)
                T.gemm(k_s, q_s, probs, transpose_B=True, clear_accum=True, policy=policy)
                for r, c in T.Parallel(block_kv, q_slice):
                    probs[r, c] = T.if_then_else(
                        first + c < lq, T.exp2(probs[r, c] * scale_log2 - lse_s[c] * LOG2E), 0)
                T.copy(rows(DO, bz, by, first, q_slice, layout), do_s)
                T.copy(DELTA[bz, by, first:first + q_slice], delta_s)
                T.gemm(v_s, do_s, d_probs, transpose_B=True, clear_accum=True, policy=policy)
                T.copy(probs, p_op)
                T.gemm(p_op, do_s, dv, policy=policy)
                for r, c in T.Parallel(block_kv, q_slice):
                    ds_op[r, c] = probs[r, c] * (d_probs[r, c] - delta_s[c])
                T.gemm(ds_op, q_s, dk, policy=policy)

            if linear_first:
                T.copy(dv, rows(DV, bz, by, bx * block_kv, block_kv, layout))
                for r, d in T.Parallel(block_kv, dim):
                    dk[r, d] = dk[r, d] * scale + dk_s[r, d]
                T.copy(dk, rows(DK, bz, by, bx * block_kv, block_kv, layout))
            else:
                for r, d in T.Parallel(block_kv, dim):
                    dk_s[r, d] = dk[r, d] * scale
                linear_part(K, V, DH_ROWS, DZ_ROWS, DK, v_s, dv, dk_s, bx, by, bz)
                T.copy(dv, rows(DV, bz, by, bx * block_kv, block_kv, layout))

    return main
