"""What each rank runs in the sequence-parallel tests (spawned ranks import them by name).

Every scenario takes the process group and a generator seeded alike on every rank, so all
ranks draw the same whole-sequence inputs; each rank compares its shard of the Ulysses
result with the same slice of the single-process result, which it computes itself.
A scenario returns plain numbers and strings; the tests judge them.
"""

from __future__ import annotations

import copy
import functools
import importlib.util
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import sla_tl
from sla_tl.sequence_collectives import head_axis, sequence_axis

from .helpers import relative_error

DIM = 64
# Every branch shows in the output: critical, marginal and negligible blocks.
OPTIONS = dict(topk=0.3, k_low=0.2, block_q=16, block_kv=16)


def _draw(generator: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=generator, dtype=torch.float64)


def _whole(generator: torch.Generator, layout: str, heads: int, lq: int, lk: int,
           batch: int = 2) -> list[torch.Tensor]:
    """q, k, v of the whole sequence in `layout`, and a non-zero projection."""
    def tensor(length: int) -> torch.Tensor:
        shape = (batch, length, heads, DIM) if layout == "bshd" else (batch, heads, length, DIM)
        return _draw(generator, *shape)

    return [tensor(lq), tensor(lk), tensor(lk), _draw(generator, DIM, DIM) / DIM**0.5,
            _draw(generator, DIM) * 0.1]


def _rows(x: torch.Tensor, axis: int, index: int, count: int) -> torch.Tensor:
    """Rows [index * count, (index + 1) * count) along `axis`: shard `index` of `count` rows."""
    return x.narrow(axis, index * count, count)


def _pad(x: torch.Tensor, axis: int, length: int) -> torch.Tensor:
    zeros = x.new_zeros(*x.shape[:axis], length - x.shape[axis], *x.shape[axis + 1:])
    return torch.cat([x, zeros], dim=axis)


def _leaves(*tensors: torch.Tensor) -> list[torch.Tensor]:
    return [t.detach().clone().requires_grad_() for t in tensors]


