"""Ulysses sequence parallelism over NCCL, one GPU per rank, against one GPU.

Needs at least two GPUs (skipped otherwise). NVLink multicast stays off: the test sets
NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and NVSHMEM_DISABLE_NVLS=1 for the
ranks it spawns.
"""

from __future__ import annotations

import pytest
import torch

from sla_tl.parallel import compile_ahead
from sla_tl.plan import kernels_for
from sla_tl.settings import Settings

from .rank_harness import run_on_ranks
from .ulysses_scenarios import GPU_MATCHES, GPU_SCENARIOS

pytestmark = pytest.mark.gpu

BF16_TOLERANCE = 1e-2
NVLINK_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
                        "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.fixture(scope="module")
def nccl_ranks() -> dict[str, list[dict]]:
    """Per scenario, what each of two NCCL ranks returned."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs at least 2 GPUs; {torch.cuda.device_count()} visible")
    # Compiled once here, so that the two ranks do not compile the same kernels at once.
    compile_ahead([spec for layout in ("bshd", "bhsd") for spec in kernels_for(
        "sm_90a", 128, "bfloat16", Settings(block_q=128, block_kv=64, layout=layout))])
    with pytest.MonkeyPatch.context() as patch:
        for name, value in NVLINK_MULTICAST_OFF.items():
            patch.setenv(name, value)
        return run_on_ranks(2, list(GPU_SCENARIOS), seed=torch.seed() % 2**31,
                            backend="nccl", timeout_s=600)


@pytest.mark.parametrize("scenario", GPU_MATCHES)
def test_nccl_output_and_gradients_equal_one_gpu(nccl_ranks, scenario):
    for rank, result in enumerate(nccl_ranks[scenario]):
        assert "failed" not in result, f"rank {rank}:\n{result['failed']}"
        for name, error in result.items():
            assert error <= BF16_TOLERANCE, f"rank {rank}: {name} relative error {error:.3g}"


def test_nccl_group_rejects_cpu_tensors(nccl_ranks):
    for rank, raised in enumerate(nccl_ranks["nccl rejects cpu tensors"]):
        assert "failed" not in raised, f"rank {rank}:\n{raised['failed']}"
        assert raised["type"] == "ValueError", f"rank {rank}: {raised}"
        assert "q is on cpu but the group's backend (cuda:nccl) serves cuda" in raised["message"]


def test_diffusers_context_parallelism_equals_one_gpu(nccl_ranks):
    """diffusers' own Ulysses context parallelism of a Wan transformer with SLA: each rank
    attends over the whole sequence (an attention over its shard alone would differ)."""
    for rank, result in enumerate(nccl_ranks["nccl diffusers enable_parallelism"]):
        assert "failed" not in result, f"rank {rank}:\n{result['failed']}"
        if "skipped" in result:
            pytest.skip(result["skipped"])
        assert result["error"] < BF16_TOLERANCE, (rank, result["error"])
