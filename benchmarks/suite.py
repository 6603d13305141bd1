"""What `sla-tl bench` measures: attention shapes, sparsities and the cases they make.

Sparsity is the share of key blocks the sparse branch skips: a case at sparsity s runs
SLA with `topk = 1 - s` (k_low 0, so every other block goes to the linear branch).
"""

from __future__ import annotations

from dataclasses import dataclass

from sla_tl import spec

MODES: tuple[str, ...] = ("fwd", "fwd+bwd")
MODE_NAMES = {"fwd": "forward", "fwd+bwd": "forward+backward"}


@dataclass(frozen=True)
class Shape:
    """An attention shape, named after the model or benchmark it comes from."""

    label: str
    batch: int
    heads: int
    length: int
    dim: int
    dtype: str = "bfloat16"

    def describe(self) -> str:
        """"B=1 H=12 L=32760 D=128 bf16" for tables and messages."""
        short = {"bfloat16": "bf16", "float16": "fp16"}.get(self.dtype, self.dtype)
        return f"B={self.batch} H={self.heads} L={self.length} D={self.dim} {short}"

    def dense_flops(self, mode: str) -> float:
        """FLOPs of dense attention: 4*B*H*L^2*D forward; forward+backward is 3.5x that
        (the backward's five GEMMs of the same size, counted as in FlashAttention)."""
        forward = 4.0 * self.batch * self.heads * self.length**2 * self.dim
        return forward if mode == "fwd" else 3.5 * forward


@dataclass(frozen=True)
class Case:
    """One shape at one sparsity, with the SLA block sizes it runs with."""

    shape: Shape
    sparsity: float
    block_q: int = 128
    block_kv: int = 64

    @property
    def topk(self) -> float:
        """The topk that gives this sparsity (rounded: 1 - 0.95 is not exactly 0.05)."""
        return round(1.0 - self.sparsity, 6)

    @property
    def density(self) -> float:
        """Share of key blocks the sparse branch computes, after rounding to whole blocks."""
        n_kv = spec.num_blocks(self.shape.length, self.block_kv)
        return spec.num_critical(self.topk, n_kv) / n_kv


# Wan2.1 makes 1560 tokens per latent frame at 480p and 3600 at 720p; 81 video frames are
# 21 latent frames.
WAN_1_3B = Shape("wan2.1-1.3b-480p", 1, 12, 32760, 128)
WAN_14B = Shape("wan2.1-14b-720p", 1, 40, 75600, 128)
THU_SLA = Shape("thu-sla-bench", 2, 16, 32760, 128)
# The 1.3B model's width (1536) split into heads of 64.
WAN_1_3B_D64 = Shape("wan2.1-1.3b-480p-d64", 1, 24, 32760, 64)

SHAPES = (WAN_1_3B, WAN_14B, THU_SLA, WAN_1_3B_D64)
SPARSITIES = (0.80, 0.85, 0.90, 0.95, 0.97)
DEFAULT_SPARSITY = 0.95
# Wan2.1-1.3B's heads at 6, 11, 21 and 31 latent frames of 480p video, and at 720p.
LENGTHS = (9360, 17160, 32760, 48360, 75600)

SECTIONS = ("shapes", "sparsity", "length")


def section_cases(section: str) -> list[Case]:
    """The cases of one section of the suite."""
    if section == "shapes":
        return [Case(shape, DEFAULT_SPARSITY) for shape in SHAPES]
    if section == "sparsity":
        return [Case(WAN_1_3B, s) for s in SPARSITIES]
    if section == "length":
        return [Case(length_shape(n), DEFAULT_SPARSITY) for n in LENGTHS]
    raise ValueError(f"unknown section {section!r}; expected one of {', '.join(SECTIONS)}")


def length_shape(length: int) -> Shape:
    """Wan2.1-1.3B's heads at another token count (the suite's shape where it has one)."""
    if length == WAN_1_3B.length:
        return WAN_1_3B
    return Shape(f"wan2.1-1.3b-L{length}", 1, 12, length, 128)


def cases_of(sections: list[str]) -> list[Case]:
    """The distinct cases of the sections named, in order."""
    return list(dict.fromkeys(case for s in sections for case in section_cases(s)))
