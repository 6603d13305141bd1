"""Python entry points: thin, documented wrappers over the `torch.ops.sla` operators."""

from __future__ import annotations

import torch

from . import (
    ops,  # noqa: F401  (registers torch.ops.sla)
    spec,
)
from .routing import Routing
from .validation import check_tensors


def route(
    q: torch.Tensor,
    k: torch.Tensor,
    topk: float = spec.DEFAULT_TOPK,
    k_low: float = spec.DEFAULT_K_LOW,
    block_q: int = spec.DEFAULT_BLOCK_Q,
    block_kv: int = spec.DEFAULT_BLOCK_KV,
    layout: str = spec.DEFAULT_LAYOUT,
) -> Routing:
    """Classify key blocks for every query block: the `topk` share critical, `k_low` negligible.

    Scores are mean-pooled q blocks against mean-pooled smoothed-k blocks; each row keeps
    `clamp(int(topk * Nk), 1, Nk)` critical blocks and `int(k_low * Nk)` negligible ones.
    Not differentiable. The result can be edited or replaced and passed to
    `attention_with_routing`.
    """
    check_tensors(q=q, k=k)
    return Routing(*torch.ops.sla.route(q, k, topk, k_low, block_q, block_kv, layout))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    *,
    topk: float = spec.DEFAULT_TOPK,
    k_low: float = spec.DEFAULT_K_LOW,
    block_q: int = spec.DEFAULT_BLOCK_Q,
    block_kv: int = spec.DEFAULT_BLOCK_KV,
    feature_map: str = spec.DEFAULT_FEATURE_MAP,
    linear: str = spec.DEFAULT_LINEAR,
    scale: float | None = None,
    layout: str = spec.DEFAULT_LAYOUT,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sparse-Linear Attention: `O_s + proj(O_l)`, same as `torch.ops.sla.attention`.

    q: (B, H, Lq, D), k and v: (B, H, Lk, D) (or (B, L, H, D) with layout="bshd"),
    bfloat16 or float16 (the CPU reference also takes float32/float64), D in {64, 128}.
    proj_weight (D, D) and proj_bias (D,) map the linear branch into the output.
    `gate` (SALAD's): a floating (B, H, Lq) tensor ((B, Lq, H) with layout="bshd") that
    scales each row's projection term, `O_s + g * proj(O_l)`; None means no gate.
    Differentiable in q, k, v, proj_weight, proj_bias and gate.
    """
    check_tensors(q=q, k=k, v=v, proj_weight=proj_weight, proj_bias=proj_bias,
                  **({} if gate is None else {"gate": gate}))
    return torch.ops.sla.attention(
        q, k, v, proj_weight, proj_bias, topk, k_low, block_q, block_kv, feature_map, linear,
        scale, layout, gate,
    )


def attention_with_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: Routing,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    *,
    block_q: int = spec.DEFAULT_BLOCK_Q,
    block_kv: int = spec.DEFAULT_BLOCK_KV,
    feature_map: str = spec.DEFAULT_FEATURE_MAP,
    linear: str = spec.DEFAULT_LINEAR,
    scale: float | None = None,
    layout: str = spec.DEFAULT_LAYOUT,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """SLA for a precomputed block classification (`route`, a learned router, or a test's).

    Same as `torch.ops.sla.attention_lut`. `block_q`/`block_kv` must be the sizes the
    routing was made for. LUT entries must lie in [0, Nk); they are not checked on the
    device (that would need a host synchronisation). `gate` as for `attention`.
    """
    check_tensors(q=q, k=k, v=v, proj_weight=proj_weight, proj_bias=proj_bias,
                  **routing._asdict(), **({} if gate is None else {"gate": gate}))
    return torch.ops.sla.attention_lut(
        q, k, v, *routing, proj_weight, proj_bias, block_q, block_kv, feature_map, linear,
        scale, layout, gate,
    )
