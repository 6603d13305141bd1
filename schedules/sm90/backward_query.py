"""Backward, query side, no LUT loop: everything one query block needs from its own rows.

One CTA per (query block i, head, batch), with H_i and Z_i saved by the forward:

    dO_l  = dO W                               (projection's input gradient)
    delta = rowsum(dO * O_s), O_s = O - O_l W^T - b  ->  dO.(O - b) - dO_l.O_l
    den   = phi(Q) . Z_i + eps
    dnum  = dO_l / den,   dden = -(dO_l . O_l) / den      (0 on rows without marginal blocks)
    G_i   = phi(Q)^T dnum  (D x D),  g_i = phi(Q)^T dden  (D)   -> the key side's dH, dZ
    dQ_l  = phi'(Q)^T (dnum H_i^T + dden Z_i)                 -> DQ, completed by the dQ kernel

`ACTIVE[b, h, i]` is 1 where the query block has a marginal block.

The gated variant (a compile-time flag; the ungated kernel has no gate arguments) is for
O = O_s + g (O_l W^T + b), g float32 per query row: the linear branch's upstream gradient
is g dO, so dnum and dden are scaled by g per row; O_s = O - g (O_l W^T + b), so
delta = dO.O - g dg; and it writes dg = rowsum(dO * (O_l W^T + b)) = dO_l.O_l + dO.b.

Schedule knob `loads` (the order of the work only: every choice gives the same bits):
"staged" brings each tile from global memory through one staging buffer when it is needed,
each load a round trip that nothing overlaps; "tma" issues every tile's TMA copy at the
start into a buffer of its own (192 KiB at D=128) and waits for each just before its use,
so the loads overlap each other and the first GEMM. "tma" is the default: on the H200 at
the Wan2.1-1.3B shape it takes 0.350 ms against staged's 0.571 ms
(`python -m sla_tl.benchmarks.query_pass_variants`).
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T
from tilelang.layout import make_swizzled_layout

from ..common import DTYPES, LINEAR_EPS, rows, seq_shape
from ..feature_maps import feature_map_vjp_macro, linear_rows_macro

LOADS = ("staged", "tma")


def default_schedule() -> dict:
    """The knobs the query pass is built with unless a schedule says otherwise."""
    return dict(loads="tma")


def search_space() -> dict[str, tuple]:
    """The autotuner's choices: both ways of loading (they give the same bits)."""
    return dict(loads=LOADS)


