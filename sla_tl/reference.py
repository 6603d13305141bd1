"""Sparse-Linear Attention in plain torch: the oracle every kernel is checked against.

Written to be obviously right, not fast: each (batch, head) pair is computed on its own
with dense (Lq, Lk) score and mask matrices, so memory is O(Lq * Lk) per head.
All tensors here are in the canonical (B, H, L, D) view (a gate in (B, H, Lq)); arithmetic
runs in float32, or float64 when the inputs are float64. Differentiable in q, k, v, the
projection and the gate.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from .feature_maps import FEATURE_MAPS, FeatureMap
from .routing import Routing, block_mask
from .spec import LINEAR_EPS, num_blocks, num_critical, num_negligible, softmax_scale


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs, float32 for everything else."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- routing


def _rows_per_block(length: int, block: int) -> int:
    """Rows a block spans in memory: a block longer than the sequence spans the sequence (so
    a huge block size never allocates past the input)."""
    return min(block, length)


def mean_pool(x: torch.Tensor, block: int) -> torch.Tensor:
    """Mean of each block of `block` rows along L; a partial last block averages the rows it has."""
    batch, heads, length, dim = x.shape
    n = num_blocks(length, block)
    span = _rows_per_block(length, block)
    xf = x.to(compute_dtype(x))
    xf = F.pad(xf, (0, 0, 0, n * span - length))
    sums = xf.reshape(batch, heads, n, span, dim).sum(dim=3)
    rows = torch.full((n, 1), float(span), dtype=xf.dtype, device=x.device)
    rows[-1] = length - (n - 1) * block
    return sums / rows


def block_scores(q: torch.Tensor, k: torch.Tensor, block_q: int, block_kv: int) -> torch.Tensor:
    """(B, H, Mq, Nk) scores between mean-pooled q blocks and mean-pooled smoothed-k blocks."""
    kf = k.to(compute_dtype(k))
    smoothed = kf - kf.mean(dim=-2, keepdim=True)
    return mean_pool(q, block_q) @ mean_pool(smoothed, block_kv).transpose(-1, -2)


def route(
    q: torch.Tensor, k: torch.Tensor, topk: float, k_low: float, block_q: int, block_kv: int
) -> Routing:
    """Classify key blocks per query block: top `topk` critical, bottom `k_low` negligible."""
    with torch.no_grad():
        scores = block_scores(q, k, block_q, block_kv)
        n_kv = scores.shape[-1]
        n_crit = num_critical(topk, n_kv)
        n_neg = num_negligible(k_low, n_kv, n_crit)
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        lut = order[..., :n_crit].sort(dim=-1).values.to(torch.int32)
        neg_lut = order[..., n_kv - n_neg :].sort(dim=-1).values.to(torch.int32)
        rows = scores.shape[:-1]
        lut_count = torch.full(rows, n_crit, dtype=torch.int32, device=q.device)
        neg_count = torch.full(rows, n_neg, dtype=torch.int32, device=q.device)
    return Routing(lut, lut_count, neg_lut, neg_count)


# ---------------------------------------------------------------- branches


def feature_map(x: torch.Tensor, name: str) -> torch.Tensor:
    """The linear branch's feature map phi, applied over the head dimension."""
    return _feature_map(name).phi(x)


def _feature_map(name: str) -> FeatureMap:
    found = FEATURE_MAPS.get(name)
    if found is None:
        raise ValueError(f"feature_map must be one of {', '.join(FEATURE_MAPS)}; got {name!r}")
    return found


def _expand(block_map: torch.Tensor, lq: int, lk: int, block_q: int, block_kv: int) -> torch.Tensor:
    """Token-level (Lq, Lk) mask from a block-level (Mq, Nk) mask."""
    rows = torch.arange(lq, device=block_map.device) // block_q
    cols = torch.arange(lk, device=block_map.device) // block_kv
    return block_map.index_select(0, rows).index_select(1, cols)


def _block_classes(routing: Routing, n_kv: int, linear: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-level (critical, marginal) masks; "global" makes every block marginal."""
    critical = block_mask(routing.lut, routing.lut_count, n_kv)
    if linear == "global":
        return critical, torch.ones_like(critical)
    return critical, ~(critical | block_mask(routing.neg_lut, routing.neg_count, n_kv, "neg_lut"))


def sparse_branch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention restricted to `mask` (Lq, Lk); returns (O_s, natural-log LSE).

    A row with no selected key gets O_s = 0 and LSE = -inf.
    """
    scores = (q @ k.transpose(-1, -2)) * scale
    has_key = mask.any(dim=-1, keepdim=True)
    # Empty rows take their LSE over zeros so no -inf - -inf reaches autograd.
    safe = torch.where(has_key, scores.masked_fill(~mask, float("-inf")), torch.zeros_like(scores))
    lse = torch.logsumexp(safe, dim=-1, keepdim=True)
    probs = torch.exp(scores.masked_fill(~mask, float("-inf")) - lse)
    out = probs @ v
    lse_out = torch.where(has_key, lse, torch.full_like(lse, float("-inf"))).squeeze(-1)
    return out, lse_out.detach()


def linear_branch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, feature: str
) -> torch.Tensor:
    """Linear attention over the keys in `mask` (Lq, Lk): phi(q) H / (phi(q) . Z + eps).

    A row with no selected key has a zero numerator, hence O_l = 0 exactly.
    """
    weights = (feature_map(q, feature) @ feature_map(k, feature).transpose(-1, -2)) * mask
    return (weights @ v) / (weights.sum(dim=-1, keepdim=True) + LINEAR_EPS)


