"""The backward's key-major view of a routing in one kernel.

For each key block j: the query blocks whose LUT lists j (ascending) and how many, the
reverse LUT that dK/dV walks; for each query block, whether its linear branch is on (the
flags the query pass reads); with a block map, also the marginal map (1 where key block j
is in neither list of query block i), which the key blocks' linear-branch states weigh by.
It takes over the torch ops of `sla_tl.routing.reverse_lut`, `active_flags` and
`marginal_map` and writes the same values: the entries of a row past its count, or outside
[0, Nk), are left out; a block listed twice counts once; REVERSE is 0 past each key block's
count.

One CTA per `CHUNK` key blocks of a (batch, head), a warp per key block. The CTA scans its
head's whole LUT (B * H * Mq * Kc entries are few: 25 KB a head at the Wan2.1-1.3B shape,
from L2) and marks, in a byte map in shared memory, the (key block, query block) pairs of
its key blocks; after a CTA barrier each warp reads its key block's row of the map, 32
query blocks a ballot, and writes the critical ones at their rank; then the CTA writes its
key blocks' columns of the marginal map, row by row. Spreading the key blocks
over CTAs is what keeps it short: one CTA per head (12 CTAs at B=1, H=12) took 0.27 ms on
the H200, latency-bound.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

THREADS = 512
CHUNK = THREADS // 32
"""Key blocks a CTA serves: one per warp."""
MAX_QUERY_BLOCKS = 4096
"""Query blocks a head may have (the byte maps in shared memory are sized for it)."""
_MAP_ROW = MAX_QUERY_BLOCKS + 4
"""Bytes a key block's row of a byte map takes in shared memory: 4 past a multiple of the
banks' 128 bytes, so that the map's writers, reading one query block of CHUNK rows, read
CHUNK banks."""
_UNROLL = 4
"""Query-block chunks of 32 a warp reads before it counts them."""


def key_major(block_map_dtype: str | None = None, float_map: bool = False):
    """The program: LUT (B, H, Mq, Kc), COUNT (B, H, Mq) -> REVERSE (B, H, Nk, Mq) and
    RCOUNT (B, H, Nk), int32; and ACTIVE (B, H, Mq) int32, 1 for every row (the linear
    branch over all blocks). Mq may be at most `MAX_QUERY_BLOCKS`.

    With `block_map_dtype` ("bfloat16", "float16" or "float32", the linear branch over the
    marginal blocks) it also reads NEG_LUT (B, H, Mq, Kn) and NEG_COUNT and writes MARGINAL
    (B, H, Mq, Nk) in that dtype, and ACTIVE is 1 where COUNT + NEG_COUNT < Nk (the row has
    a marginal block), else 0. With `float_map` as well, the same map in float32,
    MARGINAL_F32, for the float32 GEMM of the key blocks' dZ_j (so that no cast runs after).
    """
    if float_map and block_map_dtype is None:
        raise ValueError("float_map needs block_map_dtype (it is the block map's second copy)")
    batch, heads, n_q, n_kv = T.dynamic("B"), T.dynamic("H"), T.dynamic("Mq"), T.dynamic("Nk")
    width, neg_width = T.dynamic("Kc"), T.dynamic("Kn")
    with_map = block_map_dtype is not None
    # A parameter annotated with None is a compile-time constant, not a kernel argument.
    neg_lut = T.Tensor([batch, heads, n_q, neg_width], T.int32) if with_map else None
    neg_count = T.Tensor([batch, heads, n_q], T.int32) if with_map else None
    marginal_map = T.Tensor([batch, heads, n_q, n_kv], block_map_dtype) if with_map else None
    float_map_tensor = T.Tensor([batch, heads, n_q, n_kv], T.float32) if float_map else None

    @T.macro
    def mark(LISTS, COUNTS, MAP, b, h, first, tx, list_width):
        """MAP[j - first, i] <- 1 for each counted entry j of row i of LISTS within this
        CTA's key blocks [first, first + CHUNK) and [0, Nk)."""
        for n in T.serial(T.ceildiv(n_q * list_width, THREADS)):
            flat = n * THREADS + tx
            if flat < n_q * list_width:
                row = flat // list_width
                if flat % list_width < COUNTS[b, h, row]:
                    j = LISTS[b, h, row, flat % list_width]
                    if j >= first and j < T.min(first + CHUNK, n_kv):
                        MAP[j - first, row] = T.uint8(1)

    @T.macro
    def zero(MAP, tx):
        for n in T.serial(T.ceildiv(CHUNK * n_q, THREADS)):
            flat = n * THREADS + tx
            if flat < CHUNK * n_q:
                MAP[flat // n_q, flat % n_q] = T.uint8(0)

    @T.prim_func
    def main(
        LUT: T.Tensor([batch, heads, n_q, width], T.int32),
        COUNT: T.Tensor([batch, heads, n_q], T.int32),
        NEG_LUT: neg_lut,
        NEG_COUNT: neg_count,
        REVERSE: T.Tensor([batch, heads, n_kv, n_q], T.int32),
        RCOUNT: T.Tensor([batch, heads, n_kv], T.int32),
        MARGINAL: marginal_map,
        ACTIVE: T.Tensor([batch, heads, n_q], T.int32),
        MARGINAL_F32: float_map_tensor,
    ):
        with T.Kernel(T.ceildiv(n_kv, CHUNK), heads, batch, threads=THREADS) as (bx, by, bz):
            critical = T.alloc_shared([CHUNK, _MAP_ROW], T.uint8)
            negligible = T.alloc_shared([CHUNK, _MAP_ROW], T.uint8) if with_map else None
            position = T.alloc_local([1], T.int32)
            tx = T.get_thread_binding()
            lane = tx % 32
            warp = tx // 32
            first = bx * CHUNK
            zero(critical, tx)
            if with_map:
                zero(negligible, tx)
            if bx == 0:  # the rows' flags, once a head
                for n in T.serial(T.ceildiv(n_q, THREADS)):
                    row = n * THREADS + tx
                    if row < n_q:
                        if with_map:
                            ACTIVE[bz, by, row] = T.if_then_else(
                                COUNT[bz, by, row] + NEG_COUNT[bz, by, row] < n_kv, 1, 0)
                        else:
                            ACTIVE[bz, by, row] = 1
            T.sync_threads()
            mark(LUT, COUNT, critical, bz, by, first, tx, width)
            if with_map:
                mark(NEG_LUT, NEG_COUNT, negligible, bz, by, first, tx, neg_width)
            T.sync_threads()
            below = (T.uint32(1) << T.Cast("uint32", lane)) - T.uint32(1)
            j = first + warp
            if j < n_kv:
                position[0] = 0
                for m in T.serial(T.ceildiv(n_q, 32 * _UNROLL)):
                    for u in T.unroll(_UNROLL):
                        i = (m * _UNROLL + u) * 32 + lane
                        listed = T.And(i < n_q, critical[warp, T.min(i, n_q - 1)] == T.uint8(1))
                        taken = T.Cast("uint32", T.ballot(listed))
                        if listed:
                            REVERSE[bz, by, j, position[0] + T.Cast(
                                "int32", T.popcount(taken & below))] = i
                        position[0] = position[0] + T.Cast("int32", T.popcount(taken))
                for m in T.serial(T.ceildiv(n_q, 32)):
                    slot = m * 32 + lane
                    if slot >= position[0] and slot < n_q:
                        REVERSE[bz, by, j, slot] = 0
                if lane == 0:
                    RCOUNT[bz, by, j] = position[0]
            if with_map:
                # The CTA's CHUNK columns of the map, a row's CHUNK entries by consecutive
                # threads: one write a sector (a warp per key block would write one entry a
                # sector, a query block a lane).
                for n in T.serial(T.ceildiv(n_q * CHUNK, THREADS)):
                    flat = n * THREADS + tx
                    i = flat // CHUNK
                    column = flat % CHUNK
                    if T.And(i < n_q, first + column < n_kv):
                        excluded = T.Or(critical[column, i] == T.uint8(1),
                                        negligible[column, i] == T.uint8(1))
                        MARGINAL[bz, by, i, first + column] = T.if_then_else(
                            excluded, T.Cast(block_map_dtype, 0), T.Cast(block_map_dtype, 1))
                        if float_map:
                            MARGINAL_F32[bz, by, i, first + column] = T.if_then_else(
                                excluded, T.float32(0), T.float32(1))

    return main
