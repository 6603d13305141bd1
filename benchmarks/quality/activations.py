"""Fine-tuning on captured activations: a task made of a user's saved q, k, v.

The file (`torch.save`) holds a dict {"q": q, "k": k, "v": v} or a list of such dicts (say
one per layer), each (B, H, L, D) ((B, L, H, D) with layout "bshd"), B >= 2. Each entry
gets its own attention core; training fits the cores' parameters (the projection, the gate)
so that their output matches dense float32 attention on the entry's first B - 1 samples,
and the last sample of every entry is held out. The loss is the relative squared error
||O - O_dense||^2 / ||O_dense||^2, so an arm's held-out loss already says how far it is
from dense attention on these activations.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from sla_tl.layout import to_bhsd
from sla_tl.spec import HEAD_DIMS

from .dit import AttentionFactory


class ActivationBatch(NamedTuple):
    entry: int
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    target: torch.Tensor


class _Cores(nn.Module):
    def __init__(self, cores: list[nn.Module]) -> None:
        super().__init__()
        self.cores = nn.ModuleList(cores)


def _entries(doc: object, path: str) -> list[dict]:
    entries = doc if isinstance(doc, list) else [doc]
    if not entries:
        raise ValueError(f"{path}: holds an empty list")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(n), torch.Tensor)
                                                  for n in "qkv"):
            raise ValueError(f"{path}: entry {i} is not a dict of tensors q, k, v")
    return entries


def load_activations(path: str | os.PathLike, layout: str) -> list[tuple[torch.Tensor, ...]]:
    """The (q, k, v) of each entry of the file, as float32 (B, H, L, D); ValueError naming
    the file and the entry at fault."""
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as error:  # noqa: BLE001  (a damaged file can fail in many ways)
        raise ValueError(f"{path}: cannot be read as a torch.save file ({error})") from None
    captured = []
    for i, entry in enumerate(_entries(doc, str(path))):
        q, k, v = (entry[n] for n in "qkv")
        where = f"{path}: entry {i}"
        if any(t.dim() != 4 or not t.is_floating_point() for t in (q, k, v)):
            raise ValueError(f"{where}: q, k and v must be floating tensors of rank 4")
        q, k, v = (to_bhsd(t, layout).float() for t in (q, k, v))
        if not (q.shape[:2] == k.shape[:2] == v.shape[:2] and q.shape[3] == k.shape[3]
                and k.shape == v.shape):
            raise ValueError(f"{where}: shapes {tuple(q.shape)}, {tuple(k.shape)}, "
                             f"{tuple(v.shape)} do not fit one attention call ({layout})")
        if q.shape[3] not in HEAD_DIMS:
            raise ValueError(f"{where}: head dim must be one of {HEAD_DIMS}; got {q.shape[3]}")
        if q.shape[0] < 2:
            raise ValueError(f"{where}: needs a batch of at least 2 samples (the last one is "
                             "held out)")
        captured.append((q, k, v))
    return captured


class ActivationsTask:
    """The captured entries as a task (see the module docstring)."""

    def __init__(self, captured: list[tuple[torch.Tensor, ...]], device: torch.device) -> None:
        self.device = device
        self.entries = []
        for q, k, v in captured:
            q, k, v = (t.to(device) for t in (q, k, v))
            self.entries.append((q, k, v, F.scaled_dot_product_attention(q, k, v)))

    def build(self, make_attention: AttentionFactory) -> nn.Module:
        """One core per entry."""
        return _Cores([make_attention(q.shape[-1]) for q, *_ in self.entries]).to(self.device)

    def _batch(self, entry: int, rows: slice) -> ActivationBatch:
        return ActivationBatch(entry, *(t[rows] for t in self.entries[entry]))

    def train_batch(self, step: int) -> ActivationBatch:
        """The training samples of one entry, entries in turn."""
        return self._batch(step % len(self.entries), slice(0, -1))

    def heldout_batches(self) -> list[ActivationBatch]:
        """The last sample of every entry."""
        return [self._batch(i, slice(-1, None)) for i in range(len(self.entries))]

    def loss(self, model: nn.Module, batch: ActivationBatch) -> torch.Tensor:
        """||O - O_dense||^2 / ||O_dense||^2 for the batch's entry."""
        out = model.cores[batch.entry](batch.q, batch.k, batch.v).float()
        return (out - batch.target).square().sum() / batch.target.square().sum()