def backward_query(dim: int, block_q: int, dtype: str, feature: str, layout: str, threads: int,
                   loads: str, gated: bool = False):
    """The query-side backward program for one combination of compile-time settings;
    `loads` is the schedule knob above; `gated` adds the GATE input and the DGATE output,
    float32 (B, H, Lq)."""
    if loads not in LOADS:
        raise ValueError(f"loads must be one of {LOADS}, got {loads!r}")
    tma = loads == "tma"
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, lq = T.dynamic("B"), T.dynamic("H"), T.dynamic("Lq")
    n_q, n_saved = T.dynamic("Mq"), T.dynamic("Ns")
    linear_rows = linear_rows_macro(feature)
    phi_vjp = feature_map_vjp_macro(feature)
    # A parameter annotated with None is a compile-time constant, not a kernel argument.
    # Each annotation is a buffer of its own: one object for two parameters would alias them.
    gate_in = T.Tensor([batch, heads, lq], acc) if gated else None
    gate_grad = T.Tensor([batch, heads, lq], acc) if gated else None

    @T.prim_func
    def main(
        Q: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        DO: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        OUT: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        O_LIN: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        W: T.Tensor([dim, dim], dt),
        BIAS: T.Tensor([dim], acc),
        GATE: gate_in,
        H_ROWS: T.Tensor([batch, heads, n_saved, dim, dim], dt),
        Z_ROWS: T.Tensor([batch, heads, n_saved, dim], acc),
        ACTIVE: T.Tensor([batch, heads, n_q], T.int32),
        DELTA: T.Tensor([batch, heads, lq], acc),
        G_ROWS: T.Tensor([batch, heads, n_q, dim, dim], dt),
        GZ_ROWS: T.Tensor([batch, heads, n_q, dim], acc),
        DQ: T.Tensor(seq_shape(batch, heads, lq, dim, layout), dt),
        DGATE: gate_grad,
    ):
        with T.Kernel(T.ceildiv(lq, block_q), heads, batch, threads=threads) as (bx, by, bz):
            # A saved state per query block in "marginal" mode, one total in "global".
            state = T.if_then_else(n_saved == 1, 0, bx)
            do_s = T.alloc_shared([block_q, dim], dt)
            w_s = T.alloc_shared([dim, dim], dt)
            h_s = T.alloc_shared([dim, dim], dt)
            z_s = T.alloc_shared([dim], acc)
            phi_s = T.alloc_shared([block_q, dim], dt)
            dnum_s = T.alloc_shared([block_q, dim], dt)
            # Tiles from global memory land in shared memory first: whole rows, coalesced,
            # rather than element loads in a GEMM fragment's layout. Staged, one buffer takes
            # them in turn; with TMA each has its own, filled from the start.
            if tma:
                o_lin_s = T.alloc_shared([block_q, dim], dt)
                out_s = T.alloc_shared([block_q, dim], dt)
                q_s = T.alloc_shared([block_q, dim], dt)
                # Swizzled, so that reading a tile in a fragment's layout (8 rows of 256
                # bytes at once) does not hit one bank 8 times; TMA writes it so.
                T.annotate_layout({b: make_swizzled_layout(b) for b in (o_lin_s, out_s, q_s)})
            else:
                stage_s = T.alloc_shared([block_q, dim], dt)
                o_lin_s = out_s = q_s = stage_s
            d_lin = T.alloc_fragment([block_q, dim], acc)
            work = T.alloc_fragment([block_q, dim], acc)
            dots = T.alloc_fragment([block_q], acc)
            delta = T.alloc_fragment([block_q], acc)
            den = T.alloc_fragment([block_q], acc)
            dden = T.alloc_fragment([block_q], acc)
            row_a = T.alloc_fragment([block_q], acc)
            row_b = T.alloc_fragment([block_q], acc)
            g_col = T.alloc_fragment([dim], acc)
            # Column sums need a fragment whose layout no GEMM fixes; dden reaches it
            # through shared memory.
            dden_s = T.alloc_shared([block_q], acc)
            col_work = T.alloc_fragment([block_q, dim], acc)
            g_block = T.alloc_fragment([dim, dim], acc)

            active = ACTIVE[bz, by, bx]
            if tma:
                # One barrier per use, each waited once (phase 0).
                first_full = T.alloc_barrier(arrive_count=threads)
                o_lin_full = T.alloc_barrier(arrive_count=threads)
                out_full = T.alloc_barrier(arrive_count=threads)
                q_full = T.alloc_barrier(arrive_count=threads)
                T.tma_copy(rows(DO, bz, by, bx * block_q, block_q, layout), do_s,
                           barrier=first_full)
                T.tma_copy(W[:, :], w_s, barrier=first_full)
                T.tma_copy(H_ROWS[bz, by, state, :, :], h_s, barrier=first_full)
                T.tma_copy(Z_ROWS[bz, by, state, :], z_s, barrier=first_full)
                T.barrier_arrive(first_full)
                for tile, buffer, barrier in ((O_LIN, o_lin_s, o_lin_full),
                                              (OUT, out_s, out_full), (Q, q_s, q_full)):
                    T.tma_copy(rows(tile, bz, by, bx * block_q, block_q, layout), buffer,
                               barrier=barrier)
                    T.barrier_arrive(barrier)
                T.barrier_wait(first_full, 0)
            else:
                T.copy(rows(DO, bz, by, bx * block_q, block_q, layout), do_s)
                T.copy(W, w_s)
                T.copy(H_ROWS[bz, by, state, :, :], h_s)
                T.copy(Z_ROWS[bz, by, state, :], z_s)
            T.gemm(do_s, w_s, d_lin, clear_accum=True, policy=T.GemmWarpPolicy.FullRow)

            # dots = dO_l . O_l ; delta = dO . (O - b) - dots
            if tma:
                T.barrier_wait(o_lin_full, 0)
            else:
                T.copy(rows(O_LIN, bz, by, bx * block_q, block_q, layout), stage_s)
            T.copy(o_lin_s, work)
            for i, d in T.Parallel(block_q, dim):
                work[i, d] = work[i, d] * d_lin[i, d]
            T.reduce_sum(work, dots, dim=1)
            if gated:
                # dg = dots + dO . b ; delta = dO . O - g dg
                gate_rows = T.alloc_fragment([block_q], acc)
                d_gate = T.alloc_fragment([block_q], acc)
                T.copy(GATE[bz, by, bx * block_q:(bx + 1) * block_q], gate_rows)
                for i, d in T.Parallel(block_q, dim):
                    work[i, d] = BIAS[d] * do_s[i, d]
                T.reduce_sum(work, d_gate, dim=1)
                for i in T.Parallel(block_q):
                    d_gate[i] = d_gate[i] + dots[i]
                T.copy(d_gate, DGATE[bz, by, bx * block_q:(bx + 1) * block_q])
                if tma:
                    T.barrier_wait(out_full, 0)
                else:
                    T.copy(rows(OUT, bz, by, bx * block_q, block_q, layout), stage_s)
                T.copy(out_s, work)
                for i, d in T.Parallel(block_q, dim):
                    work[i, d] = work[i, d] * do_s[i, d]
                T.reduce_sum(work, delta, dim=1)
                for i in T.Parallel(block_q):
                    delta[i] = delta[i] - gate_rows[i] * d_gate[i]
                    # From here on dots is the linear branch's share: g dO_l . O_l.
                    dots[i] = gate_rows[i] * dots[i]
            else:
                if tma:
                    T.barrier_wait(out_full, 0)
                else:
                    T.copy(rows(OUT, bz, by, bx * block_q, block_q, layout), stage_s)
                T.copy(out_s, work)
                for i, d in T.Parallel(block_q, dim):
                    work[i, d] = (work[i, d] - BIAS[d]) * do_s[i, d]
                T.reduce_sum(work, delta, dim=1)
                for i in T.Parallel(block_q):
                    delta[i] = delta[i] - dots[i]
            T.copy(delta, DELTA[bz, by, bx * block_q:(bx + 1) * block_q])

            # phi(Q), the denominators, dnum (in d_lin) and dden.
            if tma:
                T.barrier_wait(q_full, 0)
            else:
                T.copy(rows(Q, bz, by, bx * block_q, block_q, layout), stage_s)
            linear_rows(q_s, work, phi_s, z_s, den, row_a, row_b, block_q, dim)
            # One reciprocal per row: a per-element division compiles to an IEEE division
            # call. `den` holds 1 / (phi(Q) . Z_i + eps) from here on.
            for i in T.Parallel(block_q):
                den[i] = 1.0 / (den[i] + LINEAR_EPS)
                dden[i] = T.if_then_else(active > 0, -dots[i] * den[i], 0)
            if gated:
                for i in T.Parallel(block_q):
                    den[i] = den[i] * gate_rows[i]
            for i, d in T.Parallel(block_q, dim):
                d_lin[i, d] = T.if_then_else(active > 0, d_lin[i, d] * den[i], 0)
            T.copy(d_lin, dnum_s)

            # g_i = phi(Q)^T dden, G_i = phi(Q)^T dnum.
            T.copy(dden, dden_s)
            for i, d in T.Parallel(block_q, dim):
                col_work[i, d] = phi_s[i, d] * dden_s[i]
            T.reduce_sum(col_work, g_col, dim=0)
            T.copy(g_col, GZ_ROWS[bz, by, bx, :])
            T.gemm(phi_s, dnum_s, g_block, transpose_A=True, clear_accum=True)
            T.copy(g_block, G_ROWS[bz, by, bx, :, :])

            # dQ_l = phi'(Q)^T (dnum H_i^T + dden Z_i), with `work` reloaded as raw Q.
            T.gemm(dnum_s, h_s, d_lin, transpose_B=True, clear_accum=True,
                   policy=T.GemmWarpPolicy.FullRow)
            for i, d in T.Parallel(block_q, dim):
                d_lin[i, d] = d_lin[i, d] + dden[i] * z_s[d]
            if not tma:  # with TMA, Q's tile is still in its own buffer
                T.copy(rows(Q, bz, by, bx * block_q, block_q, layout), stage_s)
            T.copy(q_s, work)
            phi_vjp(work, d_lin, row_a, row_b, block_q, dim)
            T.copy(d_lin, rows(DQ, bz, by, bx * block_q, block_q, layout))

    return main
