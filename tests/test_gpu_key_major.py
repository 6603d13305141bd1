"""The backward's key-major kernel on the GPU (the reverse LUT, marginal map and rows' flags
of a routing, the `key_major_kernel` fusion; the map in float32 too, `key_major_float_map`)
against the torch ops it replaces, on valid and forged routings; and the backward with it
against the backward without it, bit for bit."""

from __future__ import annotations

import pytest
import torch

from sla_tl import routing, tilelang_backend
from sla_tl.kernels import KernelSpec, compiled
from sla_tl.parallel import compile_ahead
from sla_tl.plan import kernels_for
from sla_tl.routing import Routing
from sla_tl.settings import Settings

from .helpers import random_projection, random_qkv

pytestmark = pytest.mark.gpu

ARCH = "sm_90a"
MAP_DTYPES = ("bfloat16", "float16", "float32")
FUSION = ("key_major_kernel",)
FLOAT_MAP_FUSIONS = ("key_major_kernel", "key_major_float_map")


def _spec(block_map_dtype: str | None, float_map: bool = False) -> KernelSpec:
    args = () if block_map_dtype is None else (("block_map_dtype", block_map_dtype),)
    return KernelSpec("key_major", args + ((("float_map", True),) if float_map else ()), ARCH)


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    specs = [_spec(dtype) for dtype in (None, *MAP_DTYPES)]
    specs += [_spec(dtype, float_map=True) for dtype in MAP_DTYPES]
    for linear in ("marginal", "global"):
        for fusions in ((), FUSION, *([FLOAT_MAP_FUSIONS] if linear == "marginal" else [])):
            specs += kernels_for(ARCH, 128, "bfloat16",
                                 Settings(block_q=128, block_kv=64, linear=linear),
                                 fusions=fusions)
    return specs


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


def _forged(shape: tuple[int, ...], n_kv: int, width: int,
            generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A LUT with entries outside [0, Nk), repeats and garbage past the counts, and counts
    below 0 and above the width, besides valid ones."""
    lut = torch.randint(-3, n_kv + 3, (*shape, width), generator=generator, dtype=torch.int32)
    count = torch.randint(-1, width + 2, shape, generator=generator, dtype=torch.int32)
    return lut.cuda(), count.cuda()


# (B, H, Mq, Nk, Kc, Kn): one block each way, Kn = 0, more query blocks than a warp's lanes
# several times over (and not a multiple of 128), Mq != Nk both ways, the Wan2.1-1.3B rows,
# the most query blocks the kernel takes and one CTA's key blocks and one more.
SIZES = [(1, 1, 1, 1, 1, 0), (2, 3, 8, 24, 3, 2), (2, 2, 70, 33, 33, 0),
         (1, 3, 300, 129, 7, 5), (1, 2, 256, 512, 25, 0), (1, 1, 4096, 17, 2, 1)]


@pytest.mark.parametrize("block_map_dtype", [None, *MAP_DTYPES])
@pytest.mark.parametrize("b,h,n_q,n_kv,width,neg_width", SIZES)
def test_key_major_kernel_writes_what_the_torch_ops_derive(generator, block_map_dtype, b, h,
                                                           n_q, n_kv, width, neg_width):
    rows = (b, h, n_q)
    lut, count = _forged(rows, n_kv, width, generator)
    neg_lut, neg_count = _forged(rows, n_kv, neg_width, generator)
    forged = Routing(lut, count, neg_lut, neg_count)
    expected, expected_count = routing.reverse_lut(lut, count, n_kv)

    def poisoned(shape: tuple[int, ...], dtype: torch.dtype, value: float) -> torch.Tensor:
        return torch.full(shape, value, dtype=dtype, device="cuda")

    keys = (b, h, n_kv)
    reverse, reverse_count = poisoned((*keys, n_q), torch.int32, -7), poisoned(keys, torch.int32,
                                                                               -7)
    active = poisoned(rows, torch.int32, -7)
    if block_map_dtype is None:
        compiled(_spec(None))(lut, count, reverse, reverse_count, active)
        linear = "global"
    else:
        dtype = getattr(torch, block_map_dtype)
        marginal = poisoned((*rows, n_kv), dtype, float("nan"))
        compiled(_spec(block_map_dtype))(lut, count, neg_lut, neg_count, reverse,
                                         reverse_count, marginal, active)
        torch.cuda.synchronize()
        listed = routing.listing(forged, n_kv, negligible=True)
        assert torch.equal(marginal, routing.marginal_map(listed, dtype))
        linear = "marginal"
        # The variant that also writes the map in float32 (fusion key_major_float_map).
        again = [poisoned(x.shape, x.dtype, -7) for x in (reverse, reverse_count, active)]
        marginal.fill_(float("nan"))
        marginal_f32 = poisoned((*rows, n_kv), torch.float32, float("nan"))
        compiled(_spec(block_map_dtype, float_map=True))(
            lut, count, neg_lut, neg_count, again[0], again[1], marginal, again[2],
            marginal_f32)
        torch.cuda.synchronize()
        assert torch.equal(marginal, routing.marginal_map(listed, dtype))
        assert torch.equal(marginal_f32, routing.marginal_map(listed, torch.float32))
        assert all(torch.equal(a, b) for a, b in zip(again, (reverse, reverse_count, active),
                                                      strict=True))
    torch.cuda.synchronize()
    assert torch.equal(reverse_count, expected_count)
    assert torch.equal(reverse, expected)
    assert torch.equal(active, routing.active_flags(forged, n_kv, linear))


@pytest.mark.parametrize("linear", ["marginal", "global"])
@pytest.mark.parametrize("lq,lk,topk,k_low", [(1500, 2100, 0.1, 0.2), (700, 64, 0.05, 0.0),
                                              (4096, 4096, 0.05, 0.0)])
def test_the_backward_with_the_key_major_kernel_is_the_backward_without_it(generator, linear,
                                                                           lq, lk, topk, k_low):
    q, k, v = random_qkv(2, 3, lq, lk, 128, torch.bfloat16, generator, device="cuda")
    weight, bias = random_projection(128, torch.float32, generator, device="cuda")
    s = Settings(block_q=128, block_kv=64, linear=linear)
    routed = tilelang_backend.route(q, k, topk, k_low, s.block_q, s.block_kv, s.layout)
    saved = tilelang_backend.forward(q, k, v, routed, weight, bias, s, keep_routing=False)
    grad = torch.randn(q.shape, generator=generator).to(q)
    plain = tilelang_backend.backward(grad, q, k, v, saved, routed, weight, bias, s,
                                      keep_routing=False, fusions=())
    names = ("dq", "dk", "dv", "d_weight", "d_bias")
    for fusions in (FUSION, *([FLOAT_MAP_FUSIONS] if linear == "marginal" else [])):
        fused = tilelang_backend.backward(grad, q, k, v, saved, routed, weight, bias, s,
                                          keep_routing=False, fusions=fusions)
        for name, a, b in zip(names, plain[:5], fused[:5], strict=True):
            assert not a.isnan().any(), (fusions, name)
            assert torch.equal(a, b), (fusions, name)
