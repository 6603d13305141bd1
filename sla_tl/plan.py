"""The plan of a CUDA call: which kernels and torch steps run, in which order, on which
buffers. One object per call shape, resolved once and kept.

A call's work comes in phases (`Phase`): routing, the forward, the backward. A phase is an
ordered list of steps (`Step`), each one kernel launch (a `KernelSpec`: kind, compile
arguments and schedule knobs) or one group of torch ops, naming the tensors it reads, the
buffers it fills in place and the tensors it makes. The buffers a phase allocates are
declared with their shapes; each is allocated right before the first step that fills it
and dropped after the last step that reads it (so, e.g., the backward's dK and dV are not
allocated until the query blocks' states are gone).

Everything that needs to know which kernels a call runs reads them from a plan: the CUDA
backend executes it, `sla-tl warm`, the static gate (`sla-tl kernels`) and the tuner's
candidates enumerate `kernels_for` (a plan's kernels), and the dry run (`sla_tl.dry_run`)
counts its launches. Replacing a group of torch ops by one kernel is one change here: the
step that ran them becomes a kernel step with the same reads and outputs.

A plan is resolved once per call shape (`attention_plan`, `route_phase`): the target (GPU
model and arch), the schedule (an override, else the tuned one from the config store), the
kernels' compile arguments and every buffer's shape; the compiled kernels are fetched on a
phase's first run and kept with it.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

import tilelang
import torch

from . import block_states, config_store, kernels, routing, spec
from .kernels import KernelSpec, Schedule
from .layout import from_bhsd, to_bhsd
from .routing import Routing
from .settings import Settings
from .targets import Target, check_block_sizes

SELECTIONS = ("sort", "kernel")
"""How routing picks each row's blocks from the pooled scores: "sort" (torch: a row sort,
the default) or "kernel" (one selection kernel on the unsmoothed scores; it replaces ~10
small torch launches and is a candidate for the default)."""


class Buffer(NamedTuple):
    """A tensor a phase allocates."""

    shape: tuple[int, ...]
    dtype: torch.dtype


class Step(NamedTuple):
    """One step of a phase: a kernel launch, or a group of torch ops."""

    name: str
    kernel: KernelSpec | None
    """The kernel launched (None: `function` runs)."""
    function: Callable[..., object] | None
    """Torch ops: called with the tensors of `reads` then `fills`; returns those of `makes`
    (one tensor, or a tuple for several)."""
    reads: tuple[str, ...]
    fills: tuple[str, ...] = ()
    """Buffers the step writes in place (a kernel's outputs come last in its arguments)."""
    makes: tuple[str, ...] = ()
    """Tensors a torch step returns."""


def kernel_step(name: str, spec: KernelSpec, reads: Sequence[str],
                fills: Sequence[str]) -> Step:
    """A step launching `spec` on `reads` then `fills` (its arguments, in order)."""
    return Step(name, spec, None, tuple(reads), tuple(fills))


def torch_step(name: str, function: Callable[..., object], reads: Sequence[str],
               fills: Sequence[str] = (), makes: Sequence[str] = ()) -> Step:
    """A step running torch ops."""
    return Step(name, None, function, tuple(reads), tuple(fills), tuple(makes))


Launcher = Callable[[Step, list], None]
"""Runs one kernel step on its argument tensors."""

Watcher = Callable[[Step], contextlib.AbstractContextManager]
"""A context around each step (a dry run attributes what it sees to the step)."""


class Phase:
    """An ordered list of steps with the buffers it allocates (see the module docstring)."""

    def __init__(self, name: str, inputs: Sequence[str], outputs: Sequence[str],
                 steps: Sequence[Step], buffers: Mapping[str, Buffer]) -> None:
        self.name = name
        self.inputs = tuple(inputs)
        self.outputs = tuple(outputs)
        self.steps = tuple(steps)
        self.buffers = dict(buffers)
        self._released = _released_after(self.steps, self.outputs)
        self._compiled: list = [None] * len(self.steps)
        missing = {f for s in self.steps for f in s.fills} - set(self.buffers)
        if missing:
            raise ValueError(f"{name}: buffers without a shape: {sorted(missing)}")

    def kernels(self) -> list[KernelSpec]:
        """The kernels this phase launches, in order."""
        return [s.kernel for s in self.steps if s.kernel is not None]

    def step(self, name: str) -> Step:
        """The step called `name`."""
        return next(s for s in self.steps if s.name == name)

    def _launch(self, index: int, args: list) -> None:
        """Launch the kernel of step `index`, compiled on first use (kept with the phase)."""
        kernel = self._compiled[index]
        if kernel is None:
            kernel = self._compiled[index] = kernels.compiled(self.steps[index].kernel)
        kernel(*args)

    def run(self, tensors: Mapping[str, torch.Tensor], device: torch.device,
            launch: Launcher | None = None, keep: bool = False,
            only: Collection[str] | None = None,
            watch: Watcher | None = None) -> dict[str, torch.Tensor]:
        """Run every step on `tensors` (the inputs, and any buffer given instead of being
        allocated, e.g. outputs poisoned by a test). Returns the outputs, or with `keep`
        every tensor the phase saw. `launch` replaces the kernel launches and `watch` wraps
        each step (a dry run); `only` names the steps to run (with `keep`: a test of one
        kernel on its own)."""
        env = dict(tensors)
        for index, step in enumerate(self.steps):
            if only is not None and step.name not in only:
                continue
            if watch is not None:
                with watch(step):
                    self._run_step(index, step, env, device, launch)
            else:
                self._run_step(index, step, env, device, launch)
            if not keep:
                for name in self._released[index]:
                    env.pop(name, None)
        return env if keep else {name: env[name] for name in self.outputs}

    def _run_step(self, index: int, step: Step, env: dict, device: torch.device,
                  launch: Launcher | None) -> None:
        for name in step.fills:
            if name not in env:
                buffer = self.buffers[name]
                env[name] = torch.empty(buffer.shape, dtype=buffer.dtype, device=device)
        args = [env[name] for name in step.reads]
        args += [env[name] for name in step.fills]
        if step.kernel is None:
            made = step.function(*args)
            if len(step.makes) == 1:
                env[step.makes[0]] = made
            elif step.makes:
                env.update(zip(step.makes, made, strict=True))
        elif launch is None:
            self._launch(index, args)
        else:
            launch(step, args)

    def run_step(self, name: str, env: Mapping[str, torch.Tensor],
                 launch: Launcher | None = None) -> object:
        """Run one step on the tensors of a kept run (`run(..., keep=True)`), e.g. to time
        it alone; returns what a torch step makes."""
        index = next(i for i, s in enumerate(self.steps) if s.name == name)
        step = self.steps[index]
        args = [env[n] for n in step.reads] + [env[n] for n in step.fills]
        if step.kernel is None:
            return step.function(*args)
        if launch is None:
            return self._launch(index, args)
        return launch(step, args)


def _released_after(steps: Sequence[Step], outputs: Sequence[str]) -> list[tuple[str, ...]]:
    """Per step, the tensors no later step reads (and that are not outputs): dropped after it."""
    last: dict[str, int] = {}
    for index, step in enumerate(steps):
        for name in (*step.reads, *step.fills, *step.makes):
            last[name] = index
    released: list[list[str]] = [[] for _ in steps]
    for name, index in last.items():
        if name not in outputs:
            released[index].append(name)
    return [tuple(names) for names in released]


# ---------------------------------------------------------------- call shapes


class CallShape(NamedTuple):
    """What fixes a call's plan: sizes, dtype, settings, a gate or not, the routing's widths."""

    batch: int
    heads: int
    lq: int
    lk: int
    dim: int
    dtype: torch.dtype
    settings: Settings
    gated: bool
    widths: tuple[int, int]
    """(Kc, Kn): the widths of the routing's `lut` and `neg_lut`."""

    @property
    def dtype_name(self) -> str:
        """The kernels' name for the dtype, e.g. "bfloat16"."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def n_q(self) -> int:
        return spec.num_blocks(self.lq, self.settings.block_q)

    @property
    def n_kv(self) -> int:
        return spec.num_blocks(self.lk, self.settings.block_kv)

    def call_key(self, target: Target) -> config_store.CallKey:
        """What this call looks up in the tuned-config store."""
        s = self.settings
        return config_store.CallKey(
            gpu=target.gpu, arch=target.arch.target, tilelang=tilelang.__version__,
            batch=self.batch, heads=self.heads, lq=self.lq, lk=self.lk, dim=self.dim,
            dtype=self.dtype_name, block_q=s.block_q, block_kv=s.block_kv,
            n_crit=self.widths[0], n_neg=self.widths[1], feature_map=s.feature_map,
            linear=s.linear, layout=s.layout)


def call_shape(q: torch.Tensor, k: torch.Tensor, s: Settings, gated: bool,
               widths: tuple[int, int]) -> CallShape:
    """The shape of a call on q and k (in the settings' layout)."""
    b, h, lq, d = to_bhsd(q, s.layout).shape
    return CallShape(b, h, lq, to_bhsd(k, s.layout).shape[2], d, q.dtype, s, gated, widths)


# ---------------------------------------------------------------- routing


ROUTING = Routing._fields


PLANS_KEPT = 256
"""Plans kept per kind (the least recently used go first): one per call shape."""


@functools.lru_cache(maxsize=PLANS_KEPT)
def route_phase(target: Target, shape: CallShape, selection: str = "sort") -> Phase:
    """Routing of a call: pooled block scores (pooling kernels), then each row's critical
    and negligible blocks (`shape.widths` of them) by `selection`."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
    s = shape.settings
    check_block_sizes(target.arch, s.block_q, s.block_kv)
    arch = target.arch.target
    b, h, n_q, n_kv, d = shape.batch, shape.heads, shape.n_q, shape.n_kv, shape.dim
    n_crit, n_neg = shape.widths

    def pool(block: int) -> KernelSpec:
        return KernelSpec("pool", (("dim", d), ("block", block), ("dtype", shape.dtype_name),
                                   ("layout", s.layout)), arch)

    buffers = {"pooled_q": Buffer((b, h, n_q, d), torch.float32),
               "pooled_k": Buffer((b, h, n_kv, d), torch.float32)}
    steps = [kernel_step("pool_q", pool(s.block_q), ["q"], ["pooled_q"]),
             kernel_step("pool_k", pool(s.block_kv), ["k"], ["pooled_k"])]
    if selection == "sort":
        steps.append(torch_step(
            "select", functools.partial(routing.select_by_sort, lk=shape.lk, block_kv=s.block_kv,
                                        n_crit=n_crit, n_neg=n_neg),
            ["pooled_q", "pooled_k"], makes=ROUTING))
    else:
        select = KernelSpec("select", (), arch)
        limit = target.arch.kernel("select").limits.get("key_blocks")
        if limit is not None and n_kv > limit:
            raise ValueError(f"selection='kernel' takes at most {limit} key blocks; got {n_kv} "
                             "(use selection='sort')")
        rows = (b, h, n_q)
        buffers.update(lut=Buffer((*rows, n_crit), torch.int32),
                       lut_count=Buffer(rows, torch.int32),
                       neg_lut=Buffer((*rows, n_neg), torch.int32),
                       neg_count=Buffer(rows, torch.int32))
        steps += [torch_step("scores", routing.raw_scores, ["pooled_q", "pooled_k"],
                             makes=["scores"]),
                  kernel_step("select", select, ["scores"], ROUTING)]
    return Phase("route", ["q", "k"], ROUTING, steps, buffers)


# ---------------------------------------------------------------- attention


class AttentionPlan(NamedTuple):
    """The forward and backward phases of a call with a given routing."""

    target: Target
    shape: CallShape
    schedule: Schedule
    """The schedule knobs its kernels are built with, by tunable kernel."""
    forward: Phase
    backward: Phase

    def kernels(self, backward: bool = True) -> list[KernelSpec]:
        """Every kernel the forward (and the backward) launches, in order."""
        return self.forward.kernels() + (self.backward.kernels() if backward else [])


def _frozen(schedule: Schedule | None) -> tuple | None:
    if schedule is None:
        return None
    return tuple(sorted((kernel, kernels.freeze(knobs)) for kernel, knobs in schedule.items()))


def attention_plan(target: Target, shape: CallShape, schedule: Schedule | None = None,
                   keep_routing: bool = True) -> AttentionPlan:
    """The plan of a call: `schedule` overrides the stored one (the tuner's candidates, the
    benchmarks' alternatives); `keep_routing`: what the forward and the backward derive
    from the routing is kept with it, for later calls with the same routing (see
    `sla_tl.routing`)."""
    if schedule is None:
        # The store's schedule: plans of a store are dropped when it is read again.
        store = config_store.active_store()
        return _attention_plan(target, shape, None, keep_routing, store, store.generation)
    return _attention_plan(target, shape, _frozen(schedule), keep_routing, None, 0)


@functools.lru_cache(maxsize=PLANS_KEPT)
def _attention_plan(target: Target, shape: CallShape, frozen: tuple | None, keep_routing: bool,
                    store: config_store.ConfigStore | None, generation: int) -> AttentionPlan:
    s = shape.settings
    check_block_sizes(target.arch, s.block_q, s.block_kv)
    if store is not None:
        schedule = store.lookup(shape.call_key(target)).schedule
    else:
        schedule = {kernel: dict(knobs) for kernel, knobs in frozen}
    return AttentionPlan(target, shape, schedule, _forward(target, shape, schedule, keep_routing),
                         _backward(target, shape, schedule, keep_routing))


def _spec(target: Target, kind: str, args: dict, schedule: Schedule,
          tuned_as: str | None = None) -> KernelSpec:
    knobs = kernels.knobs_of(schedule, tuned_as or kind)
    return KernelSpec(kind, tuple(args.items()), target.arch.target, knobs)


def _projection_operands(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype):
    """The projection as the kernels read it: the weight in the inputs' dtype, the bias in
    float32, both dense."""
    return weight.to(dtype).contiguous(), bias.float().contiguous()


def _gate_rows(gate: torch.Tensor, layout: str) -> torch.Tensor:
    """The gate as the gated kernels read it: float32 (B, H, Lq), dense."""
    return to_bhsd(gate, layout).float().contiguous()


def _forward(target: Target, shape: CallShape, schedule: Schedule,
             keep_routing: bool) -> Phase:
    s = shape.settings
    b, h, lq, d = shape.batch, shape.heads, shape.lq, shape.dim
    n_kv = shape.n_kv
    marginal = s.linear == "marginal"
    dtype = shape.dtype_name
    key_pass = _spec(target, "key_pass", dict(dim=d, block_kv=s.block_kv, dtype=dtype,
                                              feature=s.feature_map, layout=s.layout,
                                              store_blocks=marginal), schedule)
    n_groups = 1 if marginal else spec.num_blocks(n_kv, key_pass.merged_knobs()["group"])
    n_rows = spec.linear_state_rows(lq, s.block_q, s.linear)
    out_shape = (b, h, lq, d) if s.layout == "bhsd" else (b, lq, h, d)
    buffers = {
        "h_block": Buffer((b, h, n_kv if marginal else 1, d, d), shape.dtype),
        "z_block": Buffer((b, h, n_kv, d), torch.float32),
        "h_group": Buffer((b, h, n_groups, d, d), torch.float32),
        "h_rows": Buffer((b, h, n_rows, d, d), shape.dtype),
        "z_rows": Buffer((b, h, n_rows, d), torch.float32),
        "out": Buffer(out_shape, shape.dtype),
        "linear": Buffer(out_shape, shape.dtype),
        "lse": Buffer((b, h, lq), torch.float32),
    }
    flags = functools.partial(_forward_flags, n_kv=n_kv, linear=s.linear, dtype=shape.dtype,
                              keep=keep_routing)
    steps = [
        kernel_step("key_pass", key_pass, ["k", "v"], ["h_block", "z_block", "h_group"]),
        torch_step("routing_flags", flags, ROUTING, makes=["active", "marginal"]),
        torch_step("linear_states", block_states.query_states, ["h_block", "z_block", "marginal"],
                   fills=["h_rows", "z_rows"]) if marginal else
        torch_step("linear_states", block_states.global_states, ["h_group", "z_block"],
                   fills=["h_rows", "z_rows"]),
        torch_step("projection_operands",
                   functools.partial(_projection_operands, dtype=shape.dtype),
                   ["proj_weight", "proj_bias"], makes=["weight_in", "bias_in"]),
    ]
    gate = []
    if shape.gated:
        steps.append(torch_step("gate_rows", functools.partial(_gate_rows, layout=s.layout),
                                ["gate"], makes=["gate_rows"]))
        gate = ["gate_rows"]
    forward = _spec(target, "gated_forward" if shape.gated else "forward",
                    dict(dim=d, block_q=s.block_q, block_kv=s.block_kv, dtype=dtype,
                         feature=s.feature_map, layout=s.layout,
                         scale=spec.softmax_scale(d, s.scale)), schedule, "forward")
    steps.append(kernel_step(
        "forward", forward, ["q", "k", "v", "lut", "lut_count", "h_rows", "z_rows", "active",
                             "weight_in", "bias_in", *gate], ["out", "linear", "lse"]))
    inputs = ["q", "k", "v", *ROUTING, "proj_weight", "proj_bias", *(["gate"] * shape.gated)]
    return Phase("forward", inputs, ["out", "lse", "linear", "h_rows", "z_rows"], steps,
                 buffers)


def _forward_flags(*tensors: torch.Tensor, n_kv: int, linear: str, dtype: torch.dtype,
                   keep: bool) -> routing.ForwardFlags:
    return routing.forward_flags(Routing(*tensors), n_kv, linear, dtype, keep)


def _backward_flags(*tensors: torch.Tensor, n_kv: int, linear: str, keep: bool) -> torch.Tensor:
    return routing.backward_flags(Routing(*tensors), n_kv, linear, keep)


def _key_major(*tensors: torch.Tensor, n_kv: int, linear: str, dtype: torch.dtype,
               keep: bool) -> routing.KeyMajor:
    return routing.key_major(Routing(*tensors), n_kv, linear, dtype, keep)


def _projection_grads(grad_out: torch.Tensor, linear: torch.Tensor, proj_weight: torch.Tensor,
                      proj_bias: torch.Tensor, *gate: torch.Tensor, dim: int):
    """dW = sum over rows of dO^T O_l, db = sum of dO, both as GEMMs (cuBLAS accumulates in
    float32; a column sum over this many rows is slow as a reduction kernel). With a gate
    the projection's upstream gradient is g dO."""
    upstream = grad_out if not gate else grad_out * gate[0].unsqueeze(-1).to(grad_out.dtype)
    rows = upstream.reshape(-1, dim)
    d_weight = (rows.T @ linear.reshape(-1, dim)).to(proj_weight.dtype)
    d_bias = (rows.new_ones((1, rows.shape[0])) @ rows).squeeze(0).to(proj_bias.dtype)
    return d_weight, d_bias


def _gate_grad(d_gate_rows: torch.Tensor, gate: torch.Tensor, layout: str) -> torch.Tensor:
    """d(gate) in the gate's layout and dtype, from the query pass's float32 (B, H, Lq)."""
    return from_bhsd(d_gate_rows, layout).contiguous().to(gate.dtype)


def _backward(target: Target, shape: CallShape, schedule: Schedule,
              keep_routing: bool) -> Phase:
    s = shape.settings
    b, h, lq, d = shape.batch, shape.heads, shape.lq, shape.dim
    n_q, n_kv = shape.n_q, shape.n_kv
    dtype = shape.dtype_name
    scale = spec.softmax_scale(d, s.scale)
    seq_shape = (b, h, lq, d) if s.layout == "bhsd" else (b, lq, h, d)
    kv_shape = (b, h, shape.lk, d) if s.layout == "bhsd" else (b, shape.lk, h, d)
    buffers = {
        "delta": Buffer((b, h, lq), torch.float32),
        "g_rows": Buffer((b, h, n_q, d, d), shape.dtype),
        "gz_rows": Buffer((b, h, n_q, d), torch.float32),
        "dq": Buffer(seq_shape, shape.dtype),
        "dk": Buffer(kv_shape, shape.dtype),
        "dv": Buffer(kv_shape, shape.dtype),
        "d_gate_rows": Buffer((b, h, lq), torch.float32),
    }
    gate, d_gate = (["gate_rows"], ["d_gate_rows"]) if shape.gated else ([], [])
    steps = [
        torch_step("routing_flags",
                   functools.partial(_backward_flags, n_kv=n_kv, linear=s.linear,
                                     keep=keep_routing),
                   ROUTING, makes=["active"]),
        torch_step("projection_operands",
                   functools.partial(_projection_operands, dtype=shape.dtype),
                   ["proj_weight", "proj_bias"], makes=["weight_in", "bias_in"]),
    ]
    if shape.gated:
        steps.append(torch_step("gate_rows", functools.partial(_gate_rows, layout=s.layout),
                                ["gate"], makes=["gate_rows"]))
    query = _spec(target, "gated_backward_query" if shape.gated else "backward_query",
                  dict(dim=d, block_q=s.block_q, dtype=dtype, feature=s.feature_map,
                       layout=s.layout), schedule)
    dq = _spec(target, "backward_dq", dict(dim=d, block_q=s.block_q, block_kv=s.block_kv,
                                           dtype=dtype, layout=s.layout, scale=scale), schedule)
    dkdv = _spec(target, "backward_dkdv", dict(dim=d, block_q=s.block_q, block_kv=s.block_kv,
                                               dtype=dtype, feature=s.feature_map,
                                               layout=s.layout, scale=scale), schedule)
    steps += [
        kernel_step("backward_query", query,
                    ["q", "grad_out", "out", "linear", "weight_in", "bias_in", *gate, "h_rows",
                     "z_rows", "active"], ["delta", "g_rows", "gz_rows", "dq", *d_gate]),
        kernel_step("backward_dq", dq, ["q", "k", "v", "grad_out", "lse", "delta", "lut",
                                        "lut_count"], ["dq"]),
        torch_step("reverse_lut",
                   functools.partial(_key_major, n_kv=n_kv, linear=s.linear,
                                     dtype=shape.dtype, keep=keep_routing),
                   ROUTING, makes=["reverse", "reverse_count", "marginal_t"]),
        torch_step("key_states", functools.partial(block_states.key_states, n_kv=n_kv),
                   ["g_rows", "gz_rows", "marginal_t"], makes=["dh", "dz"]),
        kernel_step("backward_dkdv", dkdv, ["q", "k", "v", "grad_out", "lse", "delta",
                                            "reverse", "reverse_count", "dh", "dz"],
                    ["dk", "dv"]),
        torch_step("projection_grads", functools.partial(_projection_grads, dim=d),
                   ["grad_out", "linear", "proj_weight", "proj_bias",
                    *(["gate"] * shape.gated)], makes=["d_weight", "d_bias"]),
    ]
    outputs = ["dq", "dk", "dv", "d_weight", "d_bias"]
    if shape.gated:
        steps.append(torch_step("gate_grad", functools.partial(_gate_grad, layout=s.layout),
                                ["d_gate_rows", "gate"], makes=["d_gate"]))
        outputs.append("d_gate")
    inputs = ["grad_out", "q", "k", "v", "out", "lse", "linear", "h_rows", "z_rows", *ROUTING,
              "proj_weight", "proj_bias", *(["gate"] * shape.gated)]
    return Phase("backward", inputs, outputs, steps, buffers)


# ---------------------------------------------------------------- enumeration


def kernels_for(arch: str, dim: int, dtype: str, settings: Settings, gated: bool = False,
                backward: bool = True, schedule: Schedule | None = None,
                selection: str = "sort") -> list[KernelSpec]:
    """Every kernel that routing, the forward and (with `backward`) the backward of a call
    with these settings launch, in order, with `schedule`'s knobs where it sets any (the
    defaults elsewhere; the tuned store is not read). What `sla-tl warm`, the static gate
    and the tuner compile: the kernels a plan launches do not depend on the lengths."""
    from .targets import arch_named

    shape = CallShape(1, 1, settings.block_q, settings.block_kv, dim, getattr(torch, dtype),
                      settings, gated, (1, 0))
    target = Target("", arch_named(arch))
    plan = attention_plan(target, shape, schedule or {})
    return route_phase(target, shape, selection).kernels() + plan.kernels(backward)
