"""Ulysses sequence parallelism on CPU: gloo groups of 2 and 4 ranks spawned by the test.

Each world size is spawned once (tests.rank_harness) and runs every scenario of
tests.ulysses_scenarios; the tests below judge what each rank returned.
"""

from __future__ import annotations

import pytest
import torch

import sla_tl
from sla_tl.benchmarks import ulysses as ulysses_bench
from sla_tl.rank_agreement import served_device_types

from .helpers import random_projection, random_qkv
from .rank_harness import run_on_ranks
from .ulysses_scenarios import BAD_INPUTS, MATCHES

FLOAT64_TOLERANCE = 1e-12
# The module computes in bfloat16 with float32 accumulation; only the order in which the
# projection's gradient is summed over heads differs from the single-process module.
MODULE_TOLERANCE = 1e-6


@pytest.fixture(scope="module", params=[2, 4], ids=lambda world: f"{world}ranks")
def ranks(request) -> tuple[int, dict[str, list[dict]]]:
    """World size, and per scenario what each rank returned."""
    world = request.param
    return world, run_on_ranks(world, [*BAD_INPUTS, *MATCHES], seed=torch.seed() % 2**31)


def _ran(result: dict, rank: int) -> dict:
    assert "failed" not in result, f"rank {rank}:\n{result['failed']}"
    return result


@pytest.mark.parametrize("scenario", MATCHES)
def test_output_and_gradients_equal_single_process(ranks, scenario):
    _, results = ranks
    tolerance = MODULE_TOLERANCE if scenario.startswith("module") else FLOAT64_TOLERANCE
    for rank, result in enumerate(results[scenario]):
        for name, error in _ran(result, rank).items():
            assert error <= tolerance, f"rank {rank}: {name} relative error {error:.3g}"


def _expected_errors(world: int) -> dict[str, tuple[str, list[str]]]:
    """Per bad input: the error type every rank raises, and what its message must say."""
    every_rank = ", ".join(f"rank {r}: 16" for r in range(1, world))
    return {
        "heads not divisible": ("ValueError", [f"heads ({world + 1}) must be divisible by "
                                               f"the group's size ({world})"]),
        "unequal q shards": ("ValueError", ["q shard length must be the same on every rank",
                                            f"rank 0: 17, {every_rank}", "q_length"]),
        "unequal kv shards": ("ValueError", ["k shard length must be the same on every rank",
                                             f"rank {world - 1}: 15", "kv_length"]),
        "dtype differs": ("ValueError", ["dtype must be the same on every rank",
                                         f"rank {world - 1}: float32"]),
        "topk differs": ("ValueError", ["topk must be the same on every rank",
                                        "rank 0: 0.25", "rank 1: 0.3"]),
        "q_length out of range": ("ValueError", [f"q_length must lie in [1, {16 * world}]"]),
        "sparse q": ("TypeError", ["q must be a dense (strided) tensor"]),
        "group not a ProcessGroup": ("TypeError", ["group must be a torch.distributed "
                                                   "ProcessGroup or None; got str"]),
        "shard_sequence bad dim": ("ValueError", ["dim must be an int axis of x (rank 2)"]),
        "wrapper of another module": ("TypeError", ["attention must be a "
                                                    "sla_tl.SparseLinearAttention; got Linear"]),
    }


@pytest.mark.parametrize("scenario", [s for s in BAD_INPUTS if s != "rejected on last rank"])
def test_bad_input_raises_the_same_error_on_every_rank(ranks, scenario):
    world, results = ranks
    error_type, phrases = _expected_errors(world)[scenario]
    for rank, result in enumerate(results[scenario]):
        raised = _ran(result, rank)
        assert raised["type"] == error_type, f"rank {rank}: {raised}"
        for phrase in phrases:
            assert phrase in raised["message"], f"rank {rank}: {raised['message']}"


def test_input_rejected_on_one_rank_raises_on_every_rank(ranks):
    world, results = ranks
    own_error = "q must have rank 4 (B, L, H, D) for layout 'bshd'"
    for rank, result in enumerate(results["rejected on last rank"]):
        raised = _ran(result, rank)
        assert raised["type"] == "ValueError", f"rank {rank}: {raised}"
        assert own_error in raised["message"], f"rank {rank}: {raised['message']}"
        if rank != world - 1:
            assert f"rejected on another rank of the group; rank {world - 1}: ValueError" \
                in raised["message"]


def test_served_device_types_reads_the_backend_configuration():
    assert served_device_types("cuda:nccl") == ("cuda",)
    assert served_device_types("cpu:gloo,cuda:nccl") == ("cpu", "cuda")
    assert served_device_types("fake") is None


def test_group_must_be_a_process_group(generator):
    q, k, v = random_qkv(1, 2, 32, 32, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)

    class Mesh:
        def get_group(self):
            raise AssertionError("never called")

    with pytest.raises(TypeError, match=r"group must be .* got Mesh \(for a DeviceMesh pass "
                                        r"mesh\.get_group\(\)\)"):
        sla_tl.ulysses_attention(q, k, v, w, b, group=Mesh())


def test_needs_an_initialised_default_group(generator):
    assert not torch.distributed.is_initialized()
    q, k, v = random_qkv(1, 2, 32, 32, 64, torch.float64, generator)
    w, b = random_projection(64, torch.float64, generator)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        sla_tl.ulysses_attention(q, k, v, w, b)
    with pytest.raises(ValueError, match="group: torch.distributed is not initialised"):
        sla_tl.shard_sequence(q, 2)


@pytest.mark.parametrize("argv,message", [
    (["--shape", "1,2"], "--shape wants four positive integers B,L,H,D, got (1, 2)"),
    (["--shape", "1,a,3,4"], "--shape wants B,L,H,D, got '1,a,3,4'"),
    (["--modes", "bwd"], "--modes wants some of fwd, fwd+bwd, got ['bwd']"),
    (["--topk", "0"], "--topk must lie in (0, 1] and --repeats be at least 1"),
    ([], "run under torchrun --nproc-per-node N, N >= 2 GPUs"),
])
def test_benchmark_refuses_bad_requests_in_one_line(argv, message, capsys, monkeypatch):
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert ulysses_bench.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"ulysses bench: error: {message}\n"
