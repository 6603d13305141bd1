"""SLA in diffusers' WanTransformer3DModel on the GPU, at a Wan2.1-1.3B layer's shape: one
transformer block of dim 1536 (12 heads of 128), a 480p latent of 21 x 60 x 104 (32760
tokens), 512 text tokens, bf16."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import WanTransformer3DModel  # noqa: E402

import sla_tl.diffusers as sla_diffusers  # noqa: E402  (needs diffusers)
from sla_tl.kernels import KernelSpec
from sla_tl.parallel import compile_ahead  # noqa: E402
from sla_tl.plan import kernels_for  # noqa: E402
from sla_tl.settings import Settings  # noqa: E402

from .helpers import relative_error  # noqa: E402

pytestmark = pytest.mark.gpu

BF16_TOLERANCE = 2e-2
WAN_1_3B_LAYER = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128,
                      in_channels=16, out_channels=16, text_dim=4096, freq_dim=256,
                      ffn_dim=8960, num_layers=1, cross_attn_norm=True,
                      qk_norm="rms_norm_across_heads")


def kernels_ahead() -> list[KernelSpec]:
    """The kernels this module's tests build (compiled ahead by its fixture, and by
    `python -m tests.compile_ahead` on a machine without a GPU)."""
    specs = [spec for block_q in (64, 128)
             for spec in kernels_for("sm_90a", 128, "bfloat16",
                                     Settings(block_q=block_q, block_kv=64, linear="global",
                                              layout="bshd"))]
    return specs


@pytest.fixture(scope="module", autouse=True)
def compiled_kernels():
    """Compile `kernels_ahead()` in parallel, in one pool, before the first test needs one (a
    kernel that fails is reported by the tests that build it)."""
    compile_ahead(kernels_ahead())


@pytest.fixture
def wan() -> WanTransformer3DModel:
    torch.manual_seed(0)
    return WanTransformer3DModel(**WAN_1_3B_LAYER).to("cuda", torch.bfloat16).eval()


@pytest.fixture
def inputs() -> dict:
    g = torch.Generator(device="cuda").manual_seed(1)
    return dict(
        hidden_states=torch.randn(1, 16, 21, 60, 104, generator=g, device="cuda",
                                  dtype=torch.bfloat16),
        timestep=torch.tensor([500], device="cuda"),
        encoder_hidden_states=torch.randn(1, 512, 4096, generator=g, device="cuda",
                                          dtype=torch.bfloat16))


def _randomise_projections(transformer) -> None:
    g = torch.Generator(device="cuda").manual_seed(2)
    with torch.no_grad():
        for module in sla_diffusers.sla_modules(transformer).values():
            module.proj_l.weight.copy_(torch.randn(128, 128, generator=g, device="cuda") / 11)
            module.proj_l.bias.copy_(torch.randn(128, generator=g, device="cuda") / 10)


@pytest.mark.parametrize("preset", ["thu-ml", "turbodiffusion"])
def test_sla_at_topk_one_agrees_with_dense(wan, inputs, preset):
    with torch.no_grad():
        dense = wan(**inputs).sample
        sla_diffusers.enable_sla(wan, topk=1.0, preset=preset)
        assert relative_error(wan(**inputs).sample, dense) < BF16_TOLERANCE


def test_forward_and_backward_reach_the_projection(wan, inputs):
    sla_diffusers.enable_sla(wan, topk=0.05, preset="turbodiffusion")
    _randomise_projections(wan)
    out = wan(**inputs).sample
    assert torch.isfinite(out).all()
    out.float().square().mean().backward()
    for name, param in wan.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if ".sla.proj_l." in name:
            assert param.dtype == torch.float32
            assert param.grad.abs().sum() > 0, name


def test_compiled_transformer_takes_a_new_topk_without_recompiling(wan, inputs):
    sla_diffusers.enable_sla(wan, topk=0.1, preset="turbodiffusion")
    _randomise_projections(wan)
    compiles = []

    def counting_inductor(graph, example_inputs):
        compiles.append(graph)
        from torch._inductor.compile_fx import compile_fx

        return compile_fx(graph, example_inputs)

    compiled = torch.compile(wan, fullgraph=True, backend=counting_inductor)
    with torch.no_grad():
        first = compiled(**inputs).sample
        assert relative_error(first, wan(**inputs).sample) < BF16_TOLERANCE
        compiled_once = len(compiles)
        sla_diffusers.set_topk(wan, 0.05)
        second = compiled(**inputs).sample
        assert len(compiles) == compiled_once
        assert relative_error(second, wan(**inputs).sample) < BF16_TOLERANCE
