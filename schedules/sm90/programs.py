"""Which TileLang program each Hopper kernel is, for its compile-time arguments and schedule
knobs: where a knob picks between TileLang's automatic warp specialisation and a
hand-written schedule, and which knob combinations are refused (a ValueError naming them).

Each tunable program takes `knobs`, the knobs given explicitly; the rest take their
defaults (the kernel module's `default_schedule`).
"""

from __future__ import annotations

from collections.abc import Mapping

from ..archs import merged_knobs
from . import backward_dkdv, backward_dkdv_ws, backward_dq, backward_dq_ws, forward, forward_ws
from . import backward_query as backward_query_module
from . import key_pass as key_pass_module
from .pool import mean_pool
from .reverse_lut import key_major as _key_major
from .select import top_bottom_select


def pool(dim: int, block: int, dtype: str, layout: str):
    """Mean pooling over blocks of rows (routing's block scores)."""
    return mean_pool(dim, block, dtype, layout)


def select(block_map_dtype: str | None = None, float_map: bool = False,
           dim: int | None = None, pooled_scores: bool = False, z_rows: bool = False):
    """Routing's selection of critical and negligible blocks from the block scores; with
    `block_map_dtype`, also the marginal block map (in that dtype) and the rows' flags; with
    `float_map` as well, the map in float32 too; with `pooled_scores`, the scores made from
    the pooled blocks (of head dim `dim`) in the kernel; with `z_rows`, the rows' Z_i too."""
    return top_bottom_select(block_map_dtype, float_map, dim, pooled_scores, z_rows)


def key_major(block_map_dtype: str | None = None, float_map: bool = False):
    """The backward's reverse LUT of a routing; with `block_map_dtype`, also its marginal
    block map (in that dtype); with `float_map` as well, the map in float32 too."""
    return _key_major(block_map_dtype, float_map)


def key_pass(dim: int, block_kv: int, dtype: str, feature: str, layout: str,
             store_blocks: bool, knobs: Mapping, pool_keys: bool = False):
    """Per-key-block linear states (knobs `group`, `threads`, `stores`); with `pool_keys`, also
    routing's pooled K."""
    merged = merged_knobs("key_pass", key_pass_module, dict(dim=dim, block_kv=block_kv), knobs)
    return key_pass_module.key_pass(dim, block_kv, dtype, feature, layout, store_blocks,
                                    **merged, pool_keys=pool_keys)


def _forward(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, layout: str,
             scale: float, knobs: Mapping, gated: bool):
    merged = merged_knobs("forward", forward, dict(dim=dim, block_q=block_q, block_kv=block_kv),
                          knobs)
    variant = merged.pop("warp_specialization")
    entries = merged.pop("entries_per_step")
    if variant not in forward.WARP_SPECIALIZATION:
        raise ValueError(f"warp_specialization must be one of "
                         f"{forward.WARP_SPECIALIZATION}; got {variant!r}")
    if variant == "auto":
        if entries != 1:
            raise ValueError("entries_per_step applies to the hand-written forward only "
                             f"(warp_specialization 'manual' or 'pingpong'); got {entries}")
        return forward.sla_forward(dim, block_q, block_kv, dtype, feature, layout, scale,
                                   **merged, gated=gated)
    if block_q != forward_ws.BLOCK_Q:
        raise ValueError(f"warp_specialization={variant!r} needs block_q={forward_ws.BLOCK_Q}; "
                         f"got {block_q}")
    return forward_ws.sla_forward_ws(dim, block_kv, dtype, feature, layout, scale,
                                     merged["num_stages"], variant == "pingpong", entries,
                                     gated=gated)


def sla_forward(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, layout: str,
                scale: float, knobs: Mapping):
    """The fused SLA forward."""
    return _forward(dim, block_q, block_kv, dtype, feature, layout, scale, knobs, gated=False)


def gated_forward(dim: int, block_q: int, block_kv: int, dtype: str, feature: str, layout: str,
                  scale: float, knobs: Mapping):
    """The fused SLA forward with a gate on the projection term (takes GATE after BIAS)."""
    return _forward(dim, block_q, block_kv, dtype, feature, layout, scale, knobs, gated=True)


