"""What the protocol fine-tunes: a task is a model family, its data and its loss.

    class Task(Protocol):
        def build(self, make_attention) -> nn.Module       # a fresh model
        def train_batch(self, step: int) -> Batch          # the same batch for every arm
        def heldout_batches(self) -> Sequence[Batch]       # fixed, never trained on
        def loss(self, model, batch) -> torch.Tensor       # a scalar to minimise

`make_attention(head_dim)` returns a fresh attention core (q, k, v (B, H, L, D) -> out); a
model must route every attention it wants measured through such cores. A user's own task is
a function `(seed: int, device: torch.device) -> Task`, named on the command line as
`--task package.module:function`. The built-in one is `VideoDenoisingTask`.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn

from .dit import AttentionFactory, DiTConfig, VideoDiT
from .videos import make_clips

# Clips are made this many at a time: the GPU size's float64 intermediates stay small.
CLIP_CHUNK = 16
HELDOUT_TIMES = (0.2, 0.5, 0.8)
"""Diffusion times at which the held-out loss is measured."""


class Task(Protocol):
    """A model family, its data and its loss (see the module docstring)."""

    def build(self, make_attention: AttentionFactory) -> nn.Module: ...

    def train_batch(self, step: int) -> Any: ...

    def heldout_batches(self) -> Sequence[Any]: ...

    def loss(self, model: nn.Module, batch: Any) -> torch.Tensor: ...


TaskFactory = Callable[[int, torch.device], Task]
"""(seed, device) -> Task."""


@dataclass(frozen=True)
class VideoTaskSize:
    """The data and model of the built-in task."""

    model: DiTConfig
    batch: int
    train_clips: int
    heldout_clips: int
    shapes: int = 3


class DenoisingBatch(NamedTuple):
    """Clean clips, their noise and diffusion times: x_t = (1 - t) x0 + t noise."""

    clean: torch.Tensor
    noise: torch.Tensor
    t: torch.Tensor


def _clips(count: int, size: VideoTaskSize, seed: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator(device=device).manual_seed(seed)
    chunks = [make_clips(min(CLIP_CHUNK, count - start), size.model.frames, size.model.size,
                         size.shapes, generator) for start in range(0, count, CLIP_CHUNK)]
    return torch.cat(chunks)


class VideoDenoisingTask:
    """Flow-matching denoising of procedural clips by a small video DiT.

    The model predicts the velocity noise - x0 from x_t and t; the loss is its mean squared
    error. Training clips, held-out clips and every batch's noise and times come from the
    seed; a batch depends only on (seed, step), so every arm sees the same data.
    """

    def __init__(self, size: VideoTaskSize, seed: int, device: torch.device) -> None:
        self.size = size
        self.seed = seed
        self.device = device
        # Separate streams, so the held-out clips are never among the training ones.
        self.train_clips = _clips(size.train_clips, size, 2 * seed, device)
        self._heldout = self._heldout_batches(_clips(size.heldout_clips, size, 2 * seed + 1,
                                                     device))

    def build(self, make_attention: AttentionFactory) -> nn.Module:
        """A fresh video DiT with `make_attention`'s cores, on the task's device."""
        return VideoDiT(self.size.model, make_attention).to(self.device)

    def _generator(self, stream: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + stream)

    def train_batch(self, step: int) -> DenoisingBatch:
        """Clips drawn from the training pool with fresh noise and uniform times."""
        generator = self._generator(step)
        index = torch.randint(len(self.train_clips), (self.size.batch,), generator=generator,
                              device=self.device)
        clean = self.train_clips[index]
        noise = torch.randn(clean.shape, generator=generator, device=self.device)
        t = torch.rand(self.size.batch, generator=generator, device=self.device)
        return DenoisingBatch(clean, noise, t)

    def _heldout_batches(self, clips: torch.Tensor) -> list[DenoisingBatch]:
        generator = self._generator(-1)
        batches = []
        for t_value in HELDOUT_TIMES:
            for start in range(0, len(clips), self.size.batch):
                clean = clips[start:start + self.size.batch]
                noise = torch.randn(clean.shape, generator=generator, device=self.device)
                batches.append(DenoisingBatch(clean, noise, torch.full(
                    (len(clean),), t_value, device=self.device)))
        return batches

    def heldout_batches(self) -> list[DenoisingBatch]:
        """Every held-out clip at each of HELDOUT_TIMES, with fixed noise."""
        return self._heldout

    def loss(self, model: nn.Module, batch: DenoisingBatch) -> torch.Tensor:
        """Mean squared error of the predicted velocity."""
        t = batch.t.view(-1, 1, 1, 1, 1)
        noisy = (1 - t) * batch.clean + t * batch.noise
        return (model(noisy, batch.t) - (batch.noise - batch.clean)).square().mean()


def load_task_factory(reference: str) -> TaskFactory:
    """The user's `package.module:function`; ValueError saying what is wrong with it."""
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise ValueError(f"--task wants package.module:function; got {reference!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--task {reference}: cannot import {module_name}: {error}") from None
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ValueError(f"--task {reference}: {module_name} has no function {attribute!r}")
    return factory


def check_task(task: object, reference: str) -> Task:
    """`task` must have the Task methods (a user's factory may return anything)."""
    missing = [name for name in ("build", "train_batch", "heldout_batches", "loss")
               if not callable(getattr(task, name, None))]
    if missing:
        raise ValueError(f"--task {reference} returned a {type(task).__name__} without "
                         f"{', '.join(missing)} (see `sla-tl quality --help`)")
    return task
