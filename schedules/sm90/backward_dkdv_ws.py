"""Backward dK, dV with hand-written warp specialisation: two consumer warpgroups a key block.

Same computation, arguments and outputs as `backward_dkdv.backward_dkdv`, for 64-key blocks;
a different schedule. One CTA per (key block j, head, batch), 384 threads:

- warpgroup 2 is the producer: TMA of K_j and V_j once, then, for every 64-row query slice
  of the reverse LUT's query blocks, the slice of Q, dO, LSE and delta into a ring of
  `ring` buffers (mbarriers "full"/"empty" per buffer), and, behind the first slice, dH_j
  and dZ_j for the linear branch;
- warpgroups 0 and 1 are consumers taking the slices in turn (0, 2, 4, ... and 1, 3, ...),
  each accumulating dK and dV of all 64 key rows for its own slices:

      S^T = K_j Q^T,  dP^T = V_j dO^T,  P^T = exp(scale * S^T - LSE),
      dS^T = P^T * (dP^T - delta),  dV += P^T dO,  dK += dS^T Q

  One warpgroup's exponentials run while the other's GEMMs hold the tensor cores. (Within
  a warpgroup the next slice's S^T and dP^T cannot be issued while dV and dK run: with
  both accumulators, both score tiles and both operands in flight, ptxas serialises the
  wgmma and spills.)
- the epilogue combines the two warpgroups' float32 sums through a shared tile and adds
  the linear branch's key-side gradients:

      dV += phi(K_j) dH_j,   dK = scale * dK + phi'(K_j)^T (V_j dH_j^T + dZ_j)

  consumer 1 forms phi(K_j) and the linear dK while consumer 0 finishes dV.

Whatever the reverse LUT holds, no read leaves its tensor: a key block's count is clamped
to [0, width] and each entry to an existing query block. The loops are written out, so a
key block with one slice (or none) is an ordinary case.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, LOG2E, rows, seq_shape
from ..feature_maps import feature_map_macro, feature_map_vjp_macro
from . import SHARED_MEMORY_BYTES

BLOCK_KV = 64
"""Key rows per CTA: both consumers hold dK and dV of the same 64 keys."""
SLICE = 64
"""Query rows per step (one wgmma N extent)."""
THREADS = 384

# Named barrier ids above TileLang's own: the two consumers' rendezvous in the epilogue.
_EXCHANGE_BARRIER = 8

# What TileLang adds beyond the tile buffers: the barriers, padded to the 1 KiB alignment of
# the dynamic part (ptxas reports 1024 bytes of static shared memory for these kernels).
_STATIC_BYTES = 1024


def shared_bytes(dim: int, ring: int) -> int:
    """Shared memory of one CTA's tile buffers."""
    tile = 2  # bytes of a bf16/fp16 element
    keys = 2 * BLOCK_KV * dim * tile
    slices = ring * (2 * SLICE * dim * tile + 2 * SLICE * 4)
    linear = dim * dim * tile
    exchange = BLOCK_KV * dim * 4
    return keys + slices + linear + exchange


def fits(dim: int, block_q: int, block_kv: int, ring: int) -> bool:
    """Whether this schedule serves these sizes: 64-key blocks, a ring of at least three
    buffers (the epilogue borrows three), within shared memory."""
    return (block_kv == BLOCK_KV and block_q % SLICE == 0 and ring >= 3
            and shared_bytes(dim, ring) + _STATIC_BYTES <= SHARED_MEMORY_BYTES)


