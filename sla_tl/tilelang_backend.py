"""The CUDA backend: runs a call's plan (`sla_tl.plan`): TileLang kernels glued with a few
small torch ops, no host synchronisation.

Takes and returns tensors in the user's layout, like every backend (see `dispatch`). A gate,
(B, H, Lq) or (B, Lq, H) by layout, reaches the kernels as float32 (B, H, Lq). The arguments
are the operators' and checked by them (`sla_tl.ops`); the plan checks what only the arch
knows (its block sizes) once per call shape.

Every attention entry takes `schedule` (knobs overriding the tuned ones: the tuner's
candidates, the benchmarks' and GPU tests' alternatives) and `buffers` (tensors to write
instead of allocating them, by the plan's names: tests poison them first); `routed_forward`
also takes `selection` and `fusions` (see `sla_tl.plan`). For a dry run on a machine
without the GPU (`sla_tl.dry_run`) every entry takes `target`, `launch` (kernel launches
recorded, not run) and `watch` (a context around each step of the plan).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch

from . import spec
from .kernels import Schedule
from .layout import to_bhsd
from .phases import Launcher, Watcher
from .plan import attention_plan, by_phase, call_shape, route_phase, routed_plan
from .routing import Routing
from .settings import ForwardOutputs, Settings
from .targets import Target, target_of

Buffers = Mapping[str, torch.Tensor]


def route(
    q: torch.Tensor, k: torch.Tensor, topk: float, k_low: float, block_q: int, block_kv: int,
    layout: str, selection: str | None = None, *, target: Target | None = None,
    launch: Launcher | None = None, watch: Watcher | None = None,
) -> Routing:
    """Pooled block scores (pooling kernels), then per-row top/bottom selection by
    `selection` ("sort" or "kernel", see `plan.SELECTIONS`; None: the default,
    `plan.resolve_selection`)."""
    q, k = q.contiguous(), k.contiguous()
    s = Settings(block_q=block_q, block_kv=block_kv, layout=layout)
    shape = call_shape(q, k, s, False, _widths(k, topk, k_low, s))
    phase = route_phase(target or target_of(q.device), shape, selection)
    return Routing(*phase.run({"q": q, "k": k}, q.device, launch, watch=watch).values())


def _widths(k: torch.Tensor, topk: float, k_low: float, s: Settings) -> tuple[int, int]:
    """The widths (Kc, Kn) of the routing of these ratios."""
    n_kv = spec.num_blocks(to_bhsd(k, s.layout).shape[2], s.block_kv)
    n_crit = spec.num_critical(topk, n_kv)
    return n_crit, spec.num_negligible(k_low, n_kv, n_crit)


def routed_forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, proj_weight: torch.Tensor,
    proj_bias: torch.Tensor, topk: float, k_low: float, s: Settings,
    schedule: Schedule | None = None, gate: torch.Tensor | None = None, *,
    selection: str | None = None, fusions: Collection[str] | None = None,
    buffers: Buffers | None = None, target: Target | None = None,
    launch: Launcher | None = None, watch: Watcher | None = None,
) -> tuple[ForwardOutputs, Routing]:
    """Routing (by `selection`; None: the default), then the forward on it, as one plan
    (`plan.routed_plan`, with `fusions`; None: the default ones): the forward's outputs
    and the routing."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    shape = call_shape(q, k, s, gate is not None, _widths(k, topk, k_low, s))
    plan = routed_plan(target or target_of(q.device), shape, schedule, selection, fusions)
    tensors = dict(q=q, k=k, v=v, proj_weight=proj_weight, proj_bias=proj_bias,
                   **({} if gate is None else {"gate": gate}), **(buffers or {}))
    made = plan.forward.run(tensors, q.device, launch, watch=watch)
    return (ForwardOutputs(*(made[name] for name in ForwardOutputs._fields)),
            Routing(*(made[name] for name in Routing._fields)))


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, s: Settings,
    schedule: Schedule | None = None, gate: torch.Tensor | None = None, *,
    buffers: Buffers | None = None, keep_routing: bool = True, target: Target | None = None,
    launch: Launcher | None = None, watch: Watcher | None = None,
) -> ForwardOutputs:
    """The SLA output and what the backward reuses (see `ForwardOutputs`); `gate` scales
    the projection term per row. `keep_routing`: what the forward derives from the routing
    is kept with it, for the next call with the same routing (see `sla_tl.routing`)."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    routing = routing.contiguous()
    shape = call_shape(q, k, s, gate is not None, routing.widths)
    plan = attention_plan(target or target_of(q.device), shape, schedule, keep_routing)
    tensors = dict(q=q, k=k, v=v, **routing._asdict(), proj_weight=proj_weight,
                   proj_bias=proj_bias, **({} if gate is None else {"gate": gate}),
                   **(buffers or {}))
    return ForwardOutputs(**plan.forward.run(tensors, q.device, launch, watch=watch))


def backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    saved: ForwardOutputs, routing: Routing, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
    s: Settings, schedule: Schedule | None = None, gate: torch.Tensor | None = None, *,
    buffers: Buffers | None = None, keep_routing: bool = True, target: Target | None = None,
    fusions: Collection[str] | None = None, launch: Launcher | None = None,
    watch: Watcher | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv, dproj_weight, dproj_bias, dgate): query pass, dQ over the LUT, dK/dV
    over the reverse LUT; the projection's gradients are two small torch GEMMs; dgate (from
    the query pass, in the gate's layout and dtype) is None without a gate. `buffers` may
    hold "dq", "dk", "dv" and, with a gate, "d_gate_rows" (float32 (B, H, Lq)).
    `keep_routing` as for `forward` (after a call that routed, the routing dies with the
    saved tensors, and with it what was kept); `fusions`: the call's (`plan.FUSIONS`; None:
    the default ones), of which the backward runs those of its steps."""
    q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
    saved = ForwardOutputs(*(t.contiguous() for t in saved))  # the kernels take dense tensors
    routing = routing.contiguous()
    shape = call_shape(q, k, s, gate is not None, routing.widths)
    plan = attention_plan(target or target_of(q.device), shape, schedule, keep_routing,
                          None if fusions is None else by_phase(tuple(fusions))[1])
    tensors = dict(grad_out=grad_out, q=q, k=k, v=v, **saved._asdict(), **routing._asdict(),
                   proj_weight=proj_weight, proj_bias=proj_bias,
                   **({} if gate is None else {"gate": gate}), **(buffers or {}))
    grads = plan.backward.run(tensors, q.device, launch, watch=watch)
    return (grads["dq"], grads["dk"], grads["dv"], grads["d_weight"], grads["d_bias"],
            grads.get("d_gate"))
