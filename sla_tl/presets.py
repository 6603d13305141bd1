"""Named presets: the algorithm settings of each published SLA variant.

A preset fixes what changes the numbers besides topk and the feature map: which blocks the
linear branch covers, the negligible share, the block sizes, and the tensor layout.
`SparseLinearAttention(..., preset=NAME)` and the diffusers integration take them by name.
"""

from __future__ import annotations

from typing import NamedTuple

from .validation import check_choice


class Preset(NamedTuple):
    """The settings of one published variant, and where they come from."""

    linear: str
    """"global": linear branch over all key blocks; "marginal": over the non-critical,
    non-negligible ones."""
    k_low: float
    """Share of key blocks that is negligible (skipped)."""
    block_q: int
    block_kv: int
    layout: str
    """"bhsd" for (B, H, L, D) tensors, "bshd" for (B, L, H, D)."""
    source: str
    """The variant it reproduces."""


PRESETS: dict[str, Preset] = {
    "thu-ml": Preset("global", 0.0, 64, 64, "bhsd",
                     "thu-ml/SLA branch main, `sparse_linear_attention.SparseLinearAttention`"),
    "sla-1": Preset("marginal", 0.0, 64, 64, "bhsd",
                    "thu-ml/SLA branch SLA-1, `sparse_linear_attention.SparseLinearAttention`"),
    "paper": Preset("marginal", 0.10, 64, 64, "bhsd",
                    "the SLA paper (arXiv:2509.24006): critical, marginal and negligible "
                    "blocks, k_low 10%"),
    "turbodiffusion": Preset("global", 0.0, 128, 64, "bshd",
                             "TurboDiffusion's `SLA.SparseLinearAttention`, blocks as its "
                             "inference scripts build it"),
    "sagesla": Preset("global", 0.0, 64, 128, "bhsd",
                      "thu-ml/SLA `SageSLA.SageSparseLinearAttention` on Hopper (its call "
                      "and blocks; bf16 kernels here, not its int8/fp8 ones)"),
    "turbodiffusion-sagesla": Preset("global", 0.0, 64, 128, "bshd",
                                     "TurboDiffusion's `SLA.SageSparseLinearAttention` on "
                                     "Hopper (bf16 kernels here)"),
}
DEFAULT_PRESET = "thu-ml"
"""What `SparseLinearAttention` computes unless told otherwise: thu-ml/SLA's default branch."""


def preset(name: object) -> Preset:
    """The preset called `name`; a ValueError naming `preset` for an unknown one."""
    check_choice("preset", name, tuple(PRESETS))
    return PRESETS[name]
