"""SLA inside a real diffusers client: a tiny random WanTransformer3DModel on the CPU
(2 layers, 2 heads of 64, 2048 tokens)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
safetensors_torch = pytest.importorskip("safetensors.torch")

from diffusers import WanTransformer3DModel  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.version import Version  # noqa: E402

import sla_tl.diffusers as sla_diffusers  # noqa: E402  (needs diffusers)

from .diffusers_scenarios import TINY_WAN  # noqa: E402
from .helpers import relative_error  # noqa: E402
from .rank_harness import run_on_ranks  # noqa: E402


@pytest.fixture
def wan(generator) -> WanTransformer3DModel:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    return WanTransformer3DModel(**TINY_WAN).eval()


@pytest.fixture
def inputs(generator) -> dict:
    """A 2-frame 64x64 latent (2 x 32 x 32 = 2048 tokens), a timestep, 16 text tokens."""
    return dict(hidden_states=torch.randn(1, 4, 2, 64, 64, generator=generator),
                timestep=torch.tensor([500]),
                encoder_hidden_states=torch.randn(1, 16, 32, generator=generator))


def _randomise_projections(transformer, generator) -> None:
    with torch.no_grad():
        for module in sla_diffusers.sla_modules(transformer).values():
            module.proj_l.weight.copy_(torch.randn(64, 64, generator=generator) / 8)
            module.proj_l.bias.copy_(torch.randn(64, generator=generator) / 10)


def _projections(transformer) -> dict[str, torch.Tensor]:
    return {k: v for k, v in transformer.state_dict().items() if ".sla.proj_l." in k}


def test_tested_diffusers_range_holds_the_installed_version():
    tomllib = pytest.importorskip("tomllib")
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    extra = [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["diffusers"]]
    (wanted,) = [r for r in extra if r.name == "diffusers"]
    assert Version(diffusers.__version__) in wanted.specifier


def test_sla_at_topk_one_agrees_with_dense(wan, inputs):
    dense = wan(**inputs).sample
    sla = copy.deepcopy(wan)
    assert sla_diffusers.enable_sla(sla, topk=1.0) == ["blocks.0.attn1", "blocks.1.attn1"]
    assert relative_error(sla(**inputs).sample, dense) < 1e-5


def test_fused_projections_agree_with_dense(wan, inputs):
    dense = wan(**inputs).sample
    sla_diffusers.enable_sla(wan, topk=1.0)
    wan.fuse_qkv_projections()
    assert wan.blocks[0].attn1.fused_projections
    assert relative_error(wan(**inputs).sample, dense) < 1e-5


def test_only_self_attention_gets_sla(wan):
    before = dict(wan.attn_processors)
    sla_diffusers.enable_sla(wan, topk=0.2, preset="sla-1")
    for name, processor in wan.attn_processors.items():
        if ".attn1." in name:
            assert isinstance(processor, sla_diffusers.SLAWanAttnProcessor)
        else:
            assert processor is before[name]
    assert sorted(sla_diffusers.sla_modules(wan)) == ["blocks.0.attn1.sla", "blocks.1.attn1.sla"]
    assert sla_diffusers.sla_modules(wan)["blocks.0.attn1.sla"].linear == "marginal"


def test_forward_and_backward_reach_the_projection(wan, inputs, generator):
    dense = wan(**inputs).sample
    sla_diffusers.enable_sla(wan, topk=0.25)
    _randomise_projections(wan, generator)
    out = wan(**inputs).sample
    assert torch.isfinite(out).all()
    assert relative_error(out, dense) > 1e-3  # SLA runs: a quarter of the key blocks
    out.square().mean().backward()
    for name, param in wan.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
        if ".sla.proj_l." in name:
            assert param.grad.abs().sum() > 0, name


def test_save_and_load_round_trip_keeps_the_projection_float32(wan, inputs, generator, tmp_path):
    sla_diffusers.enable_sla(wan, topk=0.3)
    _randomise_projections(wan, generator)
    wan.save_pretrained(tmp_path)
    saved = safetensors_torch.load_file(tmp_path / "diffusion_pytorch_model.safetensors")
    assert {k for k in saved if ".sla." in k} == set(_projections(wan))

    loaded = WanTransformer3DModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    sla_diffusers.enable_sla(loaded, topk=0.3)
    assert sla_diffusers.load_sla_weights(loaded, tmp_path) == 4
    loaded.to(torch.bfloat16)
    for key, value in _projections(loaded).items():
        assert value.dtype == torch.float32, key
        assert torch.equal(value, saved[key]), key

    again = WanTransformer3DModel.from_pretrained(tmp_path).eval()
    sla_diffusers.enable_sla(again, topk=0.3)
    sla_diffusers.load_sla_weights(again, tmp_path)
    assert relative_error(again(**inputs).sample, wan(**inputs).sample) < 1e-6


def test_turbowan_and_turbodiffusion_keys_load(wan, generator, tmp_path):
    sla_diffusers.enable_sla(wan, topk=0.1, preset="turbodiffusion")
    weights = {i: (torch.randn(64, 64, generator=generator), torch.randn(64, generator=generator))
               for i in range(2)}
    turbowan = {f"blocks.{i}.attn1.attn_op.local_attn.proj_l.{p}": t
                for i, (w, b) in weights.items() for p, t in (("weight", w), ("bias", b))}
    turbowan["blocks.0.attn1.to_q.weight"] = torch.zeros(128, 128)  # other keys are ignored
    safetensors_torch.save_file(turbowan, tmp_path / "diffusion_pytorch_model.safetensors")
    assert sla_diffusers.load_turbowan_weights(wan, tmp_path) == 4
    assert torch.equal(wan.blocks[1].attn1.sla.proj_l.weight, weights[1][0])

    native = {k.replace(".attn1.", ".self_attn."): -t for k, t in turbowan.items()
              if "proj_l" in k}
    torch.save(native, tmp_path / "TurboWan2.1-T2V-1.3B-480P.pth")
    sla_diffusers.load_turbowan_weights(wan, tmp_path / "TurboWan2.1-T2V-1.3B-480P.pth")
    assert torch.equal(wan.blocks[0].attn1.sla.proj_l.bias, -weights[0][1])


def test_checkpoints_that_do_not_fit_are_reported_by_path(wan, tmp_path):
    sla_diffusers.enable_sla(wan, topk=0.1)
    damaged = tmp_path / "diffusion_pytorch_model.safetensors"
    damaged.write_bytes(b"\x00" * 64)
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        sla_diffusers.load_sla_weights(wan, tmp_path)
    one_layer = {"blocks.0.attn1.sla.proj_l.weight": torch.zeros(64, 64),
                 "blocks.0.attn1.sla.proj_l.bias": torch.zeros(64)}
    safetensors_torch.save_file(one_layer, damaged)
    with pytest.raises(ValueError, match="2 missing") as error:
        sla_diffusers.load_sla_weights(wan, tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ValueError, match="no such file"):
        sla_diffusers.load_sla_weights(wan, tmp_path / "absent")


def test_bad_calls_name_what_is_wrong(wan):
    with pytest.raises(ValueError, match="enable_sla first"):
        sla_diffusers.set_topk(wan, 0.1)
    with pytest.raises(ValueError, match="topk"):
        sla_diffusers.enable_sla(wan, topk=1.5)
    with pytest.raises(ValueError, match="preset"):
        sla_diffusers.enable_sla(wan, topk=0.1, preset="sla-2")
    with pytest.raises(ValueError, match="self-attention"):
        sla_diffusers.enable_sla(torch.nn.Linear(4, 4), topk=0.1)
    sla_diffusers.enable_sla(wan, topk=0.1)
    with pytest.raises(ValueError, match="already enabled"):
        sla_diffusers.enable_sla(wan, topk=0.1)
    with pytest.raises(ValueError, match="topk"):
        sla_diffusers.set_topk(wan, -0.1)


def _counting_backend(compiles: list):
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    def backend(graph, example_inputs):
        compiles.append(graph)
        same = aot_autograd(fw_compiler=lambda g, _: make_boxed_func(g.forward),
                            bw_compiler=lambda g, _: make_boxed_func(g.forward))
        return same(graph, example_inputs)

    return backend


def test_compiled_transformer_takes_a_new_topk_without_recompiling(wan, inputs, generator):
    sla_diffusers.enable_sla(wan, topk=0.5)
    _randomise_projections(wan, generator)
    compiles = []
    compiled = torch.compile(wan, fullgraph=True, backend=_counting_backend(compiles))
    first = compiled(**inputs).sample
    first.square().mean().backward()
    assert relative_error(first, wan(**inputs).sample) < 1e-6
    compiled_once = len(compiles)
    sla_diffusers.set_topk(wan, 0.25)
    second = compiled(**inputs).sample
    second.square().mean().backward()
    assert len(compiles) == compiled_once  # no recompile
    assert relative_error(second, wan(**inputs).sample) < 1e-6  # and the new topk is used
    assert relative_error(second, first) > 1e-4


def test_context_parallel_ranks_attend_over_the_whole_sequence():
    """With diffusers' context parallelism each rank holds a shard of the tokens; the SLA
    processor attends over the whole sequence (Ulysses), never over the shard alone."""
    results = run_on_ranks(2, ["diffusers processor"], seed=torch.seed() % 2**31)
    for rank, result in enumerate(results["diffusers processor"]):
        assert "failed" not in result, f"rank {rank}:\n{result['failed']}"
        assert result["error"] < 1e-5, (rank, result["error"])
        assert "ring_degree > 1" in result["ring refused"], result["ring refused"]