def _summed(grad: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """The sum of `grad` over the group, as the caller's gradient reduction makes it."""
    total = grad.clone()
    dist.all_reduce(total, group=group)
    return total


def _raised(call: Callable[[], object]) -> dict:
    """The TypeError or ValueError `call` raised on this rank, if any."""
    try:
        call()
    except (TypeError, ValueError) as error:
        return {"type": type(error).__name__, "message": str(error)}
    return {"type": None, "message": ""}


# ---------------------------------------------------------------- the functional form


def matches_single_process(group, generator, *, layout: str, shard_q: int, shard_k: int,
                           options: dict, check_shards: bool = True) -> dict:
    """`ulysses_attention` on this rank's shards against `sla_tl.attention` on the whole
    sequence: relative errors of the output and every gradient (float64)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    axis, heads = sequence_axis(layout), 2 * world
    q, k, v, w, b = _whole(generator, layout, heads, shard_q * world, shard_k * world)
    whole = _leaves(q, k, v, w, b)
    expected = sla_tl.attention(*whole, layout=layout, **options)
    grad_out = _draw(generator, *expected.shape)
    expected.backward(grad_out)

    mine = _leaves(_rows(q, axis, rank, shard_q), _rows(k, axis, rank, shard_k),
                   _rows(v, axis, rank, shard_k), w, b)
    out = sla_tl.ulysses_attention(*mine, group=group, layout=layout, check_shards=check_shards,
                                   **options)
    out.backward(_rows(grad_out, axis, rank, shard_q))

    # Before the reduction, a rank's projection gradient is that of its own heads.
    own = _leaves(*(_rows(x, head_axis(layout), rank, 2) for x in (q, k, v)), w, b)
    sla_tl.attention(*own, layout=layout, **options).backward(
        _rows(grad_out, head_axis(layout), rank, 2))
    return {
        "out": relative_error(out, _rows(expected, axis, rank, shard_q)),
        "dq": relative_error(mine[0].grad, _rows(whole[0].grad, axis, rank, shard_q)),
        "dk": relative_error(mine[1].grad, _rows(whole[1].grad, axis, rank, shard_k)),
        "dv": relative_error(mine[2].grad, _rows(whole[2].grad, axis, rank, shard_k)),
        "dproj_weight": relative_error(_summed(mine[3].grad, group), whole[3].grad),
        "dproj_bias": relative_error(_summed(mine[4].grad, group), whole[4].grad),
        "dproj_weight own heads": relative_error(mine[3].grad, own[3].grad),
        "dproj_bias own heads": relative_error(mine[4].grad, own[4].grad),
    }


def padded_matches_single_process(group, generator) -> dict:
    """A sequence P does not divide, padded at its end, with its true lengths passed:
    equal to the single-process result, zeros in the padded rows (float64)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    axis, shard_q, shard_k = 1, 19, 23
    # As little padding as `shard_sequence` adds: fewer than P rows.
    lq, lk = shard_q * world - (world - 1), shard_k * world - 1
    q, k, v, w, b = _whole(generator, "bshd", 2 * world, lq, lk)
    whole = _leaves(q, k, v, w, b)
    expected = sla_tl.attention(*whole, layout="bshd", **OPTIONS)
    grad_out = _draw(generator, *expected.shape)
    expected.backward(grad_out)

    def shard(x: torch.Tensor, count: int) -> torch.Tensor:
        return _rows(_pad(x, axis, count * world), axis, rank, count)

    mine = _leaves(shard(q, shard_q), shard(k, shard_k), shard(v, shard_k), w, b)
    out = sla_tl.ulysses_attention(*mine, group=group, layout="bshd", q_length=lq,
                                   kv_length=lk, **OPTIONS)
    out.backward(shard(grad_out, shard_q))
    return {
        "out": relative_error(out, shard(expected.detach(), shard_q)),
        "dq": relative_error(mine[0].grad, shard(whole[0].grad, shard_q)),
        "dk": relative_error(mine[1].grad, shard(whole[1].grad, shard_k)),
        "dv": relative_error(mine[2].grad, shard(whole[2].grad, shard_k)),
        "dproj_weight": relative_error(_summed(mine[3].grad, group), whole[3].grad),
        "dproj_bias": relative_error(_summed(mine[4].grad, group), whole[4].grad),
        "shard_sequence": relative_error(sla_tl.shard_sequence(q, 1, group), shard(q, shard_q)),
    }


def compiled_matches_eager(group, generator) -> dict:
    """torch.compile(fullgraph=True) of `ulysses_attention` (functional collectives in the
    graph; aot_eager keeps the CPU test fast) against the eager call, float64."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    shard = 19
    q, k, v, w, b = (_rows(x, 1, rank, shard) if x.dim() == 4 else x
                     for x in _whole(generator, "bshd", 2 * world, shard * world, shard * world))
    grad_out = _draw(generator, *q.shape)

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        return sla_tl.ulysses_attention(*tensors, group=group, layout="bshd", **OPTIONS)

    torch._dynamo.reset()
    compiled = torch.compile(call, fullgraph=True, backend="aot_eager")
    results = []
    for fn in (call, compiled):
        leaves = _leaves(q, k, v, w, b)
        out = fn(*leaves)
        out.backward(grad_out)
        results.append([out, *(x.grad for x in leaves)])
    names = ("out", "dq", "dk", "dv", "dproj_weight", "dproj_bias")
    return {name: relative_error(c, e) for name, e, c in zip(names, *results, strict=True)}


# ---------------------------------------------------------------- the module form


def _module_pair(generator, layout: str) -> tuple[sla_tl.SparseLinearAttention, torch.nn.Module]:
    inner = sla_tl.SparseLinearAttention(DIM, OPTIONS["topk"], BLKQ=16, BLKK=16,
                                         k_low=OPTIONS["k_low"], layout=layout)
    with torch.no_grad():
        inner.proj_l.weight.copy_(_draw(generator, DIM, DIM) / DIM**0.5)
        inner.proj_l.bias.copy_(_draw(generator, DIM) * 0.1)
    return inner, copy.deepcopy(inner)


def module_matches_single_process(group, generator, *, layout: str, ddp: bool = False) -> dict:
    """`UlyssesAttention` on shards against its module on the whole sequence (the module
    computes in bfloat16; inputs float32). With `ddp`, the wrapper runs inside
    DistributedDataParallel, whose averaged projection gradient times P must be the
    single-process gradient."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    axis, shard_q, shard_k = sequence_axis(layout), 19, 27
    q, k, v = (x.float() for x in _whole(generator, layout, 2 * world, shard_q * world,
                                         shard_k * world, batch=1)[:3])
    inner, copied = _module_pair(generator, layout)
    whole = _leaves(q, k, v)
    expected, expected_density = inner(*whole, return_sparsity=True)
    grad_out = _draw(generator, *expected.shape).float()
    expected.backward(grad_out)

    wrapper = sla_tl.UlyssesAttention(copied, group)
    model = DistributedDataParallel(wrapper, process_group=group) if ddp else wrapper
    mine = _leaves(_rows(q, axis, rank, shard_q), _rows(k, axis, rank, shard_k),
                   _rows(v, axis, rank, shard_k))
    out, density = model(*mine, return_sparsity=True)
    out.backward(_rows(grad_out, axis, rank, shard_q))
    proj = wrapper.attention.proj_l
    reduce = ((lambda g: g * world) if ddp else functools.partial(_summed, group=group))
    return {
        "out": relative_error(out, _rows(expected, axis, rank, shard_q)),
        "dq": relative_error(mine[0].grad, _rows(whole[0].grad, axis, rank, shard_q)),
        "dk": relative_error(mine[1].grad, _rows(whole[1].grad, axis, rank, shard_k)),
        "dv": relative_error(mine[2].grad, _rows(whole[2].grad, axis, rank, shard_k)),
        "dproj_weight": relative_error(reduce(proj.weight.grad), inner.proj_l.weight.grad),
        "dproj_bias": relative_error(reduce(proj.bias.grad), inner.proj_l.bias.grad),
        "density": abs(density - expected_density),
    }


# ---------------------------------------------------------------- bad inputs


def _bad_call(group, generator, edit: Callable[[int, int, list, dict], None]) -> dict:
    """A valid call on shards of 16 rows, bshd, after `edit(rank, world, tensors, kwargs)`
    has spoilt it on some ranks: the error each rank raised."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tensors = [_rows(x, 1, rank, 16) if x.dim() == 4 else x
               for x in _whole(generator, "bshd", 2 * world, 16 * world, 16 * world)]
    kwargs = dict(group=group, layout="bshd", **OPTIONS)
    edit(rank, world, tensors, kwargs)
    return _raised(lambda: sla_tl.ulysses_attention(*tensors, **kwargs))


def _heads_not_divisible(rank, world, tensors, kwargs):
    tensors[:3] = [x[:, :, : world + 1] for x in tensors[:3]]


def _unequal_q_shards(rank, world, tensors, kwargs):
    if rank == 0:
        tensors[0] = torch.cat([tensors[0], tensors[0][:, :1]], dim=1)


def _unequal_kv_shards(rank, world, tensors, kwargs):
    if rank == world - 1:
        tensors[1:3] = [x[:, :15] for x in tensors[1:3]]


def _dtype_differs(rank, world, tensors, kwargs):
    if rank == world - 1:
        tensors[:3] = [x.float() for x in tensors[:3]]


def _topk_differs(rank, world, tensors, kwargs):
    if rank == 0:
        kwargs["topk"] = 0.25


def _rejected_on_last_rank(rank, world, tensors, kwargs):
    if rank == world - 1:
        tensors[0] = tensors[0][0]


def _q_length_out_of_range(rank, world, tensors, kwargs):
    kwargs["q_length"] = 16 * world + 1


def _sparse_q(rank, world, tensors, kwargs):
    tensors[0] = tensors[0].to_sparse()


def _bad_group(rank, world, tensors, kwargs):
    kwargs["group"] = "world"


def shard_sequence_bad_dim(group, generator) -> dict:
    """`shard_sequence` along an axis x does not have."""
    return _raised(lambda: sla_tl.shard_sequence(_draw(generator, 2, 8), 2, group))


def wrapper_of_another_module(group, generator) -> dict:
    """`UlyssesAttention` of something that is not a SparseLinearAttention."""
    return _raised(lambda: sla_tl.UlyssesAttention(torch.nn.Linear(DIM, DIM), group))


_BAD_EDITS = {
    "heads not divisible": _heads_not_divisible,
    "unequal q shards": _unequal_q_shards,
    "unequal kv shards": _unequal_kv_shards,
    "dtype differs": _dtype_differs,
    "topk differs": _topk_differs,
    "rejected on last rank": _rejected_on_last_rank,
    "q_length out of range": _q_length_out_of_range,
    "sparse q": _sparse_q,
    "group not a ProcessGroup": _bad_group,
}

BAD_INPUTS: list[str] = [*_BAD_EDITS, "shard_sequence bad dim", "wrapper of another module"]

# The valid calls come after the bad ones: a rejected call must leave the ranks in step.
MATCHES: list[str] = [
    "bshd Lq=Lk", "bshd Lq!=Lk global elu scale", "bhsd Lq=Lk relu unchecked",
    "bhsd Lq!=Lk", "padded", "module bshd", "module bhsd in DDP", "compiled",
]

SCENARIOS: dict[str, Callable[[dist.ProcessGroup, torch.Generator], dict]] = {
    **{name: functools.partial(_bad_call, edit=edit) for name, edit in _BAD_EDITS.items()},
    "shard_sequence bad dim": shard_sequence_bad_dim,
    "wrapper of another module": wrapper_of_another_module,
    "bshd Lq=Lk": functools.partial(matches_single_process, layout="bshd", shard_q=19,
                                    shard_k=19, options=OPTIONS),
    "bshd Lq!=Lk global elu scale": functools.partial(
        matches_single_process, layout="bshd", shard_q=19, shard_k=29,
        options=dict(OPTIONS, block_kv=32, linear="global", feature_map="elu", scale=0.2)),
    "bhsd Lq=Lk relu unchecked": functools.partial(
        matches_single_process, layout="bhsd", shard_q=23, shard_k=23,
        options=dict(OPTIONS, k_low=0.1, feature_map="relu"), check_shards=False),
    "bhsd Lq!=Lk": functools.partial(matches_single_process, layout="bhsd", shard_q=13,
                                     shard_k=27, options=dict(OPTIONS, block_q=32)),
    "padded": padded_matches_single_process,
    "module bshd": functools.partial(module_matches_single_process, layout="bshd"),
    "module bhsd in DDP": functools.partial(module_matches_single_process, layout="bhsd",
                                            ddp=True),
    "compiled": compiled_matches_eager,
    "diffusers processor": lambda group, generator: _diffusers_scenario(group, generator),
}


def _diffusers_scenario(group: dist.ProcessGroup, generator: torch.Generator) -> dict:
    from .diffusers_scenarios import processor_matches_single_process  # needs diffusers

    return processor_matches_single_process(group, generator)


# ---------------------------------------------------------------- NCCL, one GPU per rank


def _gpu_whole(generator, layout: str, lq: int, lk: int) -> list[torch.Tensor]:
    """bf16 q, k, v of 8 heads, D=128, on this rank's GPU, and a float32 projection."""
    device = torch.device("cuda", torch.cuda.current_device())
    shape = (lambda n: (1, n, 8, 128)) if layout == "bshd" else (lambda n: (1, 8, n, 128))
    q, k, v = (_draw(generator, *shape(n)).to(device, torch.bfloat16) for n in (lq, lk, lk))
    weight, bias = _draw(generator, 128, 128) / 128**0.5, _draw(generator, 128) * 0.1
    return [q, k, v, weight.to(device, torch.float32), bias.to(device, torch.float32)]


GPU_OPTIONS = dict(topk=0.1, k_low=0.1, block_q=128, block_kv=64)


def nccl_matches_single_gpu(group, generator, *, layout: str, shard_q: int, shard_k: int,
                            compiled: bool = False) -> dict:
    """`ulysses_attention` over NCCL (TileLang kernels) against `sla_tl.attention` on the
    whole sequence on this rank's GPU; with `compiled`, the Ulysses call goes through
    torch.compile(fullgraph=True) with inductor."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    axis = sequence_axis(layout)
    q, k, v, w, b = _gpu_whole(generator, layout, shard_q * world, shard_k * world)
    whole = _leaves(q, k, v, w, b)
    expected = sla_tl.attention(*whole, layout=layout, **GPU_OPTIONS)
    grad_out = _draw(generator, *expected.shape).to(expected)
    expected.backward(grad_out)

    def call(*tensors: torch.Tensor) -> torch.Tensor:
        return sla_tl.ulysses_attention(*tensors, group=group, layout=layout, **GPU_OPTIONS)

    fn = torch.compile(call, fullgraph=True) if compiled else call
    mine = _leaves(_rows(q, axis, rank, shard_q), _rows(k, axis, rank, shard_k),
                   _rows(v, axis, rank, shard_k), w, b)
    out = fn(*mine)
    out.backward(_rows(grad_out, axis, rank, shard_q))
    return {
        "out": relative_error(out, _rows(expected, axis, rank, shard_q)),
        "dq": relative_error(mine[0].grad, _rows(whole[0].grad, axis, rank, shard_q)),
        "dk": relative_error(mine[1].grad, _rows(whole[1].grad, axis, rank, shard_k)),
        "dv": relative_error(mine[2].grad, _rows(whole[2].grad, axis, rank, shard_k)),
        "dproj_weight": relative_error(_summed(mine[3].grad, group), whole[3].grad),
        "dproj_bias": relative_error(_summed(mine[4].grad, group), whole[4].grad),
    }


def nccl_rejects_cpu_tensors(group, generator) -> dict:
    """CPU shards on an NCCL group (which serves cuda tensors only)."""
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    tensors = [_rows(x, 1, rank, 16) if x.dim() == 4 else x
               for x in _whole(generator, "bshd", 2 * world, 16 * world, 16 * world)]
    return _raised(lambda: sla_tl.ulysses_attention(*tensors, group=group, layout="bshd",
                                                    **OPTIONS))


GPU_MATCHES: list[str] = ["nccl bshd Lq!=Lk", "nccl bhsd Lq=Lk", "nccl compiled"]

GPU_SCENARIOS: dict[str, Callable[[dist.ProcessGroup, torch.Generator], dict]] = {
    "nccl rejects cpu tensors": nccl_rejects_cpu_tensors,
    "nccl bshd Lq!=Lk": functools.partial(nccl_matches_single_gpu, layout="bshd",
                                          shard_q=1000, shard_k=900),
    "nccl bhsd Lq=Lk": functools.partial(nccl_matches_single_gpu, layout="bhsd",
                                         shard_q=1024, shard_k=1024),
    "nccl compiled": functools.partial(nccl_matches_single_gpu, layout="bshd",
                                       shard_q=1000, shard_k=1000, compiled=True),
    "nccl diffusers enable_parallelism": lambda group, generator: _diffusers_gpu_scenario(
        group, generator),
}


def _diffusers_gpu_scenario(group: dist.ProcessGroup, generator: torch.Generator) -> dict:
    from .diffusers_scenarios import enable_parallelism_matches_one_gpu

    if importlib.util.find_spec("diffusers") is None:  # an optional extra
        return {"skipped": "diffusers is not installed"}
    return enable_parallelism_matches_one_gpu(group, generator)
SCENARIOS.update(GPU_SCENARIOS)
