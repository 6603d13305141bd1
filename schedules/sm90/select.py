"""Routing's selection in one kernel: each query block's critical and negligible key blocks.

One warp per row (batch, head, query block) of the block scores S (float32). The warp
first writes the row, as the scores' order-preserving 32-bit keys, to its row of shared
memory (zero past the row's end), so that the search reads each key with one shared load
and no index arithmetic. It finds the `Kc`-th largest key by a radix search (32 rounds of a
strided count and a warp sum), then writes every key block above it, and as many of those
equal to it as are needed, in ascending order (a ballot and a prefix count per 32 entries).
The negligible blocks are the `Kn` smallest of the rest, found the same way on the
reversed keys, with the critical blocks (remembered as one bit each in shared memory)
ruled out. The widths Kc >= 1 and Kn >= 0 of LUT and NEG_LUT are the counts. The variant
with a block map also writes each row's marginal blocks and whether it has any.

Ties at a threshold go to the lower block index; the reference breaks them by its sort.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

MAX_KEY_BLOCKS = 2048
"""Key blocks a row may have (the keys and the critical-block bitmap in shared memory are
sized for it: 32 KiB of keys a CTA, so that six CTAs fit an SM, as many as its registers
allow; sized for 4096, three did). Longer rows are the sort's (`plan.resolve_selection`):
2048 blocks of 64 keys are 131072 tokens."""
WARPS = 4
_WORDS = MAX_KEY_BLOCKS // 32


def _ordered(score):
    """The order-preserving unsigned key of a float32 score (larger score, larger key)."""
    bits = T.reinterpret(score, "uint32")
    return T.if_then_else(bits >> T.uint32(31) == T.uint32(1), bits ^ T.uint32(0xFFFFFFFF),
                          bits | T.uint32(0x80000000))


def top_bottom_select(block_map_dtype: str | None = None, float_map: bool = False,
                      dim: int | None = None, pooled_scores: bool = False,
                      z_rows: bool = False):
    """The selection program: SCORES (B, H, Mq, Nk) -> LUT, COUNT, NEG_LUT, NEG_COUNT.

    With `pooled_scores` it reads, in place of SCORES, the pooled blocks POOLED_Q
    (B, H, Mq, D) and POOLED_K (B, H, Nk, D), float32, D = `dim`, and makes
    each score itself (so no GEMM runs before it): the dot product of the two in ascending
    d, one fused multiply-add a term from zero.

    With `z_rows` (and `block_map_dtype`) it also reads the key blocks' Z_BLOCK
    (B, H, Nk, D) and their sum Z_TOTAL (B, H, D), float32, and writes each row's Z_i over
    its marginal blocks, Z_ROWS (B, H, Mq, D): Z_TOTAL less the row's critical blocks' z_j,
    then its negligible ones', each list in ascending order (a few dozen a row, where the
    marginal blocks are most of them), so that no GEMM of the block map with Z_BLOCK runs.

    With `block_map_dtype` ("bfloat16", "float16" or "float32") it also writes what the
    linear branch derives from the routing: MARGINAL (B, H, Mq, Nk), 1 where key block j is
    neither critical nor negligible for the row (the weights of the query blocks' H_i and
    Z_i sums, and transposed of the key blocks' dH_j, dZ_j), and ACTIVE (B, H, Mq) int32, 1
    where the row has a marginal block. With `float_map` as well, the same map in float32,
    MARGINAL_F32, for the float32 GEMM of Z_i (so that no cast of the map runs after).
    """
    if float_map and block_map_dtype is None:
        raise ValueError("float_map needs block_map_dtype (it is the block map's second copy)")
    if (pooled_scores or z_rows) and (dim is None or dim <= 0 or dim % 32):
        # A lane sums dims lane, lane + 32, ... of a row's Z_i.
        raise ValueError(f"pooled_scores and z_rows need dim, a positive multiple of 32; "
                         f"got {dim}")
    if z_rows and block_map_dtype is None:
        raise ValueError("z_rows needs block_map_dtype (Z_i is over the marginal blocks)")
    batch, heads, n_q, n_kv = T.dynamic("B"), T.dynamic("H"), T.dynamic("Mq"), T.dynamic("Nk")
    width, neg_width = T.dynamic("Kc"), T.dynamic("Kn")
    with_map = block_map_dtype is not None
    # A parameter annotated with None is a compile-time constant, not a kernel argument.
    map_tensor = T.Tensor([batch, heads, n_q, n_kv], block_map_dtype) if with_map else None
    active_tensor = T.Tensor([batch, heads, n_q], T.int32) if with_map else None
    float_map_tensor = T.Tensor([batch, heads, n_q, n_kv], T.float32) if float_map else None
    scores_tensor = None if pooled_scores else T.Tensor([batch, heads, n_q, n_kv], T.float32)
    pooled_q_tensor = T.Tensor([batch, heads, n_q, dim], T.float32) if pooled_scores else None
    pooled_k_tensor = T.Tensor([batch, heads, n_kv, dim], T.float32) if pooled_scores else None
    z_block_tensor = T.Tensor([batch, heads, n_kv, dim], T.float32) if z_rows else None
    z_total_tensor = T.Tensor([batch, heads, dim], T.float32) if z_rows else None
    z_rows_tensor = T.Tensor([batch, heads, n_q, dim], T.float32) if z_rows else None

    @T.macro
    def warp_sum(value):
        for step in T.unroll(5):
            value[0] = value[0] + T.shfl_xor(value[0], 16 >> step)

    def key_at(keys, warp, lane, m):
        """The lane's m-th key (of key block m * 32 + lane) in the warp's row."""
        return keys[warp, m * 32 + lane]

    @T.macro
    def load_keys(SCORES, POOLED_Q, POOLED_K, keys, b, h, row, warp, lane, score):
        """The warp's row of keys <- the ordered keys of the row's key blocks, 0 past its
        end (never counted: every candidate threshold has a bit set)."""
        for m in T.serial(T.ceildiv(n_kv, 32)):
            j = m * 32 + lane
            if pooled_scores:
                score[0] = T.float32(0)
                for d in T.serial(dim):
                    score[0] = score[0] + POOLED_Q[b, h, row, d] * POOLED_K[
                        b, h, T.min(j, n_kv - 1), d]
                keys[warp, j] = T.if_then_else(j < n_kv, _ordered(score[0]), T.uint32(0))
            else:
                keys[warp, j] = T.if_then_else(
                    j < n_kv, _ordered(SCORES[b, h, row, T.min(j, n_kv - 1)]), T.uint32(0))

    @T.macro
    def reverse_keys(keys, critical_bits, warp, lane):
        """For the negligible pass: the reversed keys, 0 for a critical block (never
        taken) and past the row's end."""
        for m in T.serial(T.ceildiv(n_kv, 32)):
            j = m * 32 + lane
            critical = (critical_bits[warp, m] >> T.Cast("uint32", lane)) & T.uint32(1)
            keys[warp, j] = T.if_then_else(T.Or(j >= n_kv, critical == T.uint32(1)),
                                           T.uint32(0), keys[warp, j] ^ T.uint32(0xFFFFFFFF))

    @T.macro
    def select(keys, OUT, COUNT_OUT, b, h, row, k, lane, taken_bits, warp, threshold,
               counter, position, equal_seen):
        """OUT[b, h, row, :k] <- the k key blocks of largest key (`keys`), ascending; the
        taken ones' bits to `taken_bits`."""
        chunks = T.ceildiv(n_kv, 32)
        threshold[0] = T.uint32(0)
        for bit in T.serial(32):
            candidate = threshold[0] | (T.uint32(1) << T.Cast("uint32", 31 - bit))
            counter[0] = 0
            for m in T.serial(chunks):
                counter[0] = counter[0] + T.Cast("int32", key_at(keys, warp, lane, m) >= candidate)
            warp_sum(counter)
            if counter[0] >= k:
                threshold[0] = candidate
        counter[0] = 0
        for m in T.serial(chunks):
            counter[0] = counter[0] + T.Cast("int32", key_at(keys, warp, lane, m) > threshold[0])
        warp_sum(counter)
        needed_equal = k - counter[0]  # the threshold's ties to take, lowest index first
        below = (T.uint32(1) << T.Cast("uint32", lane)) - T.uint32(1)
        position[0] = 0
        equal_seen[0] = 0
        for m in T.serial(chunks):
            j = m * 32 + lane
            key = key_at(keys, warp, lane, m)
            inside = j < n_kv
            equal = T.Cast("uint32", T.ballot(T.And(inside, key == threshold[0])))
            rank = equal_seen[0] + T.Cast("int32", T.popcount(equal & below))
            take = T.And(inside, T.Or(key > threshold[0],
                                      T.And(key == threshold[0], rank < needed_equal)))
            taken = T.Cast("uint32", T.ballot(take))
            if take:
                OUT[b, h, row, position[0] + T.Cast("int32", T.popcount(taken & below))] = j
            if lane == 0:
                taken_bits[warp, m] = taken
            position[0] = position[0] + T.Cast("int32", T.popcount(taken))
            equal_seen[0] = equal_seen[0] + T.Cast("int32", T.popcount(equal))
        if lane == 0:
            COUNT_OUT[b, h, row] = k

    @T.prim_func
    def main(
        SCORES: scores_tensor,
        POOLED_Q: pooled_q_tensor,
        POOLED_K: pooled_k_tensor,
        Z_BLOCK: z_block_tensor,
        Z_TOTAL: z_total_tensor,
        LUT: T.Tensor([batch, heads, n_q, width], T.int32),
        COUNT: T.Tensor([batch, heads, n_q], T.int32),
        NEG_LUT: T.Tensor([batch, heads, n_q, neg_width], T.int32),
        NEG_COUNT: T.Tensor([batch, heads, n_q], T.int32),
        MARGINAL: map_tensor,
        ACTIVE: active_tensor,
        MARGINAL_F32: float_map_tensor,
        Z_ROWS: z_rows_tensor,
    ):
        with T.Kernel(T.ceildiv(n_q, WARPS), heads, batch, threads=32 * WARPS) as (bx, by, bz):
            critical_bits = T.alloc_shared([WARPS, _WORDS], T.uint32)
            negligible_bits = T.alloc_shared([WARPS, _WORDS], T.uint32)
            threshold = T.alloc_local([1], T.uint32)
            counter = T.alloc_local([1], T.int32)
            position = T.alloc_local([1], T.int32)
            equal_seen = T.alloc_local([1], T.int32)
            score = T.alloc_local([1], T.float32) if pooled_scores else None
            z_sum = T.alloc_local([dim // 32], T.float32) if z_rows else None
            keys = T.alloc_shared([WARPS, MAX_KEY_BLOCKS], T.uint32)
            tx = T.get_thread_binding()
            lane = tx % 32
            warp = tx // 32
            row = bx * WARPS + warp
            if row < n_q:
                load_keys(SCORES, POOLED_Q, POOLED_K, keys, bz, by, row, warp, lane, score)
                select(keys, LUT, COUNT, bz, by, row, width, lane, critical_bits, warp,
                       threshold, counter, position, equal_seen)
                T.sync_warp()
                if neg_width > 0:
                    reverse_keys(keys, critical_bits, warp, lane)
                    select(keys, NEG_LUT, NEG_COUNT, bz, by, row, neg_width, lane,
                           negligible_bits, warp, threshold, counter, position, equal_seen)
                else:
                    if lane == 0:
                        NEG_COUNT[bz, by, row] = 0
                if with_map:
                    T.sync_warp()
                    for m in T.serial(T.ceildiv(n_kv, 32)):
                        j = m * 32 + lane
                        excluded = critical_bits[warp, m] | T.if_then_else(
                            neg_width > 0, negligible_bits[warp, m], T.uint32(0))
                        taken = (excluded >> T.Cast("uint32", lane)) & T.uint32(1) == T.uint32(1)
                        if j < n_kv:
                            MARGINAL[bz, by, row, j] = T.if_then_else(
                                taken, T.Cast(block_map_dtype, 0), T.Cast(block_map_dtype, 1))
                            if float_map:
                                MARGINAL_F32[bz, by, row, j] = T.if_then_else(
                                    taken, T.float32(0), T.float32(1))
                    if lane == 0:
                        ACTIVE[bz, by, row] = T.if_then_else(width + neg_width < n_kv, 1, 0)
                if z_rows:
                    # The row's lists, as this warp's lanes wrote them (ordered by the
                    # barrier); a lane sums dims lane, lane + 32, ...
                    T.sync_warp()
                    for e in T.unroll(dim // 32):
                        z_sum[e] = T.float32(0)
                    for t in T.serial(width):
                        for e in T.unroll(dim // 32):
                            z_sum[e] = z_sum[e] + Z_BLOCK[bz, by, LUT[bz, by, row, t],
                                                          e * 32 + lane]
                    for t in T.serial(neg_width):
                        for e in T.unroll(dim // 32):
                            z_sum[e] = z_sum[e] + Z_BLOCK[bz, by, NEG_LUT[bz, by, row, t],
                                                          e * 32 + lane]
                    for e in T.unroll(dim // 32):
                        Z_ROWS[bz, by, row, e * 32 + lane] = (Z_TOTAL[bz, by, e * 32 + lane]
                                                              - z_sum[e])

    return main
