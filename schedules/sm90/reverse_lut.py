"""The backward's key-major view of a routing in one kernel.

For each key block j: the query blocks whose LUT lists j (ascending) and how many, the
reverse LUT that dK/dV walks; for each query block, whether its linear branch is on (the
flags the query pass reads); with a block map, also the marginal map (1 where key block j
is in neither list of query block i), which the key blocks' linear-branch states weigh by.
It takes over the torch ops of `sla_tl.routing.reverse_lut`, `active_flags` and
`marginal_map` and writes the same values: the entries of a row past its count, or outside
[0, Nk), are left out; a block listed twice counts once; REVERSE is 0 past each key block's
count.

One CTA per (batch, head), in three phases separated by CTA barriers (a barrier orders
the block's global-memory accesses too): it zeroes two byte maps (B, H, Nk, Mq) in global
memory (scratch the caller allocates), marks in them the (key block, query block) pairs
the two LUTs list, then gives each warp key blocks in turn: 32 query blocks a ballot, the
critical ones written at their rank. A row's LUT is short (Kc entries), so marking is a
scatter of B * H * Mq * Kc bytes, and every read after it is coalesced along the query
blocks.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

THREADS = 512
_WARPS = THREADS // 32
_UNROLL = 4
"""Query-block chunks of 32 a warp loads before it counts them (loads in flight)."""


def key_major(block_map_dtype: str | None = None):
    """The program: LUT (B, H, Mq, Kc), COUNT (B, H, Mq) -> REVERSE (B, H, Nk, Mq) and
    RCOUNT (B, H, Nk), int32, through the byte map CRITICAL (B, H, Nk, Mq); and ACTIVE
    (B, H, Mq) int32, 1 for every row (the linear branch over all blocks).

    With `block_map_dtype` ("bfloat16", "float16" or "float32", the linear branch over the
    marginal blocks) it also reads NEG_LUT (B, H, Mq, Kn) and NEG_COUNT and writes MARGINAL
    (B, H, Mq, Nk) in that dtype, through a second byte map NEGLIGIBLE (B, H, Nk, Mq), and
    ACTIVE is 1 where COUNT + NEG_COUNT < Nk (the row has a marginal block), else 0.
    """
    batch, heads, n_q, n_kv = T.dynamic("B"), T.dynamic("H"), T.dynamic("Mq"), T.dynamic("Nk")
    width, neg_width = T.dynamic("Kc"), T.dynamic("Kn")
    with_map = block_map_dtype is not None
    # A parameter annotated with None is a compile-time constant, not a kernel argument.
    neg_lut = T.Tensor([batch, heads, n_q, neg_width], T.int32) if with_map else None
    neg_count = T.Tensor([batch, heads, n_q], T.int32) if with_map else None
    negligible_map = T.Tensor([batch, heads, n_kv, n_q], T.uint8) if with_map else None
    marginal_map = T.Tensor([batch, heads, n_q, n_kv], block_map_dtype) if with_map else None

    @T.macro
    def mark(LISTS, COUNTS, MAP, b, h, tx, list_width):
        """MAP[b, h, j, i] <- 1 for each counted entry j in [0, Nk) of row i of LISTS."""
        for n in T.serial(T.ceildiv(n_q * list_width, THREADS)):
            flat = n * THREADS + tx
            if flat < n_q * list_width:
                row = flat // list_width
                if flat % list_width < COUNTS[b, h, row]:
                    j = LISTS[b, h, row, flat % list_width]
                    if j >= 0 and j < n_kv:
                        MAP[b, h, j, row] = T.uint8(1)

    @T.prim_func
    def main(
        LUT: T.Tensor([batch, heads, n_q, width], T.int32),
        COUNT: T.Tensor([batch, heads, n_q], T.int32),
        NEG_LUT: neg_lut,
        NEG_COUNT: neg_count,
        CRITICAL: T.Tensor([batch, heads, n_kv, n_q], T.uint8),
        NEGLIGIBLE: negligible_map,
        REVERSE: T.Tensor([batch, heads, n_kv, n_q], T.int32),
        RCOUNT: T.Tensor([batch, heads, n_kv], T.int32),
        MARGINAL: marginal_map,
        ACTIVE: T.Tensor([batch, heads, n_q], T.int32),
    ):
        with T.Kernel(heads, batch, threads=THREADS) as (by, bz):
            position = T.alloc_local([1], T.int32)
            tx = T.get_thread_binding()
            lane = tx % 32
            warp = tx // 32
            for n in T.serial(T.ceildiv(n_kv * n_q, THREADS)):
                flat = n * THREADS + tx
                if flat < n_kv * n_q:
                    CRITICAL[bz, by, flat // n_q, flat % n_q] = T.uint8(0)
                    if with_map:
                        NEGLIGIBLE[bz, by, flat // n_q, flat % n_q] = T.uint8(0)
            for n in T.serial(T.ceildiv(n_q, THREADS)):
                row = n * THREADS + tx
                if row < n_q:
                    if with_map:
                        ACTIVE[bz, by, row] = T.if_then_else(
                            COUNT[bz, by, row] + NEG_COUNT[bz, by, row] < n_kv, 1, 0)
                    else:
                        ACTIVE[bz, by, row] = 1
            T.sync_threads()
            mark(LUT, COUNT, CRITICAL, bz, by, tx, width)
            if with_map:
                mark(NEG_LUT, NEG_COUNT, NEGLIGIBLE, bz, by, tx, neg_width)
            T.sync_threads()
            below = (T.uint32(1) << T.Cast("uint32", lane)) - T.uint32(1)
            for c in T.serial(T.ceildiv(n_kv, _WARPS)):
                j = c * _WARPS + warp
                if j < n_kv:
                    position[0] = 0
                    for m in T.serial(T.ceildiv(n_q, 32 * _UNROLL)):
                        for u in T.unroll(_UNROLL):
                            i = (m * _UNROLL + u) * 32 + lane
                            listed = T.And(i < n_q,
                                           CRITICAL[bz, by, j, T.min(i, n_q - 1)] == T.uint8(1))
                            taken = T.Cast("uint32", T.ballot(listed))
                            if listed:
                                REVERSE[bz, by, j, position[0] + T.Cast(
                                    "int32", T.popcount(taken & below))] = i
                            if with_map:
                                if i < n_q:
                                    MARGINAL[bz, by, i, j] = T.if_then_else(
                                        T.Or(listed, NEGLIGIBLE[bz, by, j, i] == T.uint8(1)),
                                        T.Cast(block_map_dtype, 0), T.Cast(block_map_dtype, 1))
                            position[0] = position[0] + T.Cast("int32", T.popcount(taken))
                    for m in T.serial(T.ceildiv(n_q, 32)):
                        slot = m * 32 + lane
                        if slot >= position[0] and slot < n_q:
                            REVERSE[bz, by, j, slot] = 0
                    if lane == 0:
                        RCOUNT[bz, by, j] = position[0]

    return main
