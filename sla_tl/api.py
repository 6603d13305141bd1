"""Python entry points: thin, documented wrappers over the `torch.ops.sla` operators."""

from __future__ import annotations

import torch

from . import (
    ops,  # noqa: F401  (registers torch.ops.sla)
    routing_check,
    spec,
    validation,
)
from .layout import check_layout_plausible
from .routing import Routing
from .validation import check_choice, check_qkv, check_ratio, check_settings, check_tensors


def _check_scalars(topk: object = spec.DEFAULT_TOPK, k_low: object = spec.DEFAULT_K_LOW,
                   block_q: object = spec.DEFAULT_BLOCK_Q, block_kv: object = spec.DEFAULT_BLOCK_KV,
                   feature_map: object = spec.DEFAULT_FEATURE_MAP,
                   linear: object = spec.DEFAULT_LINEAR, scale: object = None,
                   layout: object = spec.DEFAULT_LAYOUT) -> None:
    """The operators' schemas would turn True into 1.0 and reject a float block size with
    an error naming no argument: check the Python values first."""
    check_ratio("topk", topk)
    check_ratio("k_low", k_low)
    check_settings(block_q, block_kv, feature_map, linear, scale)
    check_choice("layout", layout, spec.LAYOUTS)


def _check_routing_type(routing: object) -> None:
    if not isinstance(routing, Routing):
        raise TypeError(f"routing must be a sla_tl.Routing ({', '.join(Routing._fields)}), "
                        f"as sla_tl.route returns; got {type(routing).__name__}")


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
    _check_scalars(topk, k_low, block_q, block_kv, layout=layout)
    check_layout_plausible(layout, q=q, k=k)
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
    _check_scalars(topk, k_low, block_q, block_kv, feature_map, linear, scale, layout)
    check_layout_plausible(layout, q=q, k=k, v=v)
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
    routing was made for. A valid routing, with Mq query blocks and Nk key blocks, has
    int32 tensors on q's device: `lut` (B, H, Mq, Kc) and `neg_lut` (B, H, Mq, Kn) with
    Kc, Kn <= Nk, and `lut_count`, `neg_count` (B, H, Mq); in every row, the count lies in
    [0, width], the counted entries (the first `count`) lie in [0, Nk) in any order, and
    no key block is counted twice in `lut`, twice in `neg_lut`, or in both. Entries past a
    row's count are ignored. With `linear="global"`, `neg_lut` and `neg_count` are not used.

    On the CPU an invalid routing raises a ValueError naming the field and row. On CUDA it
    is checked on the device, without a host synchronisation (so the call stays capturable
    in a CUDA graph): the rows at fault come out NaN, and no kernel reads out of bounds;
    `check_routing` says what is wrong. `gate` as for `attention`.
    """
    _check_routing_type(routing)
    check_tensors(q=q, k=k, v=v, proj_weight=proj_weight, proj_bias=proj_bias,
                  **routing._asdict(), **({} if gate is None else {"gate": gate}))
    _check_scalars(block_q=block_q, block_kv=block_kv, feature_map=feature_map, linear=linear,
                   scale=scale, layout=layout)
    check_layout_plausible(layout, q=q, k=k, v=v)
    return torch.ops.sla.attention_lut(
        q, k, v, *routing, proj_weight, proj_bias, block_q, block_kv, feature_map, linear,
        scale, layout, gate,
    )


def check_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    routing: Routing,
    *,
    block_q: int = spec.DEFAULT_BLOCK_Q,
    block_kv: int = spec.DEFAULT_BLOCK_KV,
    linear: str = spec.DEFAULT_LINEAR,
    layout: str = spec.DEFAULT_LAYOUT,
) -> None:
    """Raise a ValueError/TypeError naming the field, row and fault unless `routing` is valid
    for q, k and these settings (see `attention_with_routing`). Reads the routing's values,
    so on a GPU it waits for them: call it while debugging, not inside a captured graph."""
    _check_routing_type(routing)
    check_tensors(q=q, k=k, **routing._asdict())
    _check_scalars(block_q=block_q, block_kv=block_kv, linear=linear, layout=layout)
    check_qkv(q, k, k, layout)
    validation.check_routing(routing, q, k, block_q, block_kv, layout)
    n_kv = spec.num_blocks((k if layout == "bhsd" else k.transpose(1, 2)).shape[2], block_kv)
    routing_check.check_values(routing, n_kv, linear)