def backward_dkdv_ws(dim: int, block_q: int, dtype: str, feature: str, layout: str,
                     scale: float, ring: int):
    """The hand-written dK/dV program (see the module docstring).

    Schedule knob (speed only): `ring`, the number of query-slice buffers the producer
    fills ahead of the two consumers.
    """
    if not fits(dim, block_q, BLOCK_KV, ring):
        raise ValueError(f"the warp-specialised dK/dV does not fit D={dim}, block_q={block_q},"
                         f" ring={ring} (it takes 64-key blocks and an even ring of at least "
                         "4 within shared memory)")
    dt = DTYPES[dtype]
    acc = T.float32
    block_kv = BLOCK_KV
    slices = block_q // SLICE
    batch, heads, lq, lk = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq"), T.dynamic("Lk")
    n_kv, width = T.dynamic("Nk"), T.dynamic("Wr")
    # LSE and delta come padded to a multiple of TMA_ROW_FLOATS rows (TMA's stride rule).
    lse_rows = T.dynamic("Lr")
    n_states = T.dynamic("Ns")
    scale_log2 = scale * LOG2E
    phi = feature_map_macro(feature)
    phi_vjp = feature_map_vjp_macro(feature)
    policy = T.GemmWarpPolicy.FullRow

    def slice_start(RLUT, b, h, j, t, last_query_block):
        """First query row of work item t (a slice of a reverse-LUT query block)."""
        query_block = T.max(T.min(RLUT[b, h, j, t // slices], last_query_block), 0)
        return query_block * block_q + (t % slices) * SLICE

    @T.macro
    def probabilities(scores, d_probs, lse_ring, delta_ring, buffer, first):
        """S^T -> P^T in place (0 on query rows past Lq), and dP^T -> dS^T in place."""
        for r, c in T.Parallel(block_kv, SLICE):
            scores[r, c] = T.if_then_else(
                first + c < lq,
                T.exp2(scores[r, c] * scale_log2 - lse_ring[buffer, c] * LOG2E), 0)
        for r, c in T.Parallel(block_kv, SLICE):
            d_probs[r, c] = scores[r, c] * (d_probs[r, c] - delta_ring[buffer, c])

    @T.macro
    def consumer(wg, RLUT, DZ_ROWS, DK, DV, k_s, v_s, q_ring, do_ring, lse_ring, delta_ring,
                 dh_s, exchange, full, empty, kv_full, linear_full, items, last_query_block,
                 state, b, h, j):
        scores = T.alloc_fragment([block_kv, SLICE], acc)
        d_probs = T.alloc_fragment([block_kv, SLICE], acc)
        p_op = T.alloc_fragment([block_kv, SLICE], dt)
        ds_op = T.alloc_fragment([block_kv, SLICE], dt)
        dk = T.alloc_fragment([block_kv, dim], acc)
        dv = T.alloc_fragment([block_kv, dim], acc)
        T.clear(dk)
        T.clear(dv)
        T.barrier_wait(kv_full, 0)
        mine = (items + 1 - wg) // 2  # this consumer's items: wg, wg + 2, ...
        for i in T.serial(mine):
            t = 2 * i + wg
            buffer = t % ring
            T.barrier_wait(full[buffer], (t // ring) & 1)
            T.wgmma_gemm(k_s, q_ring[buffer, :, :], scores, transpose_B=True,
                         clear_accum=True, policy=policy)
            T.wgmma_gemm(v_s, do_ring[buffer, :, :], d_probs, transpose_B=True,
                         clear_accum=True, policy=policy)
            T.wait_wgmma(0)
            probabilities(scores, d_probs, lse_ring, delta_ring, buffer,
                          slice_start(RLUT, b, h, j, t, last_query_block))
            T.copy(scores, p_op)
            T.copy(d_probs, ds_op)
            T.wgmma_gemm(p_op, do_ring[buffer, :, :], dv, policy=policy)
            T.wgmma_gemm(ds_op, q_ring[buffer, :, :], dk, policy=policy)
            T.wait_wgmma(0)
            T.barrier_arrive(empty[buffer])

        # Both loops are done (the Q ring is free for the exchange); then consumer 1 hands
        # over its dV and phi(K_j), forms the linear dK, and hands over its scaled dK plus
        # the linear dK; consumer 0 completes and stores both.
        # Borrowed ring buffers: do_ring[0] holds phi(K_j), [1] and [2] stage dV and dK.
        T.sync_threads(_EXCHANGE_BARRIER, 2 * 128)
        if wg == 1:
            keys = T.alloc_fragment([block_kv, dim], acc)
            row_a = T.alloc_fragment([block_kv], acc)
            row_b = T.alloc_fragment([block_kv], acc)
            T.copy(dv, exchange)
            T.copy(k_s, keys)
            phi(keys, row_a, row_b, block_kv, dim)
            for r, d in T.Parallel(block_kv, dim):  # phi is 0 on rows past Lk
                keys[r, d] = T.if_then_else(j * block_kv + r < lk, keys[r, d], 0)
            T.copy(keys, do_ring[0, :, :])
            T.sync_threads(_EXCHANGE_BARRIER, 2 * 128)
            T.barrier_wait(linear_full, 0)
            d_phi = T.alloc_fragment([block_kv, dim], acc)
            T.gemm(v_s, dh_s, d_phi, transpose_B=True, clear_accum=True, policy=policy)
            for r, d in T.Parallel(block_kv, dim):
                # dZ_j from global memory, once: no shared memory is left for it.
                d_phi[r, d] = d_phi[r, d] + DZ_ROWS[b, h, state, d]
            T.copy(k_s, keys)
            phi_vjp(keys, d_phi, row_a, row_b, block_kv, dim)
            for r, d in T.Parallel(block_kv, dim):
                d_phi[r, d] = dk[r, d] * scale + d_phi[r, d]
            T.sync_threads(_EXCHANGE_BARRIER, 2 * 128)  # consumer 0 has read the dV
            T.copy(d_phi, exchange)
            T.sync_threads(_EXCHANGE_BARRIER, 2 * 128)
        else:
            T.sync_threads(_EXCHANGE_BARRIER, 2 * 128)  # dV and phi(K_j) handed over
            for r, d in T.Parallel(block_kv, dim):
                dv[r, d] = dv[r, d] + exchange[r, d]
            T.barrier_wait(linear_full, 0)
            T.gemm(do_ring[0, :, :], dh_s, dv, policy=policy)
            T.copy(dv, do_ring[1, :, :])
            T.copy(do_ring[1, :, :], rows(DV, b, h, j * block_kv, block_kv, layout))
            T.sync_threads(_EXCHANGE_BARRIER, 2 * 128)
            T.sync_threads(_EXCHANGE_BARRIER, 2 * 128)  # the rest of dK handed over
            for r, d in T.Parallel(block_kv, dim):
                dk[r, d] = dk[r, d] * scale + exchange[r, d]
            T.copy(dk, do_ring[2, :, :])
            T.copy(do_ring[2, :, :], rows(DK, b, h, j * block_kv, block_kv, layout))

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
        with T.Kernel(T.ceildiv(lk, block_kv), heads, batch, threads=THREADS) as (bx, by, bz):
            k_s = T.alloc_shared([block_kv, dim], dt)
            v_s = T.alloc_shared([block_kv, dim], dt)
            q_ring = T.alloc_shared([ring, SLICE, dim], dt)
            do_ring = T.alloc_shared([ring, SLICE, dim], dt)
            lse_ring = T.alloc_shared([ring, SLICE], acc)
            delta_ring = T.alloc_shared([ring, SLICE], acc)
            dh_s = T.alloc_shared([dim, dim], dt)
            exchange = T.alloc_shared([block_kv, dim], acc)  # the consumers' float32 hand-over

            kv_full = T.alloc_barrier(arrive_count=128)
            linear_full = T.alloc_barrier(arrive_count=128)
            full = T.alloc_barrier(arrive_count=[128] * ring)
            empty = T.alloc_barrier(arrive_count=[128] * ring)

            tx = T.get_thread_binding()
            count = T.max(T.min(RCOUNT[bz, by, bx], width), 0)
            items = count * slices
            last_query_block = T.ceildiv(lq, block_q) - 1
            state = T.if_then_else(n_states == 1, 0, bx)

            if tx >= 256:
                # Producer: one elected thread issues each TMA; all 128 arrive.
                T.set_max_nreg(24, 0)
                T.tma_copy(rows(K, bz, by, bx * block_kv, block_kv, layout), k_s,
                           barrier=kv_full)
                T.tma_copy(rows(V, bz, by, bx * block_kv, block_kv, layout), v_s,
                           barrier=kv_full)
                T.barrier_arrive(kv_full)
                for t in T.serial(items):
                    buffer = t % ring
                    first = slice_start(RLUT, bz, by, bx, t, last_query_block)
                    T.barrier_wait(empty[buffer], ((t // ring) & 1) ^ 1)
                    T.tma_copy(rows(Q, bz, by, first, SLICE, layout), q_ring[buffer, :, :],
                               barrier=full[buffer])
                    T.tma_copy(rows(DO, bz, by, first, SLICE, layout), do_ring[buffer, :, :],
                               barrier=full[buffer])
                    T.tma_copy(LSE[bz, by, first:first + SLICE], lse_ring[buffer, :],
                               barrier=full[buffer])
                    T.tma_copy(DELTA[bz, by, first:first + SLICE], delta_ring[buffer, :],
                               barrier=full[buffer])
                    T.barrier_arrive(full[buffer])
                    if t == 0:
                        T.tma_copy(DH_ROWS[bz, by, state, :, :], dh_s, barrier=linear_full)
                        T.barrier_arrive(linear_full)
                if items == 0:
                    T.tma_copy(DH_ROWS[bz, by, state, :, :], dh_s, barrier=linear_full)
                    T.barrier_arrive(linear_full)
            elif tx < 128:
                T.set_max_nreg(240, 1)
                consumer(0, RLUT, DZ_ROWS, DK, DV, k_s, v_s, q_ring, do_ring, lse_ring,
                         delta_ring, dh_s, exchange, full, empty, kv_full, linear_full, items,
                         last_query_block, state, bz, by, bx)
            else:
                T.set_max_nreg(240, 1)
                consumer(1, RLUT, DZ_ROWS, DK, DV, k_s, v_s, q_ring, do_ring, lse_ring,
                         delta_ring, dh_s, exchange, full, empty, kv_full, linear_full, items,
                         last_query_block, state, bz, by, bx)

    return main
