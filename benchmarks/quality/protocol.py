"""The fine-tuning protocol: pretrain with dense attention, then fine-tune every arm the same
number of steps on the same batches from that checkpoint, and measure each arm.

Per seed and arm: the held-out loss (and its curve), the attention output's error against
dense float32 attention on the model's own q, k, v (before and after fine-tuning), the share
of that dense attention's probability mass on the blocks routing makes critical (what the
sparse branch computes exactly), and the median time of a training step. On CUDA the model
runs under bfloat16 autocast.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

import sla_tl
from sla_tl.spec import softmax_scale

from .arms import ATTENTION_DTYPE, REFERENCE_ARM, Arm, arm_named, attention_factory
from .dit import AttentionFactory
from .sizes import ProtocolSettings
from .tasks import Task, TaskFactory

GRAD_CLIP = 1.0
WEIGHT_DECAY = 0.0
# The first steps of a phase include one-off work (allocation, kernel loading): left out of
# the step time.
UNTIMED_STEPS = 2
# Query rows per chunk of the full log-sum-exp (bounds its (rows, L) score matrix).
LSE_CHUNK = 1024

Log = Callable[[str], None]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager:
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


class _CoreRecorder:
    """Wraps an attention factory and keeps every core it makes, in order."""

    def __init__(self, factory: AttentionFactory) -> None:
        self.factory = factory
        self.cores: list[nn.Module] = []

    def __call__(self, head_dim: int) -> nn.Module:
        core = self.factory(head_dim)
        self.cores.append(core)
        return core


def _core_prefixes(model: nn.Module, cores: list[nn.Module]) -> list[str]:
    ids = {id(core) for core in cores}
    return [f"{name}." for name, module in model.named_modules() if id(module) in ids]


def load_pretrained(model: nn.Module, checkpoint: dict[str, torch.Tensor],
                    cores: list[nn.Module]) -> None:
    """Load the dense checkpoint; only the arm's attention cores may have keys it lacks."""
    missing, unexpected = model.load_state_dict(checkpoint, strict=False)
    prefixes = _core_prefixes(model, cores)
    outside = [key for key in missing if not key.startswith(tuple(prefixes))]
    if outside or unexpected:
        raise ValueError("the dense checkpoint does not fit the arm's model: "
                         f"missing {outside[:5]}, unexpected {unexpected[:5]}")


def _learning_rate(step: int, base: float, warmup: int) -> float:
    return base * min(1.0, (step + 1) / warmup) if warmup else base


