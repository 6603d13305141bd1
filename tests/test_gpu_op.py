"""torch.ops.sla on the GPU against the float64 reference on the CPU, with the same routing."""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl import reference
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead
from sla_tl.plan import kernels_for
from sla_tl.settings import Settings

from .helpers import random_projection, random_qkv, relative_error

pytestmark = pytest.mark.gpu

BF16_TOLERANCE = 1e-2


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    specs = [
        spec
        for dim in (64, 128)
        for dtype in ("bfloat16", "float16")
        for linear in ("marginal", "global")
        for spec in kernels_for("sm_90a", dim, dtype, Settings(block_q=128, block_kv=64,
                                                               linear=linear))
    ]
    return specs


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


def _cpu64(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().double().cpu() for t in tensors]


def _routing_cpu(routing: sla_tl.Routing) -> sla_tl.Routing:
    return sla_tl.Routing(*(t.cpu() for t in routing))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("lq,lk", [(1000, 1000), (256, 256), (320, 1000)])
@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_forward_and_gradients_match_reference(generator, dtype, dim, lq, lk, linear):
    q, k, v = random_qkv(2, 3, lq, lk, dim, dtype, generator, device="cuda")
    w, b = random_projection(dim, torch.float32, generator, device="cuda")
    settings = dict(block_q=128, block_kv=64, feature_map="softmax", linear=linear)
    routing = sla_tl.route(q, k, 0.1, 0.1, 128, 64)
    leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
    out = sla_tl.attention_with_routing(*leaves[:3], routing, *leaves[3:], **settings)
    grad = torch.randn(out.shape, generator=generator, dtype=torch.float64).to(out)
    out.backward(grad)

    q64, k64, v64, w64, b64, g64 = _cpu64(q, k, v, w, b, grad)
    cpu_routing = _routing_cpu(routing)
    args = (128, 64, "softmax", linear)
    expected = reference.attention_with_routing(q64, k64, v64, cpu_routing, w64, b64, *args).out
    expected_grads = reference.attention_backward(g64, q64, k64, v64, cpu_routing, w64, b64, *args)
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert relative_error(out, expected) < BF16_TOLERANCE
    for name, leaf, ref in zip("q k v weight bias".split(), leaves, expected_grads[:5],
                               strict=True):
        assert torch.isfinite(leaf.grad).all(), name
        assert relative_error(leaf.grad, ref) < BF16_TOLERANCE, name


def test_routing_on_gpu_selects_the_top_blocks(generator):
    q, k, _ = random_qkv(2, 4, 1000, 2000, 128, torch.bfloat16, generator, device="cuda")
    routing = sla_tl.route(q, k, 0.1, 0.1, 128, 64)
    scores = reference.block_scores(q.float().cpu(), k.float().cpu(), 128, 64)
    picked = torch.gather(scores, -1, routing.lut.long().cpu())
    others = scores.scatter(-1, routing.lut.long().cpu(), float("-inf"))
    # Ties aside, every critical block scores at least as high as every other block.
    assert (picked.amin(-1) >= others.amax(-1) - 1e-4).all()
    assert (routing.lut.diff(dim=-1) > 0).all()


def test_op_is_captured_in_a_cuda_graph(generator):
    q, k, v = random_qkv(1, 4, 2000, 2000, 128, torch.bfloat16, generator, device="cuda")
    w, b = random_projection(128, torch.float32, generator, device="cuda")

    def step():
        return torch.ops.sla.attention(q, k, v, w, b, 0.1, 0.0, 128, 64)

    eager = step()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()  # warm-up on a side stream, as graph capture requires
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    q.copy_(torch.randn(q.shape, generator=generator).to(q))
    graph.replay()
    torch.cuda.synchronize()
    assert relative_error(captured, step()) < 1e-6, "replay must recompute from the new q"
    assert relative_error(captured, eager) > 1e-3


@pytest.mark.parametrize("linear", ["marginal", "global"])
def test_autocast_around_a_call_changes_no_bit(generator, linear):
    """Under a bfloat16 autocast region (a training loop's), the routed op's torch steps keep
    their dtypes (the selection kernel reads float32 scores): outputs and gradients are the
    ones without autocast, bit for bit."""
    q, k, v = random_qkv(1, 3, 1000, 777, 128, torch.bfloat16, generator, device="cuda")
    w, b = random_projection(128, torch.float32, generator, device="cuda")

    def run() -> list[torch.Tensor]:
        leaves = [t.clone().requires_grad_() for t in (q, k, v, w, b)]
        out = torch.ops.sla.attention(*leaves[:3], *leaves[3:], 0.1, 0.1, 128, 64,
                                      linear=linear)
        return [out, *torch.autograd.grad(out.float().square().sum(), leaves)]

    plain = run()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        under_autocast = run()
    assert torch.isfinite(plain[0]).all()
    for name, a, c in zip("out dq dk dv dw db".split(), plain, under_autocast, strict=True):
        assert a.dtype == c.dtype and torch.equal(a, c), name
