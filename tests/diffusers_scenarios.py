"""What each rank runs in the diffusers context-parallel test (spawned ranks import it).

diffusers' own `enable_parallelism` needs an accelerator per rank, so on the CPU the test
hands the SLA processor a context-parallel config the way `enable_parallelism` would (its
Ulysses mesh over the test's gloo group) and calls one self-attention layer on this rank's
shard of the sequence; the GPU test uses `enable_parallelism` itself.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from .helpers import relative_error

# A tiny Wan transformer (the CPU diffusers tests use the same): 2 heads of 64.
TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=64,
                in_channels=4, out_channels=4, text_dim=32, freq_dim=32, ffn_dim=64,
                num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                rope_max_seq_len=1024)


def _layer_and_inputs(generator: torch.Generator):
    from diffusers import WanTransformer3DModel

    import sla_tl.diffusers as sla_diffusers

    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = WanTransformer3DModel(**TINY_WAN).eval()
    sla_diffusers.enable_sla(model, topk=0.3)
    with torch.no_grad():  # a trained-looking projection, so the linear branch shows
        for sla in sla_diffusers.sla_modules(model).values():
            sla.proj_l.weight.normal_(0, 0.1, generator=generator)
            sla.proj_l.bias.normal_(0, 0.1, generator=generator)
    latent = torch.randn(1, 4, 2, 64, 64, generator=generator)  # 2 x 32 x 32 tokens
    cos, sin = model.rope(latent)
    hidden = torch.randn(1, cos.shape[1], 128, generator=generator)
    return model.blocks[0].attn1, hidden, (cos, sin)


def _context(ring_degree: int, group: dist.ProcessGroup) -> SimpleNamespace:
    mesh = init_device_mesh("cpu", (dist.get_world_size(group),), mesh_dim_names=("ulysses",))
    return SimpleNamespace(context_parallel_config=SimpleNamespace(
        ring_degree=ring_degree, ulysses_degree=dist.get_world_size(group), _ulysses_mesh=mesh))


def processor_matches_single_process(group: dist.ProcessGroup,
                                     generator: torch.Generator) -> dict:
    """This rank's shard through the processor's Ulysses path, against the same rows of the
    whole sequence through the single-process path; and ring attention refused."""
    attn, hidden, (cos, sin) = _layer_and_inputs(generator)
    with torch.no_grad():
        whole = attn(hidden, rotary_emb=(cos, sin))
        rank, world = dist.get_rank(group), dist.get_world_size(group)
        rows = slice(rank * hidden.shape[1] // world, (rank + 1) * hidden.shape[1] // world)
        attn.processor._parallel_config = _context(1, group)
        shard = attn(hidden[:, rows], rotary_emb=(cos[:, rows], sin[:, rows]))
        attn.processor._parallel_config = _context(2, group)
        try:
            attn(hidden[:, rows], rotary_emb=(cos[:, rows], sin[:, rows]))
            refused = ""
        except ValueError as error:
            refused = str(error)
    return {"error": relative_error(shard, whole[:, rows]), "ring refused": refused}


def enable_parallelism_matches_one_gpu(group: dist.ProcessGroup,
                                       generator: torch.Generator) -> dict:
    """A Wan transformer with SLA under diffusers' own Ulysses context parallelism
    (`enable_parallelism`, one GPU per rank) against the same transformer on one GPU."""
    import copy

    from diffusers import ContextParallelConfig, WanTransformer3DModel

    import sla_tl.diffusers as sla_diffusers

    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=generator)))
    model = WanTransformer3DModel(**TINY_WAN).eval()
    sla_diffusers.enable_sla(model, topk=0.1)
    with torch.no_grad():
        for sla in sla_diffusers.sla_modules(model).values():
            sla.proj_l.weight.normal_(0, 0.1, generator=generator)
            sla.proj_l.bias.normal_(0, 0.1, generator=generator)
    model = model.to(device, torch.bfloat16)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 64, 64, generator=generator),  # 8192
                  timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 16, 32, generator=generator))
    inputs = {name: x.to(device, torch.bfloat16 if x.is_floating_point() else x.dtype)
              for name, x in inputs.items()}
    single = copy.deepcopy(model)
    with torch.no_grad():
        expected = single(**inputs, return_dict=False)[0]
        model.enable_parallelism(config=ContextParallelConfig(
            ulysses_degree=dist.get_world_size(group)))
        got = model(**inputs, return_dict=False)[0]
    return {"error": relative_error(got, expected)}