# ---------------------------------------------------------------- whole computation


def linear_states(
    k: torch.Tensor, v: torch.Tensor, routing: Routing, block_kv: int, feature: str, linear: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """H_i and Z_i of every query block: sums of h_j = phi(K_j)^T V_j and z_j = colsum phi(K_j)
    over its marginal key blocks. In "global" mode all blocks are marginal and the one
    total per head is returned, shapes (B, H, 1, D, D) and (B, H, 1, D)."""
    batch, heads, lk, dim = k.shape
    n_kv = num_blocks(lk, block_kv)
    span = _rows_per_block(lk, block_kv)
    pad = n_kv * span - lk
    phi_k = F.pad(feature_map(k.to(compute_dtype(k)), feature), (0, 0, 0, pad))
    values = F.pad(v.to(compute_dtype(v)), (0, 0, 0, pad))
    phi_k = phi_k.reshape(batch, heads, n_kv, span, dim)
    values = values.reshape(batch, heads, n_kv, span, dim)
    h = torch.einsum("bhjta,bhjtc->bhjac", phi_k, values)
    z = phi_k.sum(dim=3)
    if linear == "global":
        return h.sum(dim=2, keepdim=True), z.sum(dim=2, keepdim=True)
    marginal = _block_classes(routing, n_kv, linear)[1].to(h.dtype)
    h_rows = torch.einsum("bhij,bhjac->bhiac", marginal, h)
    return h_rows, torch.einsum("bhij,bhja->bhia", marginal, z)


class ForwardResult(NamedTuple):
    """What the forward produces, and what a backward may reuse."""

    out: torch.Tensor
    """O_s + g * proj(O_l) (g = 1 without a gate), in q's dtype."""
    lse: torch.Tensor
    """float32 (B, H, Lq): natural-log LSE of the sparse branch (-inf for an empty row)."""
    linear: torch.Tensor
    """O_l, the linear branch before the projection, in q's dtype."""


def attention_with_routing(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: Routing,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    block_q: int,
    block_kv: int,
    feature: str,
    linear: str,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
) -> ForwardResult:
    """SLA for a given block classification: `O_s + g * proj(O_l)`, the sparse LSE and O_l.

    `gate` (B, H, Lq) scales each row's projection term (SALAD's gate); None means g = 1.
    """
    batch, heads, lq, dim = q.shape
    lk = k.shape[2]
    n_kv = num_blocks(lk, block_kv)
    scale = softmax_scale(dim, scale)
    dtype = compute_dtype(q)
    critical, marginal = _block_classes(routing, n_kv, linear)
    weight, bias = proj_weight.to(dtype), proj_bias.to(dtype)

    outs, lses, linears = [], [], []
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh = (t[b, h].to(dtype) for t in (q, k, v))
            crit = _expand(critical[b, h], lq, lk, block_q, block_kv)
            marg = _expand(marginal[b, h], lq, lk, block_q, block_kv)
            o_s, lse = sparse_branch(qh, kh, vh, crit, scale)
            o_l = linear_branch(qh, kh, vh, marg, feature)
            projected = o_l @ weight.T + bias
            if gate is not None:
                projected = gate[b, h].to(dtype).unsqueeze(-1) * projected
            outs.append(o_s + projected)
            lses.append(lse)
            linears.append(o_l)
    shape = (batch, heads, lq, dim)
    return ForwardResult(
        torch.stack(outs).reshape(shape).to(q.dtype),
        torch.stack(lses).reshape(batch, heads, lq).float(),
        torch.stack(linears).reshape(shape).to(q.dtype),
    )



def feature_map_vjp(x: torch.Tensor, grad: torch.Tensor, name: str) -> torch.Tensor:
    """Gradient with respect to x of `feature_map(x, name)`, given the gradient of its output."""
    return _feature_map(name).vjp(x, grad)


def _head_backward(qh, kh, vh, grad_o, grad_proj, crit, marg, weight, scale, feature):
    """Explicit gradients of one head: (dq, dk, dv, O_l). `grad_o` reaches the sparse branch,
    `grad_proj` (g * grad_o with a gate) the projection's output."""
    scores = (qh @ kh.T) * scale
    has_key = crit.any(dim=-1, keepdim=True)
    probs = torch.softmax(torch.where(has_key, scores.masked_fill(~crit, float("-inf")),
                                      torch.zeros_like(scores)), dim=-1) * crit
    o_s = probs @ vh
    delta = (grad_o * o_s).sum(dim=-1, keepdim=True)
    d_scores = probs * (grad_o @ vh.T - delta)
    dq = (d_scores @ kh) * scale
    dk = (d_scores.T @ qh) * scale
    dv = probs.T @ grad_o

    pq, pk = feature_map(qh, feature), feature_map(kh, feature)
    a = (pq @ pk.T) * marg
    den = a.sum(dim=-1, keepdim=True) + LINEAR_EPS
    o_l = (a @ vh) / den
    grad_l = grad_proj @ weight
    d_num = grad_l / den
    d_den = -(grad_l * o_l).sum(dim=-1, keepdim=True) / den
    d_a = (d_num @ vh.T + d_den) * marg
    dv = dv + a.T @ d_num
    dq = dq + feature_map_vjp(qh, d_a @ pk, feature)
    dk = dk + feature_map_vjp(kh, d_a.T @ pq, feature)
    return dq, dk, dv, o_l


def attention_backward(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    routing: Routing,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    block_q: int,
    block_kv: int,
    feature: str,
    linear: str,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients (dq, dk, dv, dproj_weight, dproj_bias, dgate) of `attention_with_routing`,
    written out; dgate is None without a gate.

    With a gate, O = O_s + g * proj(O_l): the projection and the linear branch see g * dO,
    and dg = rowsum(dO * proj(O_l)).

    The formula every backward kernel implements, without autograd: it must also run
    where autograd is switched off (inside a device kernel of the operator).
    """
    batch, heads, lq, dim = q.shape
    lk = k.shape[2]
    n_kv = num_blocks(lk, block_kv)
    scale = softmax_scale(dim, scale)
    dtype = compute_dtype(q)
    critical, marginal = _block_classes(routing, n_kv, linear)
    weight = proj_weight.to(dtype)
    dq, dk, dv = (torch.empty(t.shape, dtype=dtype, device=t.device) for t in (q, k, v))
    bias = proj_bias.to(dtype)
    d_weight = torch.zeros_like(weight)
    d_bias = torch.zeros_like(bias)
    d_gate = None if gate is None else torch.empty((batch, heads, lq), dtype=dtype,
                                                   device=q.device)
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh, go = (t[b, h].to(dtype) for t in (q, k, v, grad_out))
            crit = _expand(critical[b, h], lq, lk, block_q, block_kv)
            marg = _expand(marginal[b, h], lq, lk, block_q, block_kv)
            g_rows = None if gate is None else gate[b, h].to(dtype).unsqueeze(-1)
            grad_proj = go if gate is None else g_rows * go
            dq[b, h], dk[b, h], dv[b, h], o_l = _head_backward(
                qh, kh, vh, go, grad_proj, crit, marg, weight, scale, feature
            )
            d_weight += grad_proj.T @ o_l
            d_bias += grad_proj.sum(dim=0)
            if d_gate is not None:
                d_gate[b, h] = (go * (o_l @ weight.T + bias)).sum(dim=-1)
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype),
            d_weight.to(proj_weight.dtype), d_bias.to(proj_bias.dtype),
            None if d_gate is None else d_gate.to(gate.dtype))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor,
    topk: float,
    k_low: float,
    block_q: int,
    block_kv: int,
    feature: str,
    linear: str,
    scale: float | None = None,
    gate: torch.Tensor | None = None,
) -> torch.Tensor:
    """Route, then compute SLA: the whole computation of the design contract, in plain torch."""
    routing = route(q, k, topk, k_low, block_q, block_kv)
    return attention_with_routing(
        q, k, v, routing, proj_weight, proj_bias, block_q, block_kv, feature, linear, scale, gate
    ).out


def full_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None
) -> torch.Tensor:
    """Dense softmax attention, head by head, in the compute dtype (the quality yardstick)."""
    scale = softmax_scale(q.shape[-1], scale)
    dtype = compute_dtype(q)
    batch, heads = q.shape[:2]
    outs = []
    for b in range(batch):
        for h in range(heads):
            qh, kh, vh = (t[b, h].to(dtype) for t in (q, k, v))
            outs.append(torch.softmax((qh @ kh.T) * scale, dim=-1) @ vh)
    return torch.stack(outs).reshape(q.shape[0], heads, q.shape[2], v.shape[-1])
