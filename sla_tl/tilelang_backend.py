"""The CUDA backend: TileLang kernels glued with a few small torch ops, no host synchronisation.

Takes and returns tensors in the user's layout, like every backend (see `dispatch`). A gate,
(B, H, Lq) or (B, Lq, H) by layout, reaches the kernels as float32 (B, H, Lq).
"""

from __future__ import annotations

from collections.abc import Callable

import tilelang
import torch

from . import block_states, config_store, kernel_cache, kernels, routing_check, spec
from .kernels import Schedule
from .layout import from_bhsd, to_bhsd
from .routing import Routing
from .schedules.sm90 import select
from .settings import ForwardOutputs, Settings


def _dims(x: torch.Tensor, layout: str) -> tuple[int, int, int, int]:
    b, h, length, d = to_bhsd(x, layout).shape
    return b, h, length, d


def _dtype_name(x: torch.Tensor) -> str:
    return str(x.dtype).removeprefix("torch.")


def _gate_rows(gate: torch.Tensor | None, layout: str) -> tuple[torch.Tensor, ...]:
    """The gated kernels' extra argument, float32 (B, H, Lq); nothing without a gate."""
    return () if gate is None else (to_bhsd(gate, layout).float().contiguous(),)


def _pool(x: torch.Tensor, block: int, layout: str, arch: str) -> torch.Tensor:
    b, h, length, d = _dims(x, layout)
    pooled = x.new_empty((b, h, spec.num_blocks(length, block), d), dtype=torch.float32)
    kernels.pool_kernel(d, block, _dtype_name(x), layout, arch)(x, pooled)
    return pooled


SELECTIONS = ("sort", "kernel")
"""How routing picks each row's blocks from the pooled scores: "sort" (torch: a row sort,
the default) or "kernel" (one TileLang kernel, `schedules/sm90/select.py`, on the unsmoothed
scores; it replaces ~10 small torch launches and is a candidate for the default)."""


def route(
    q: torch.Tensor, k: torch.Tensor, topk: float, k_low: float, block_q: int, block_kv: int,
    layout: str, selection: str = "sort",
) -> Routing:
    """Pooled block scores (pooling kernels), then per-row top/bottom selection."""
    kernels.check_block_sizes(block_q, block_kv)
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
    q, k = q.contiguous(), k.contiguous()
    _, arch = kernel_cache.prepare(q.device)
    pooled_q = _pool(q, block_q, layout, arch)
    pooled_k = _pool(k, block_kv, layout, arch)
    lk = _dims(k, layout)[2]
    n_kv = pooled_k.shape[2]
    n_crit = spec.num_critical(topk, n_kv)
    n_neg = spec.num_negligible(k_low, n_kv, n_crit)
    rows = pooled_q.shape[:-1]
    if selection == "kernel":
        if n_kv > select.MAX_KEY_BLOCKS:
            raise ValueError(f"selection='kernel' takes at most {select.MAX_KEY_BLOCKS} key "
                             f"blocks; got {n_kv} (use selection='sort')")
        # Smoothing K subtracts pooled_q . mean(k) from a whole row: no row's ranking moves.
        scores = pooled_q @ pooled_k.transpose(-1, -2)
        routing = Routing(
            q.new_empty((*rows, n_crit), dtype=torch.int32),
            q.new_empty(rows, dtype=torch.int32),
            q.new_empty((*rows, n_neg), dtype=torch.int32),
            q.new_empty(rows, dtype=torch.int32),
        )
        kernels.select_kernel(arch)(scores, *routing)
        return routing
    rows_per_block = torch.full((n_kv, 1), float(block_kv), device=k.device)
    rows_per_block[-1] = lk - (n_kv - 1) * block_kv
    mean_k = (pooled_k * rows_per_block).sum(dim=2, keepdim=True) / lk
    scores = pooled_q @ (pooled_k - mean_k).transpose(-1, -2)
    # One sort of each row (512 wide at Wan shapes: a single in-register sort kernel) gives
    # both ends; cheaper than two multi-pass top-k selections.
    order = torch.sort(scores, dim=-1, descending=True).indices
    critical = order[..., :n_crit]
    negligible = order[..., n_kv - n_neg:]
    return Routing(
        critical.sort(dim=-1).values.to(torch.int32),
        torch.full(rows, n_crit, dtype=torch.int32, device=q.device),
        negligible.sort(dim=-1).values.to(torch.int32),
        torch.full(rows, n_neg, dtype=torch.int32, device=q.device),
    )