def backward_query(dim: int, block_q: int, dtype: str, feature: str, layout: str,
                   knobs: Mapping):
    """The backward's query pass (delta, linear-branch gradients, linear part of dQ)."""
    merged = merged_knobs("backward_query", backward_query_module, {}, knobs)
    return backward_query_module.backward_query(dim, block_q, dtype, feature, layout,
                                                threads=2 * block_q, **merged)


def gated_backward_query(dim: int, block_q: int, dtype: str, feature: str, layout: str,
                         knobs: Mapping):
    """The query pass of a gated call: takes GATE after BIAS, writes d(gate) to DGATE (last)."""
    merged = merged_knobs("gated_backward_query", backward_query_module, {}, knobs)
    return backward_query_module.backward_query(dim, block_q, dtype, feature, layout,
                                                threads=2 * block_q, gated=True, **merged)


def sla_backward_dq(dim: int, block_q: int, block_kv: int, dtype: str, layout: str,
                    scale: float, knobs: Mapping):
    """dQ over the LUT: TileLang's automatic pipeline, or the hand-written warp-specialised
    schedule (knob `warp_specialization`, see `backward_dq.WARP_SPECIALIZATION`)."""
    merged = merged_knobs("backward_dq", backward_dq,
                          dict(dim=dim, block_q=block_q, block_kv=block_kv), knobs)
    variant = merged.pop("warp_specialization")
    if variant not in backward_dq.WARP_SPECIALIZATION:
        raise ValueError(f"warp_specialization must be one of "
                         f"{backward_dq.WARP_SPECIALIZATION}; got {variant!r}")
    if variant == "auto":
        return backward_dq.backward_dq(dim, block_q, block_kv, dtype, layout, scale, **merged)
    if block_q != backward_dq_ws.BLOCK_Q:
        raise ValueError(f"warp_specialization={variant!r} needs "
                         f"block_q={backward_dq_ws.BLOCK_Q}; got {block_q}")
    # The automatic split's default thread count does not apply here; a count asked for
    # explicitly must be the one this schedule runs.
    if "threads" in knobs and merged["threads"] != backward_dq_ws.THREADS:
        raise ValueError(f"the hand-written dQ (warp_specialization={variant!r}) runs "
                         f"{backward_dq_ws.THREADS} threads; got threads={merged['threads']!r}")
    return backward_dq_ws.backward_dq_ws(dim, block_kv, dtype, layout, scale,
                                         merged["num_stages"], variant == "pingpong")


def sla_backward_dkdv(dim: int, block_q: int, block_kv: int, dtype: str, feature: str,
                      layout: str, scale: float, knobs: Mapping):
    """dK and dV over the reverse LUT, with the linear branch's key-side gradients."""
    merged = merged_knobs("backward_dkdv", backward_dkdv,
                          dict(dim=dim, block_q=block_q, block_kv=block_kv), knobs)
    variant = merged.pop("warp_specialization")
    if variant not in backward_dkdv.WARP_SPECIALIZATION:
        raise ValueError(f"warp_specialization must be one of "
                         f"{backward_dkdv.WARP_SPECIALIZATION}; got {variant!r}")
    if variant == "auto":
        return backward_dkdv.backward_dkdv(dim, block_q, block_kv, dtype, feature, layout,
                                           scale, **merged)
    if block_kv != backward_dkdv_ws.BLOCK_KV or merged["q_slice"] != backward_dkdv_ws.SLICE \
            or merged["linear_first"]:
        raise ValueError(f"warp_specialization='manual' needs block_kv="
                         f"{backward_dkdv_ws.BLOCK_KV}, q_slice={backward_dkdv_ws.SLICE} and "
                         f"linear_first=False; got block_kv={block_kv}, q_slice="
                         f"{merged['q_slice']}, linear_first={merged['linear_first']}")
    return backward_dkdv_ws.backward_dkdv_ws(dim, block_q, dtype, feature, layout, scale,
                                             2 * merged["num_stages"])
