"""`sla::attention_dynamic_topk`: SLA whose topk is a tensor, so a compiled model takes a new
topk without being compiled again (per-step topk schedules of a compiled transformer).

torch.compile makes a Python float argument a constant of the graph, so every new topk of
`sla::attention` compiles the graph again. Here topk is a 0-d CPU tensor: a graph input whose
value the operator reads on the host (no device synchronisation). The LUT's width depends on
that value, so routing happens inside the operator, and the backward routes again (routing
is deterministic and cheap next to the attention).

    sla::attention_dynamic_topk           output, and what the backward reuses
    sla::attention_dynamic_topk_backward  gradients for q, k, v and the projection
"""

from __future__ import annotations

import torch

from . import ops, spec
from .dispatch import BACKENDS
from .layout import check_layout_plausible
from .settings import ForwardOutputs, Settings
from .validation import check_attention, check_ratio, check_saved, check_tensors


def topk_tensor(topk: float) -> torch.Tensor:
    """The tensor form of a topk share for `attention_dynamic_topk`; change it in place
    (`t.fill_(0.1)`) to move a compiled model to a new topk."""
    check_ratio("topk", topk)
    return torch.tensor(float(topk), dtype=torch.float64)


def _check_topk_tensor(topk: object) -> None:
    """topk must be a 0-d floating CPU tensor (reading a GPU tensor would synchronise)."""
    if not isinstance(topk, torch.Tensor):
        raise TypeError(f"topk must be a 0-d CPU tensor (sla_tl.topk_tensor); got "
                        f"{type(topk).__name__}")
    if topk.dim() != 0 or not topk.is_floating_point() or topk.device.type != "cpu":
        raise ValueError(f"topk must be a 0-d floating CPU tensor; got shape {tuple(topk.shape)}, "
                         f"{topk.dtype} on {topk.device}")


def _topk_value(topk: torch.Tensor) -> float:
    _check_topk_tensor(topk)
    value = topk.item()
    check_ratio("topk", value)
    return value


def _check_call(q, k, v, proj_weight, proj_bias, topk, k_low, s: Settings) -> None:
    check_attention(q, k, v, proj_weight, proj_bias, None, s)
    check_ratio("k_low", k_low)
    _check_topk_tensor(topk)


@torch.library.custom_op("sla::attention_dynamic_topk", mutates_args=())
def _attention_dynamic_topk(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
    proj_bias: torch.Tensor, topk: torch.Tensor, k_low: float, block_q: int, block_kv: int,
    feature_map: str, linear: str, scale: float | None, layout: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s = Settings.from_op_args(block_q, block_kv, feature_map, linear, scale, layout)
    _check_call(q, k, v, proj_weight, proj_bias, topk, k_low, s)
    outputs, _routing = BACKENDS[q.device.type].routed_forward(
        q, k, v, proj_weight, proj_bias, _topk_value(topk), k_low, s)
    return tuple(outputs)


@_attention_dynamic_topk.register_fake
def _attention_dynamic_topk_fake(q, k, v, proj_weight, proj_bias, topk, k_low, *settings):
    s = Settings.from_op_args(*settings)
    _check_call(q, k, v, proj_weight, proj_bias, topk, k_low, s)
    return tuple(ops.forward_outputs_like(q, s))


@torch.library.custom_op("sla::attention_dynamic_topk_backward", mutates_args=())
def _attention_dynamic_topk_backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse: torch.Tensor, o_lin: torch.Tensor, h_rows: torch.Tensor, z_rows: torch.Tensor,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, topk: torch.Tensor, k_low: float,
    block_q: int, block_kv: int, feature_map: str, linear: str, scale: float | None, layout: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    s = Settings.from_op_args(block_q, block_kv, feature_map, linear, scale, layout)
    saved = ForwardOutputs(out, lse, o_lin, h_rows, z_rows)
    _check_call(q, k, v, proj_weight, proj_bias, topk, k_low, s)
    check_saved(grad_out, saved, q, s)
    backend = BACKENDS[q.device.type]
    routing = backend.route(q, k, _topk_value(topk), k_low, block_q, block_kv, layout)
    return tuple(backend.backward(grad_out, q, k, v, saved, routing, proj_weight, proj_bias,
                                  s))[:5]


@_attention_dynamic_topk_backward.register_fake
def _attention_dynamic_topk_backward_fake(grad_out, q, k, v, out, lse, o_lin, h_rows, z_rows,
                                          proj_weight, proj_bias, *rest):
    return ops.gradients_like(q, k, v, proj_weight, proj_bias)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, proj_weight, proj_bias, topk, k_low, *settings = inputs
    ctx.save_for_backward(q, k, v, *output, proj_weight, proj_bias, topk)
    ctx.k_low = k_low
    ctx.settings = settings


def _backward(ctx, grad_out, *_unused_output_grads):
    q, k, v, out, lse, o_lin, h_rows, z_rows, proj_weight, proj_bias, topk = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv, d_weight, d_bias = torch.ops.sla.attention_dynamic_topk_backward(
        grad_out, q, k, v, out, lse, o_lin, h_rows, z_rows, proj_weight, proj_bias, topk,
        ctx.k_low, *ctx.settings)
    return dq, dk, dv, d_weight, d_bias, None, None, *(None,) * len(ctx.settings)


_attention_dynamic_topk.register_autograd(_backward, setup_context=_setup_context)


def attention_dynamic_topk(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    topk: torch.Tensor,
    *,
    k_low: float = spec.DEFAULT_K_LOW,
    block_q: int = spec.DEFAULT_BLOCK_Q,
    block_kv: int = spec.DEFAULT_BLOCK_KV,
    feature_map: str = spec.DEFAULT_FEATURE_MAP,
    linear: str = spec.DEFAULT_LINEAR,
    scale: float | None = None,
    layout: str = spec.DEFAULT_LAYOUT,
) -> torch.Tensor:
    """`sla_tl.attention` with topk a 0-d CPU tensor (`topk_tensor`), the same numbers;
    under torch.compile a change of the tensor's value needs no recompile.
    Differentiable in q, k, v, proj_weight and proj_bias."""
    check_tensors(q=q, k=k, v=v, proj_weight=proj_weight, proj_bias=proj_bias)
    _check_topk_tensor(topk)
    check_layout_plausible(layout, q=q, k=k, v=v)
    return torch.ops.sla.attention_dynamic_topk(
        q, k, v, proj_weight, proj_bias, topk, k_low, block_q, block_kv, feature_map, linear,
        scale, layout,
    )[0]