def schedule_for_call(q: torch.Tensor, k: torch.Tensor, routing: Routing, s: Settings) -> Schedule:
    """The tuned (or nearest tuned, or default) schedule of a call: see `config_store`."""
    gpu, arch = kernel_cache.prepare(q.device)
    b, h, lq, d = _dims(q, s.layout)
    call = config_store.CallKey(
        gpu, arch, tilelang.__version__, b, h, lq, _dims(k, s.layout)[2], d, _dtype_name(q),
        s.block_q, s.block_kv, routing.lut.shape[-1], routing.neg_lut.shape[-1],
        s.feature_map, s.linear, s.layout,
    )
    return config_store.schedule_for(call)


def _key_states(k: torch.Tensor, v: torch.Tensor, s: Settings, arch: str,
                schedule: Schedule | None = None):
    """(per-block h, per-block z, per-group sums of h) of the linear branch: per-block h in
    "marginal" mode, per-group sums in "global" mode, a 1-entry placeholder for the other."""
    b, h, lk, d = _dims(k, s.layout)
    n_kv = spec.num_blocks(lk, s.block_kv)
    marginal = s.linear == "marginal"
    knobs = kernels.knobs_of(schedule, "key_pass")
    n_groups = 1 if marginal else spec.num_blocks(n_kv, kernels.key_pass_group(d, s.block_kv,
                                                                                 knobs))
    h_block = k.new_empty((b, h, n_kv if marginal else 1, d, d))
    z_block = torch.empty((b, h, n_kv, d), dtype=torch.float32, device=k.device)
    h_group = torch.empty((b, h, n_groups, d, d), dtype=torch.float32, device=k.device)
    kernel = kernels.key_pass_kernel(d, s.block_kv, _dtype_name(k), s.feature_map, s.layout,
                                     marginal, arch, knobs)
    kernel(k, v, h_block, z_block, h_group)
    return h_block, z_block, h_group


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, s: Settings,
    schedule: Schedule | None = None, gate: torch.Tensor | None = None,
) -> ForwardOutputs:
    """The SLA output and what the backward reuses (see `ForwardOutputs`). `schedule`
    overrides the stored one (the autotuner times candidates this way); `gate` scales the
    projection term per row."""
    q = q.contiguous()
    b, h, lq, d = _dims(q, s.layout)
    n_rows = spec.linear_state_rows(lq, s.block_q, s.linear)
    outputs = ForwardOutputs(
        torch.empty_like(q),
        torch.empty((b, h, lq), dtype=torch.float32, device=q.device),
        torch.empty_like(q),
        q.new_empty((b, h, n_rows, d, d)),
        torch.empty((b, h, n_rows, d), dtype=torch.float32, device=q.device),
    )
    forward_into(q, k, v, routing, proj_weight, proj_bias, s, outputs, schedule, gate)
    return outputs


