"""The quality protocol on CUDA (the TileLang kernels, bfloat16 autocast): a smoke run."""

from __future__ import annotations

import math

import pytest
import torch

from sla_tl.benchmarks.quality.arms import ARMS
from sla_tl.benchmarks.quality.dit import DiTConfig
from sla_tl.benchmarks.quality.protocol import run_protocol
from sla_tl.benchmarks.quality.sizes import ProtocolSettings
from sla_tl.benchmarks.quality.tasks import VideoDenoisingTask, VideoTaskSize

pytestmark = pytest.mark.gpu

# 4 frames of 16 x 16 tokens (1024), 64-token blocks: 16 key blocks, 1 critical.
SIZE = VideoTaskSize(DiTConfig(frames=4, size=64, patch=4, width=128, heads=2, depth=2),
                     batch=2, train_clips=4, heldout_clips=2)
SETTINGS = ProtocolSettings(pretrain_steps=3, finetune_steps=3, eval_every=1, pretrain_lr=1e-3,
                            finetune_lr=1e-3, warmup_steps=0, topk=0.1, block_q=64,
                            block_kv=64)


def test_every_arm_runs_on_cuda():
    measured = run_protocol(lambda seed, device: VideoDenoisingTask(SIZE, seed, device),
                            SETTINGS, ARMS, [0], torch.device("cuda"), progress=False,
                            log=print)
    assert measured["lengths"] == [1024]
    runs = {r["arm"]: r for r in measured["runs"]}
    assert set(runs) == {a.name for a in ARMS}
    for name, run in runs.items():
        assert all(math.isfinite(x) for x in run["train_curve"]), name
        assert math.isfinite(run["heldout_loss"]) and run["step_ms"] > 0, name
    assert runs["dense"]["attention_error"] < 1e-2
    # Before fine-tuning every sparse arm is its sparse branch (the projection is zero), and
    # k_low, the linear mode and the gate do not change that branch.
    start = runs["sparse_only"]["attention_error_start"]
    assert start > 0.05
    for name in ("sla", "sla_klow10", "salad"):
        assert runs[name]["attention_error_start"] == pytest.approx(start, rel=1e-3), name
