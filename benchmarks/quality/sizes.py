"""The protocol's settings, and the shipped sizes of the built-in task."""

from __future__ import annotations

from dataclasses import dataclass

from .dit import DiTConfig
from .tasks import VideoTaskSize


@dataclass(frozen=True)
class ProtocolSettings:
    """How long and how each phase trains, and the sparse arms' attention settings."""

    pretrain_steps: int
    finetune_steps: int
    eval_every: int
    """Fine-tuning steps between held-out evaluations (the held-out curve)."""
    pretrain_lr: float
    finetune_lr: float
    warmup_steps: int
    """Linear learning-rate warm-up at the start of each phase."""
    topk: float
    block_q: int
    block_kv: int

    def __post_init__(self) -> None:
        for name in ("pretrain_steps", "finetune_steps", "eval_every", "warmup_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int; got {value!r}")
        if self.finetune_steps < 1 or self.eval_every < 1:
            raise ValueError("finetune_steps and eval_every must be at least 1")
        for name in ("pretrain_lr", "finetune_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive; got {getattr(self, name)}")


@dataclass(frozen=True)
class Size:
    """A shipped size: the task's data and model, and the protocol."""

    description: str
    task: VideoTaskSize
    protocol: ProtocolSettings
    device: str


SIZES: dict[str, Size] = {
    # The test suite's smoke run: every arm, a few steps, seconds on a CPU.
    "smoke": Size(
        "tiny model and clips, a few steps (the test suite's smoke run)",
        VideoTaskSize(DiTConfig(frames=2, size=16, patch=4, width=64, heads=1, depth=1,
                                mlp_ratio=2), batch=2, train_clips=4, heldout_clips=2),
        ProtocolSettings(pretrain_steps=2, finetune_steps=2, eval_every=1, pretrain_lr=1e-3,
                         finetune_lr=1e-3, warmup_steps=0, topk=0.05, block_q=16,
                         block_kv=16),
        "cpu"),
    # 5 frames of 8 x 8 tokens (320), 16-token blocks: 20 key blocks, 1 critical = 95%.
    "cpu": Size(
        "320 tokens (5 x 8 x 8), the CPU reference, ~8 minutes a seed on one core",
        VideoTaskSize(DiTConfig(frames=5, size=32, patch=4, width=128, heads=2, depth=3),
                      batch=4, train_clips=512, heldout_clips=16),
        ProtocolSettings(pretrain_steps=1000, finetune_steps=200, eval_every=25,
                         pretrain_lr=2e-3, finetune_lr=1e-3, warmup_steps=50, topk=0.05,
                         block_q=16, block_kv=16),
        "cpu"),
    # 16 frames of 32 x 32 tokens (16384), blocks 128 x 64: 256 key blocks, 12 critical
    # (95.3%). About 5 minutes a seed on an H200 (estimated, not yet run).
    "gpu": Size(
        "16384 tokens (16 x 32 x 32), the TileLang kernels on CUDA",
        VideoTaskSize(DiTConfig(frames=16, size=128, patch=4, width=256, heads=4, depth=4),
                      batch=2, train_clips=256, heldout_clips=8),
        ProtocolSettings(pretrain_steps=3000, finetune_steps=1000, eval_every=100,
                         pretrain_lr=2e-3, finetune_lr=1e-3, warmup_steps=100, topk=0.05,
                         block_q=128, block_kv=64),
        "cuda"),
}