def forward_into(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, routing: Routing,
    proj_weight: torch.Tensor, proj_bias: torch.Tensor, s: Settings, outputs: ForwardOutputs,
    schedule: Schedule | None = None, gate: torch.Tensor | None = None,
) -> None:
    """`forward`, writing into given contiguous buffers (tests poison them first)."""
    kernels.check_block_sizes(s.block_q, s.block_kv)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    _, arch = kernel_cache.prepare(q.device)
    if schedule is None:
        schedule = schedule_for_call(q, k, routing, s)
    d = _dims(q, s.layout)[3]
    scale = d**-0.5 if s.scale is None else s.scale
    h_block, z_block, h_group = _key_states(k, v, s, arch, schedule)
    n_kv = z_block.shape[2]
    marginal = s.linear == "marginal"
    # The routing is checked on the device (no host synchronisation): rows at fault come out
    # NaN, and the kernels bound every LUT read, so nothing is read out of range.
    listed = routing_check.listing(routing, n_kv, negligible=marginal)
    faults = routing_check.row_faults(routing, listed, negligible=marginal)
    if marginal:
        block_states.query_states(h_block, z_block, routing, outputs.h_rows, outputs.z_rows,
                                  listed)
    else:
        torch.sum(h_group, dim=2, keepdim=True, out=outputs.h_rows)
        torch.sum(z_block, dim=2, keepdim=True, out=outputs.z_rows)
    getter = kernels.forward_kernel if gate is None else kernels.gated_forward_kernel
    kernel = getter(d, s.block_q, s.block_kv, _dtype_name(q), s.feature_map, s.layout,
                    float(scale), arch, kernels.knobs_of(schedule, "forward"))
    kernel(
        q, k, v, routing.lut.contiguous(), routing.lut_count.contiguous(),
        outputs.h_rows, outputs.z_rows, _active(routing, n_kv, s.linear, faults),
        proj_weight.to(q.dtype).contiguous(), proj_bias.float().contiguous(),
        *_gate_rows(gate, s.layout), outputs.out, outputs.linear, outputs.lse,
    )


def _active(routing: Routing, n_kv: int, linear: str,
            faults: torch.Tensor | None = None) -> torch.Tensor:
    """int32 (B, H, Mq): 1 where a query block's linear branch is on: it has at least one
    marginal key block ("marginal"), always ("global"); -1 where `faults` marks the row's
    routing invalid (the forward writes NaN there)."""
    if linear == "global":
        active = torch.ones_like(routing.lut_count)
    else:
        active = (routing.lut_count + routing.neg_count < n_kv).to(torch.int32)
    return active if faults is None else active.masked_fill(faults, -1)


def reverse_lut(lut: torch.Tensor, count: torch.Tensor, n_kv: int) -> tuple[torch.Tensor, ...]:
    """Key-major view of a LUT: for each key block, the query blocks listing it (ascending),
    as (B, H, Nk, Mq) int32 with counts (B, H, Nk). Torch ops only, no host synchronisation;
    entries outside [0, Nk) or past a row's count are left out, a repeated one counts once."""
    by_key = routing_check.tally([(lut, count)], n_kv).per_block.clamp(max=1).transpose(-1, -2)
    n_q = by_key.shape[-1]
    # Each listing query block goes to its rank among the listing ones; the others to a
    # spare column past the end.
    rank = torch.cumsum(by_key, dim=-1, dtype=torch.int32) - 1
    slot = torch.where(by_key.bool(), rank, n_q).long()
    reverse = torch.zeros((*by_key.shape[:-1], n_q + 1), dtype=torch.int32, device=lut.device)
    query_block = torch.arange(n_q, dtype=torch.int32, device=lut.device).expand_as(slot)
    reverse.scatter_(-1, slot, query_block)
    return reverse[..., :n_q].contiguous(), rank[..., -1] + 1


def backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    saved: ForwardOutputs, routing: Routing, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
    s: Settings, schedule: Schedule | None = None, gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """(dq, dk, dv, dproj_weight, dproj_bias, dgate): query pass, dQ over the LUT, dK/dV over
    the reverse LUT; the projection's gradients are two small torch GEMMs; dgate (from the
    query pass) is None without a gate. `schedule` overrides the stored one."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    dq = torch.empty_like(q)
    dk, dv, d_weight, d_bias, d_gate = backward_into(
        grad_out, q, k, v, saved, routing, proj_weight, proj_bias, s, dq,
        lambda: (torch.empty_like(k), torch.empty_like(v)), schedule, gate)
    return dq, dk, dv, d_weight, d_bias, d_gate


def backward_into(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    saved: ForwardOutputs, routing: Routing, proj_weight: torch.Tensor, proj_bias: torch.Tensor,
    s: Settings, dq: torch.Tensor,
    key_grads: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    schedule: Schedule | None = None, gate: torch.Tensor | None = None,
    gate_grad: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """`backward`, writing dq into a given contiguous buffer and dk, dv into the buffers that
    `key_grads()` returns (tests poison them first); returns (dk, dv, dproj_weight,
    dproj_bias, dgate), dgate in the user's layout and the gate's dtype (None without one).
    With a gate, the query pass writes dgate into `gate_grad`, a contiguous float32
    (B, H, Lq) buffer (made here when None).

    dk and dv are asked for only once the query blocks' states are freed: the two never
    live at once, which keeps the backward's peak memory down."""
    kernels.check_block_sizes(s.block_q, s.block_kv)
    q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
    saved = ForwardOutputs(*(t.contiguous() for t in saved))  # the kernels take dense tensors
    _, arch = kernel_cache.prepare(q.device)
    if schedule is None:
        schedule = schedule_for_call(q, k, routing, s)
    b, h, lq, d = _dims(q, s.layout)
    lk = _dims(k, s.layout)[2]
    n_q, n_kv = spec.num_blocks(lq, s.block_q), spec.num_blocks(lk, s.block_kv)
    dtype = _dtype_name(q)
    scale = float(d**-0.5 if s.scale is None else s.scale)
    weight = proj_weight.to(q.dtype).contiguous()
    active = _active(routing, n_kv, s.linear)

    delta = torch.empty((b, h, lq), dtype=torch.float32, device=q.device)
    g_rows = q.new_empty((b, h, n_q, d, d))
    gz_rows = torch.empty((b, h, n_q, d), dtype=torch.float32, device=q.device)
    gate_rows = _gate_rows(gate, s.layout)
    d_gate_rows = () if gate is None else (
        torch.empty_like(gate_rows[0]) if gate_grad is None else gate_grad,)
    query = (kernels.backward_query_kernel if gate is None
             else kernels.gated_backward_query_kernel)
    query(d, s.block_q, dtype, s.feature_map, s.layout, arch)(
        q, grad_out, saved.out, saved.linear, weight, proj_bias.float().contiguous(),
        *gate_rows, saved.h_rows, saved.z_rows, active, delta, g_rows, gz_rows, dq,
        *d_gate_rows,
    )
    kernels.backward_dq_kernel(d, s.block_q, s.block_kv, dtype, s.layout, scale, arch,
                               kernels.knobs_of(schedule, "backward_dq"))(
        q, k, v, grad_out, saved.lse, delta, routing.lut.contiguous(),
        routing.lut_count.contiguous(), dq,
    )
    reverse = reverse_lut(routing.lut, routing.lut_count, n_kv)
    dh, dz = block_states.key_states(g_rows, gz_rows, routing, n_kv, s.linear)
    del g_rows, gz_rows
    dk, dv = key_grads()
    kernels.backward_dkdv_kernel(d, s.block_q, s.block_kv, dtype, s.feature_map, s.layout,
                                 scale, arch, kernels.knobs_of(schedule, "backward_dkdv"))(
        q, k, v, grad_out, saved.lse, delta, *reverse, dh, dz, dk, dv,
    )
    # dW = sum over rows of dO^T O_l, db = sum of dO, both as GEMMs (cuBLAS accumulates in
    # float32; a column sum over this many rows is slow as a reduction kernel). With a gate
    # the projection's upstream gradient is g dO.
    upstream = grad_out if gate is None else grad_out * gate.unsqueeze(-1).to(grad_out.dtype)
    rows = upstream.reshape(-1, d)
    d_weight = (rows.T @ saved.linear.reshape(-1, d)).to(proj_weight.dtype)
    d_bias = (rows.new_ones((1, rows.shape[0])) @ rows).squeeze(0).to(proj_bias.dtype)
    d_gate = None if gate is None else (
        from_bhsd(d_gate_rows[0], s.layout).contiguous().to(gate.dtype))
    return dk, dv, d_weight, d_bias, d_gate
