"""Mean pooling of a sequence over blocks of rows (float32), for routing's block scores.

One CTA per (group of blocks, head, batch); a partial last block is averaged over the
rows it has.
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, rows, seq_shape


def mean_pool(dim: int, block: int, dtype: str, layout: str, group: int = 8, threads: int = 128):
    """The pooling program: X (B, H, L, D) -> POOLED (B, H, ceil(L / block), D) float32."""
    dt = DTYPES[dtype]
    acc = T.float32
    batch, heads, length, n_blocks = T.dynamic("B"), T.dynamic("H"), T.dynamic("L"), T.dynamic("N")

    @T.prim_func
    def main(
        X: T.Tensor(seq_shape(batch, heads, length, dim, layout), dt),
        POOLED: T.Tensor([batch, heads, n_blocks, dim], acc),
    ):
        with T.Kernel(T.ceildiv(n_blocks, group), heads, batch, threads=threads) as (bx, by, bz):
            x_s = T.alloc_shared([block, dim], dt)
            col = T.alloc_fragment([dim], acc)
            first = bx * group
            for t in T.Pipelined(T.min(group, n_blocks - first), num_stages=2):
                j = first + t
                T.copy(rows(X, bz, by, j * block, block, layout), x_s)
                # Column sums as serial per-thread sums over the rows: no cross-thread
                # reduction rounds.
                T.clear(col)
                for r in T.serial(block):
                    for d in T.Parallel(dim):
                        col[d] += x_s[r, d]
                for d in T.Parallel(dim):
                    POOLED[bz, by, j, d] = col[d] / T.min(block, length - j * block)

    return main
