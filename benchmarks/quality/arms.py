"""The fine-tuning arms: which attention core each one puts in the model.

Every core takes q, k, v (B, H, L, D) and computes in bfloat16 (what the CUDA kernels take),
so dense and sparse arms see the same rounding of their inputs; the output comes back in
q's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

import sla_tl
from sla_tl import spec

from .dit import AttentionFactory

ATTENTION_DTYPE = torch.bfloat16


@dataclass(frozen=True)
class Arm:
    """One way of fine-tuning the pretrained model."""

    name: str
    description: str
    sparse: bool = True
    k_low: float = 0.0
    linear: str = "marginal"
    linear_branch: bool = True
    """False: the projection stays zero and frozen, so only the sparse branch counts."""
    gate: bool = False


REFERENCE_ARM = "dense"
"""The control every other arm is compared with."""
SPARSE_ONLY_ARM = "sparse_only"
SLA_ARM = "sla"

ARMS: tuple[Arm, ...] = (
    Arm(REFERENCE_ARM, "dense attention (the control)", sparse=False),
    Arm(SPARSE_ONLY_ARM, "sparse branch alone, linear branch off", linear_branch=False),
    Arm(SLA_ARM, "SLA: sparse + linear over the marginal blocks, k_low 0"),
    Arm("sla_klow10", "SLA with k_low 0.10 (the paper's setting)", k_low=0.10),
    Arm("salad", "SALAD-style: linear branch over all blocks, input-dependent gate",
        linear="global", gate=True),
)
ARM_NAMES = tuple(arm.name for arm in ARMS)


def arm_named(name: str) -> Arm:
    """The arm called `name`; ValueError listing the known ones otherwise."""
    for arm in ARMS:
        if arm.name == name:
            return arm
    raise ValueError(f"unknown arm {name!r}; known: {', '.join(ARM_NAMES)}")


class DenseAttention(nn.Module):
    """Full softmax attention (torch SDPA)."""

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        inputs = (t.to(ATTENTION_DTYPE) for t in (q, k, v))
        return F.scaled_dot_product_attention(*inputs).to(q.dtype)


class SparseAttention(nn.Module):
    """`sla_tl.SparseLinearAttention` configured for an arm (the op: the CPU reference, or
    the TileLang kernels on CUDA)."""

    def __init__(self, head_dim: int, arm: Arm, topk: float, block_q: int,
                 block_kv: int) -> None:
        super().__init__()
        self.sla = sla_tl.SparseLinearAttention(
            head_dim, topk, BLKQ=block_q, BLKK=block_kv,
            use_bf16=ATTENTION_DTYPE == torch.bfloat16, k_low=arm.k_low, linear=arm.linear,
            gate=arm.gate)
        if not arm.linear_branch:
            self.sla.proj_l.requires_grad_(False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return self.sla(q, k, v)


def attention_factory(arm: Arm, topk: float, block_q: int, block_kv: int) -> AttentionFactory:
    """What builds the attention cores of `arm`'s model."""
    if not arm.sparse:
        return lambda head_dim: DenseAttention()
    return lambda head_dim: SparseAttention(head_dim, arm, topk, block_q, block_kv)


def sparsity(topk: float, length: int, block_kv: int) -> float:
    """Share of key blocks the sparse branch skips at this length: 1 - n_critical / Nk."""
    n_kv = spec.num_blocks(length, block_kv)
    return 1.0 - spec.num_critical(topk, n_kv) / n_kv
