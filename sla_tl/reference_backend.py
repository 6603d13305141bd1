"""The reference as a backend: the plain-torch oracle behind the op's device interface.

A backend takes and returns tensors in the user's layout; outputs are contiguous in it.
A routing is checked in full before use: a ValueError names the field and row at fault.
A gate is (B, H, Lq) in layout "bhsd" and (B, Lq, H) in "bshd": `to_bhsd` views both.
Its route, forward and backward run with autocast off, so the reference computes in its
inputs' dtypes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch

from . import reference, routing_check, spec
from .layout import from_bhsd, to_bhsd
from .routing import Routing
from .settings import ForwardOutputs, Settings

Entry = TypeVar("Entry", bound=Callable)


def _autocast_off(entry: Entry) -> Entry:
    """`entry` run with the CPU's autocast off (the backend serves CPU tensors)."""
    @functools.wraps(entry)
    def run(*args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return entry(*args, **kwargs)
    return run  # type: ignore[return-value]


@_autocast_off
def route(
    q: torch.Tensor, k: torch.Tensor, topk: float, k_low: float, block_q: int, block_kv: int,
    layout: str,
) -> Routing:
    """Routing of the reference, on q's device."""
    return reference.route(to_bhsd(q, layout), to_bhsd(k, layout), topk, k_low, block_q, block_kv)


def _check_routing(routing: Routing, k: torch.Tensor, s: Settings) -> None:
    n_kv = spec.num_blocks(to_bhsd(k, s.layout).shape[2], s.block_kv)
    routing_check.check_values(routing, n_kv, s.linear)


def _gate_bhsd(gate: torch.Tensor | None, layout: str) -> torch.Tensor | None:
    return None if gate is None else to_bhsd(gate, layout)


def _run(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, s: Settings, gate: torch.Tensor | None,
) -> reference.ForwardResult:
    _check_routing(routing, k, s)
    return reference.attention_with_routing(
        to_bhsd(q, s.layout), to_bhsd(k, s.layout), to_bhsd(v, s.layout), routing,
        proj_weight, proj_bias, s.block_q, s.block_kv, s.feature_map, s.linear, s.scale,
        _gate_bhsd(gate, s.layout),
    )


@_autocast_off
def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, s: Settings,
    gate: torch.Tensor | None = None,
) -> ForwardOutputs:
    """The output and what the backward reuses, in the reference's arithmetic."""
    with torch.no_grad():
        out, lse, linear = _run(q, k, v, routing, proj_weight, proj_bias, s, gate)
        h_rows, z_rows = reference.linear_states(
            to_bhsd(k, s.layout), to_bhsd(v, s.layout), routing, s.block_kv, s.feature_map,
            s.linear,
        )
    return ForwardOutputs(
        from_bhsd(out, s.layout).contiguous(), lse.contiguous(),
        from_bhsd(linear, s.layout).contiguous(), h_rows.to(q.dtype).contiguous(),
        z_rows.float().contiguous(),
    )


def routed_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
    proj_bias: torch.Tensor, topk: float, k_low: float, s: Settings,
    gate: torch.Tensor | None = None,
) -> tuple[ForwardOutputs, Routing]:
    """Routing of the reference, then the forward on it: the outputs and the routing."""
    routing = route(q, k, topk, k_low, s.block_q, s.block_kv, s.layout)
    return forward(q, k, v, routing, proj_weight, proj_bias, s, gate), routing


@_autocast_off
def backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    saved: ForwardOutputs, routing: Routing,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, s: Settings,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dq, dk, dv, dproj_weight, dproj_bias, dgate) from the reference's explicit
    formula; dgate is None without a gate.

    The reference recomputes what it needs; `saved` (the forward's outputs) is for kernels.
    """
    del saved
    _check_routing(routing, k, s)
    dq, dk, dv, d_weight, d_bias, d_gate = reference.attention_backward(
        to_bhsd(grad_out, s.layout), to_bhsd(q, s.layout), to_bhsd(k, s.layout),
        to_bhsd(v, s.layout), routing, proj_weight, proj_bias,
        s.block_q, s.block_kv, s.feature_map, s.linear, s.scale, _gate_bhsd(gate, s.layout),
    )
    grads = tuple(from_bhsd(g, s.layout).contiguous() for g in (dq, dk, dv))
    d_gate = None if d_gate is None else from_bhsd(d_gate, s.layout).contiguous()
    return (*grads, d_weight.contiguous(), d_bias.contiguous(), d_gate)