class _Trainer:
    """AdamW steps of one model on the task's batches, timed."""

    def __init__(self, task: Task, model: nn.Module, device: torch.device, lr: float,
                 warmup: int) -> None:
        self.task, self.model, self.device = task, model, device
        self.lr, self.warmup = lr, warmup
        trainable = [p for p in model.parameters() if p.requires_grad]
        # A model with nothing to train (an arm whose only parameters are frozen) is measured.
        self.optimizer = (torch.optim.AdamW(trainable, lr=lr, weight_decay=WEIGHT_DECAY)
                          if trainable else None)
        self.losses: list[float] = []
        self.step_ms: list[float] = []

    def step(self, data_step: int) -> float:
        self.model.train()
        batch = self.task.train_batch(data_step)
        _synchronize(self.device)
        start = time.perf_counter()
        with torch.set_grad_enabled(self.optimizer is not None), _autocast(self.device):
            loss = self.task.loss(self.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss is {loss.item()} at step {len(self.losses)}")
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = _learning_rate(len(self.losses), self.lr, self.warmup)
            loss.backward()
            nn.utils.clip_grad_norm_(self.model.parameters(), GRAD_CLIP)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        _synchronize(self.device)
        self.step_ms.append((time.perf_counter() - start) * 1e3)
        self.losses.append(loss.item())
        return self.losses[-1]

    def median_step_ms(self) -> float:
        timed = self.step_ms[UNTIMED_STEPS:] or self.step_ms
        return statistics.median(timed)


def heldout_loss(task: Task, model: nn.Module, device: torch.device) -> float:
    """Mean loss over the task's held-out batches."""
    model.eval()
    with torch.no_grad(), _autocast(device):
        losses = [task.loss(model, batch).item() for batch in task.heldout_batches()]
    model.train()
    return sum(losses) / len(losses)


def kept_mass(q: torch.Tensor, k: torch.Tensor, settings: ProtocolSettings) -> torch.Tensor:
    """Per query row (B, H, Lq): the share of dense softmax attention's probability on the
    key blocks that routing makes critical, exp(LSE over the critical keys - LSE over all).

    q and k are rounded to ATTENTION_DTYPE first, as every core rounds them."""
    q, k = q.to(ATTENTION_DTYPE), k.to(ATTENTION_DTYPE)
    routing = sla_tl.route(q, k, settings.topk, 0.0, settings.block_q, settings.block_kv)
    dim = q.shape[-1]
    zero_w = torch.zeros(dim, dim, device=q.device)
    zero_b = torch.zeros(dim, device=q.device)
    # The sparse branch's LSE (v does not change it).
    critical = torch.ops.sla.attention_fwd(q, k, k, *routing, zero_w, zero_b, None,
                                           settings.block_q, settings.block_kv, "softmax",
                                           "marginal", None, "bhsd")[1]
    keys = k.float().transpose(-1, -2) * softmax_scale(dim, None)
    full = torch.cat([torch.logsumexp(rows.float() @ keys, dim=-1)
                      for rows in q.split(LSE_CHUNK, dim=2)], dim=-1)
    return torch.exp(critical - full)


@contextlib.contextmanager
def _error_hooks(cores: list[nn.Module], sums: list[list[float]], lengths: set[int],
                 settings: ProtocolSettings) -> Iterator[None]:
    """While open, each core's calls add (||out - dense||^2, ||dense||^2, kept mass summed
    over rows, rows) to its entry, and the sequence lengths seen to `lengths`."""
    def hook(index: int):
        def record(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
            q, k, v = (t.float() for t in inputs[:3])
            lengths.add(q.shape[2])
            with torch.autocast(q.device.type, enabled=False):
                dense = F.scaled_dot_product_attention(q, k, v)
                mass = kept_mass(q, k, settings)
            sums[index][0] += (output.float() - dense).square().sum().item()
            sums[index][1] += dense.square().sum().item()
            sums[index][2] += mass.sum().item()
            sums[index][3] += mass.numel()
        return record

    handles = [core.register_forward_hook(hook(i)) for i, core in enumerate(cores)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def attention_errors(task: Task, model: nn.Module, cores: list[nn.Module],
                     device: torch.device, settings: ProtocolSettings,
                     lengths: set[int] | None = None) -> tuple[list[float], list[float]]:
    """Per core, over the held-out batches: ||O - O_dense|| / ||O_dense|| with O_dense full
    softmax attention in float32 on the same q, k, v (the model's own activations), and the
    mean `kept_mass` of its rows. `lengths` collects the sequence lengths the cores saw."""
    sums = [[0.0, 0.0, 0.0, 0] for _ in cores]
    with _error_hooks(cores, sums, set() if lengths is None else lengths, settings):
        heldout_loss(task, model, device)
    errors = [(err / ref) ** 0.5 if ref > 0 else 0.0 for err, ref, _, _ in sums]
    return errors, [mass / rows if rows else 0.0 for _, _, mass, rows in sums]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _core_parameter_count(cores: list[nn.Module]) -> int:
    return sum(p.numel() for core in cores for p in core.parameters())


def run_seed(task: Task, settings: ProtocolSettings, arms: Sequence[Arm], seed: int,
             device: torch.device, bar: tqdm, log: Log,
             lengths: set[int]) -> tuple[dict, list[dict]]:
    """Pretrain, then fine-tune every arm: the pretraining record and one record per arm;
    `lengths` collects the sequence lengths the attention cores saw."""
    torch.manual_seed(seed)
    dense = _CoreRecorder(attention_factory(arm_named(REFERENCE_ARM), settings.topk,
                                            settings.block_q, settings.block_kv))
    model = task.build(dense)
    trainer = _Trainer(task, model, device, settings.pretrain_lr, settings.warmup_steps)
    bar.set_description(f"seed {seed} pretrain")
    for step in range(settings.pretrain_steps):
        bar.set_postfix_str(f"loss {trainer.step(step):.4f}", refresh=False)
        bar.update()
    checkpoint = {k: v.detach().clone() for k, v in model.state_dict().items()}
    pretrain = dict(seed=seed, train_curve=trainer.losses,
                    heldout_loss=heldout_loss(task, model, device),
                    step_ms=trainer.median_step_ms() if trainer.step_ms else None)
    log(f"seed {seed} pretrained {settings.pretrain_steps} steps: held-out loss "
        f"{pretrain['heldout_loss']:.5f}")
    del model, trainer

    runs = []
    for arm in arms:
        torch.manual_seed(seed)
        recorder = _CoreRecorder(attention_factory(arm, settings.topk, settings.block_q,
                                                   settings.block_kv))
        model = task.build(recorder)
        load_pretrained(model, checkpoint, recorder.cores)
        start_errors, start_mass = attention_errors(task, model, recorder.cores, device,
                                                    settings, lengths)
        trainer = _Trainer(task, model, device, settings.finetune_lr, settings.warmup_steps)
        curve = []
        bar.set_description(f"seed {seed} {arm.name}")
        for step in range(settings.finetune_steps):
            loss = trainer.step(settings.pretrain_steps + step)
            bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
            bar.update()
            if (step + 1) % settings.eval_every == 0 or step + 1 == settings.finetune_steps:
                curve.append([step + 1, heldout_loss(task, model, device)])
        errors, mass = attention_errors(task, model, recorder.cores, device, settings)
        runs.append(dict(
            seed=seed, arm=arm.name, heldout_loss=curve[-1][1], heldout_curve=curve,
            train_curve=trainer.losses, step_ms=trainer.median_step_ms(),
            attention_error=_mean(errors), attention_error_layers=errors,
            attention_error_start=_mean(start_errors), kept_mass=_mean(mass),
            kept_mass_start=_mean(start_mass), trained_parameters=_trainable_count(model),
            attention_parameters=_core_parameter_count(recorder.cores),
        ))
        log(_run_line(runs[-1]))
        del model, trainer
    dense_loss = next(r["heldout_loss"] for r in runs if r["arm"] == REFERENCE_ARM)
    for run in runs:
        run["heldout_loss_vs_dense"] = run["heldout_loss"] / dense_loss - 1.0
    return pretrain, runs


def _run_line(run: dict) -> str:
    error = run["attention_error"]
    errors = ("" if error is None else
              f", attention error {run['attention_error_start']:.4f} -> {error:.4f}")
    return (f"seed {run['seed']} {run['arm']}: held-out loss {run['heldout_loss']:.5f}"
            f"{errors}, {run['step_ms']:.1f} ms/step")


def run_protocol(task_factory: TaskFactory, settings: ProtocolSettings, arms: Sequence[Arm],
                 seeds: Sequence[int], device: torch.device, progress: bool = True,
                 log: Log | None = None) -> dict[str, Any]:
    """Every seed's pretraining and arms: {"pretrain": [...], "runs": [...], "lengths":
    the sorted sequence lengths the attention cores saw}."""
    if REFERENCE_ARM not in [a.name for a in arms]:
        raise ValueError(f"the arms must include {REFERENCE_ARM!r}, the control the others "
                         "are measured against")
    steps = settings.pretrain_steps + len(arms) * settings.finetune_steps
    pretrains, runs, lengths = [], [], set()
    # disable=None: no bar where stderr is not a terminal (a log file).
    with tqdm(total=steps * len(seeds), unit="step", disable=None if progress else True,
              dynamic_ncols=True) as bar:
        write = log or bar.write
        for seed in seeds:
            task = task_factory(seed, device)
            pretrain, seed_runs = run_seed(task, settings, arms, seed, device, bar, write,
                                           lengths)
            pretrains.append(pretrain)
            runs += seed_runs
    return dict(protocol=asdict(settings), pretrain=pretrains, runs=runs,
                lengths=sorted(lengths))
