"""The attention implementations `sla-tl bench` times, each built for one case.

Each system is a record (`System`): its builder takes a case and returns
`attend(q, k, v) -> out`; adding a system is one entry of `SYSTEMS`. Dense systems ignore the
sparsity; sparse ones route on every call (sla-tl, thu-ml/SLA) or reuse a mask built on
the first call per input set (FlexAttention, so that only its kernels are timed).
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import sla_tl
from sla_tl import spec

from .suite import Case

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _sdpa(backend: SDPBackend) -> Callable[[Case], Attend]:
    def build(case: Case) -> Attend:
        def attend(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)
        return attend
    return build


def _projection(case: Case) -> tuple[torch.Tensor, torch.Tensor]:
    dim = case.shape.dim
    return (torch.randn(dim, dim, device="cuda") / dim**0.5,
            torch.randn(dim, device="cuda") * 0.1)


def _sla_tl(linear: str) -> Callable[[Case], Attend]:
    def build(case: Case) -> Attend:
        weight, bias = _projection(case)

        def attend(q, k, v):
            return sla_tl.attention(q, k, v, weight, bias, topk=case.topk,
                                    block_q=case.block_q, block_kv=case.block_kv, linear=linear)
        return attend
    return build


def _flex_block_mask(q: torch.Tensor, k: torch.Tensor, case: Case):
    """FlexAttention's BlockMask over exactly the critical blocks of sla-tl's routing."""
    from torch.nn.attention.flex_attention import BlockMask

    routing = sla_tl.route(q, k, case.topk, 0.0, case.block_q, case.block_kv)
    lut, count = routing.lut, routing.lut_count
    n_kv = spec.num_blocks(case.shape.length, case.block_kv)
    # FlexAttention wants one index column per key block; columns past the count are unread.
    indices = lut.new_zeros((*lut.shape[:-1], n_kv))
    indices[..., :lut.shape[-1]] = lut
    return BlockMask.from_kv_blocks(count, indices, BLOCK_SIZE=(case.block_q, case.block_kv),
                                    seq_lengths=(case.shape.length, case.shape.length))


@functools.cache
def _compiled_flex_attention() -> Callable:
    """flex_attention compiled once for the process (each shape and mode recompiles it)."""
    from torch.nn.attention.flex_attention import flex_attention

    # One compiled function serves every shape and mode of the suite: each is a recompile,
    # more than dynamo's default limit of 8 allows.
    torch._dynamo.config.recompile_limit = 64
    # Autotuned: with 64-key blocks, the default backward config of sm90 (128-key tiles)
    # does not divide the block size, and the autotuner's configs do.
    return torch.compile(flex_attention, dynamic=False, mode="max-autotune-no-cudagraphs")


def _flex(case: Case) -> Attend:
    """Compiled FlexAttention, block-sparse over sla-tl's LUT (the sparse branch only)."""
    compiled = _compiled_flex_attention()
    masks: dict[int, object] = {}

    def attend(q, k, v):
        key = q.data_ptr()
        if key not in masks:
            with torch.no_grad():
                masks[key] = _flex_block_mask(q, k, case)
        return compiled(q, k, v, block_mask=masks[key])
    return attend


THU_SLA_MODULE = "sparse_linear_attention"


def _thu_sla(case: Case) -> Attend:
    """thu-ml/SLA's public Triton implementation (its module: routing, sparse and linear
    branches, projection), at the same blocks and topk. Its linear branch spans all key
    blocks (sla-tl's `linear="global"`)."""
    from sparse_linear_attention import SparseLinearAttention

    module = SparseLinearAttention(case.shape.dim, case.topk, feature_map="softmax",
                                   BLKQ=case.block_q, BLKK=case.block_kv,
                                   use_bf16=case.shape.dtype == "bfloat16").cuda()
    return module


def _always() -> str | None:
    return None


def _needs_thu_sla() -> str | None:
    if importlib.util.find_spec(THU_SLA_MODULE) is None:
        return (f"the `{THU_SLA_MODULE}` package is not installed "
                "(pip install git+https://github.com/thu-ml/SLA)")
    return None


class System(NamedTuple):
    """One attention implementation the bench can time."""

    name: str
    dense: bool
    """Dense attention (sparsity ignored; the speedups' denominators are among these)."""
    build: Callable[[Case], Attend]
    missing: Callable[[], str | None]
    """Why it cannot run in this environment, or None when it can."""
    color: str
    """Its colour in both panels of the plot."""


SYSTEMS: dict[str, System] = {s.name: s for s in (
    System("sdpa_cudnn", True, _sdpa(SDPBackend.CUDNN_ATTENTION), _always, "black"),
    System("sdpa_flash", True, _sdpa(SDPBackend.FLASH_ATTENTION), _always, "tab:gray"),
    System("flex_sparse", False, _flex, _always, "tab:blue"),
    System("thu_sla", False, _thu_sla, _needs_thu_sla, "tab:green"),
    # The linear branch over the marginal blocks (thu-ml/SLA's SLA-1) and over all blocks
    # (thu-ml/SLA main, the like-for-like comparison with `thu_sla`).
    System("sla_tl", False, _sla_tl("marginal"), _always, "tab:red"),
    System("sla_tl_global", False, _sla_tl("global"), _always, "tab:orange"),
)}
DENSE = frozenset(name for name, s in SYSTEMS.items() if s.dense)
# Speedups are against this one, measured in the same run.
REFERENCE_SYSTEM = "sdpa_cudnn"
# The only system whose speedup the throughput gate checks.
GATED_SYSTEM = "sla_tl"


def unavailable(name: str) -> str | None:
    """Why system `name` cannot run in this environment, or None when it can."""
    if name not in SYSTEMS:
        return f"unknown system (known: {', '.join(SYSTEMS)})"
    return SYSTEMS[name].missing()
