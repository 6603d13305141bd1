"""Mean pooling of a sequence over blocks of rows (float32), for routing's block scores.

One CTA per (group of blocks, head, batch); a partial last block is averaged over the
rows it has. Each block's column sums are one GEMM with a column of ones on the tensor cores
(as the key pass takes its own, `key_pass.SUMS`), in place of a chain of shared loads and
adds per thread; on the H200 both took the same time, bound by the loads of X
(benchmarks/NOTES.md).
"""

# No `from __future__ import annotations`: TileLang evaluates the T.Tensor annotations
# of a prim_func against the builder's local variables.
import tilelang.language as T

from ..common import DTYPES, rows, seq_shape
from .key_pass import SUM_COLUMNS


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
            ones_s = T.alloc_shared([SUM_COLUMNS, block], dt)  # K-major, as wgmma reads B
            sums = T.alloc_fragment([dim, SUM_COLUMNS], acc)
            T.fill(ones_s, 1)
            first = bx * group
            for t in T.Pipelined(T.min(group, n_blocks - first), num_stages=2):
                j = first + t
                T.copy(rows(X, bz, by, j * block, block, layout), x_s)
                # Column sums on the tensor cores: X_j^T times a column of ones (rows past
                # L are zeros, TMA fills them).
                T.gemm(x_s, ones_s, sums, transpose_A=True, transpose_B=True, clear_accum=True)
                for d, c in T.Parallel(dim, SUM_COLUMNS):
                    if c == 0:
                        POOLED[bz, by, j, d] = sums[d, c] / T.min(block, length - j * block)

    return main
