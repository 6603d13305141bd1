"""The host cost of a CUDA call, on a machine without the GPU: the call's plan run on meta
tensors, its kernel launches recorded, not run.

    python -m sla_tl.dry_run [--shape 1,12,32760,128] [--block-q 128] [--block-kv 64] ...

It runs the CUDA backend's own path (`sla_tl.tilelang_backend`: plan lookup, buffers, the
torch steps) for one arch, and reports, per forward (routing and the forward as one plan,
as `sla::attention` runs them, or the forward alone for a fixed routing) and per backward:

- launches: the plan's kernel steps, and the aten ops of its torch steps that would launch
  a CUDA kernel (views and allocations launch none), counted with a TorchDispatchMode, step
  by step;
- host syncs: aten ops that would wait for the GPU (there must be none: the operators are
  captured in CUDA graphs);
- the Python function calls of one call through the operators (`sla::attention`, or
  `sla::attention_lut` for a fixed routing, and the backward through autograd):
  deterministic, so a test can hold them where the time would be noise;
- the host time of that call, measured without the counting on CPU tensors of the smallest
  call with the same plan (one batch entry and head, one block of each size, the smallest
  head dim), the CUDA path standing in for the CPU's: the custom ops' dispatch, the checks
  of their arguments, the plan lookup and each step's Python and dispatch, each torch op's
  work on those few elements standing in for its launch on the GPU (meta tensors would not
  do: many of their ops run Python shape functions, slower than a launch). The kernels'
  own host cost (TileLang's argument checks and launch) is not in it.

The goals are at most 6 launches per forward and per backward and at most 0.1 ms of host
time per call (README, "Host cost"); the tests hold today's numbers (tests/test_dry_run.py).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import Counter
from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import dispatch, plan, spec, tilelang_backend, validation
from .kernels import KernelSpec
from .phases import Step
from .routing import Routing
from .settings import Settings
from .targets import Target, arch_named
from .validation import check_positive_int

META = torch.device("meta")

_ALLOCATIONS = frozenset({"empty", "empty_like", "empty_strided", "new_empty",
                          "new_empty_strided", "_unsafe_view"})
"""aten ops that allocate or re-view memory without launching anything."""
_HOST_SYNCS = frozenset({"_local_scalar_dense", "item", "is_nonzero", "nonzero",
                         "equal", "allclose"})
"""aten ops whose result the host must wait for."""


def _kind(func: torch._ops.OpOverload) -> str:
    """"launch", "sync" or "none" for an aten op run on meta tensors."""
    name = func.overloadpacket.__name__
    if name in _HOST_SYNCS:
        return "sync"
    if func.is_view or name in _ALLOCATIONS:
        return "none"
    return "launch"


class _Recorder(TorchDispatchMode):
    """Counts, per plan step, the aten ops that would launch or synchronise."""

    def __init__(self) -> None:
        super().__init__()
        self.step = "(outside the plan)"
        self.launches: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()
        self.kernels: list[KernelSpec] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kind = _kind(func)
        if kind == "launch":
            self.launches[self.step] += 1
        elif kind == "sync":
            self.syncs[f"{self.step}: {func.overloadpacket.__name__}"] += 1
        return func(*args, **(kwargs or {}))

    @contextlib.contextmanager
    def watch(self, step: Step) -> Iterator[None]:
        before, self.step = self.step, step.name
        try:
            yield
        finally:
            self.step = before

    def launch(self, step: Step, args: list) -> None:
        self.launches[f"{step.name} (kernel)"] += 1
        self.kernels.append(step.kernel)


class PhaseCount(NamedTuple):
    """What one phase of a call launches."""

    kernel_specs: list[KernelSpec]
    """The kernels launched, in order."""
    kernels: int
    torch_ops: int
    by_step: dict[str, int]
    """Launches of each step (a kernel step: "name (kernel)")."""
    syncs: dict[str, int]
    """Host synchronisations by step and op (none expected)."""

    @property
    def launches(self) -> int:
        """Kernels and torch ops together."""
        return self.kernels + self.torch_ops


class HostBudget(NamedTuple):
    """The dry run's figures for one call."""

    forward: PhaseCount
    backward: PhaseCount
    forward_python_calls: int
    backward_python_calls: int
    """Python function calls of one forward and one backward through the operators
    (`smallest` call)."""
    forward_us: float
    """Median host microseconds of a forward through the operators (routing included unless
    the routing is fixed), on the smallest call with the same plan (`smallest`)."""
    backward_us: float


class Call(NamedTuple):
    """The call a dry run measures."""

    batch: int = 1
    heads: int = 12
    length: int = 32760
    dim: int = 128
    settings: Settings = Settings(block_q=128, block_kv=64)
    topk: float = 0.05
    k_low: float = 0.0
    gated: bool = False
    fixed_routing: bool = False
    """One routing given to every call (`attention_with_routing` with a routing used again),
    instead of routing in each (`sla::attention`)."""
    selection: str | None = None
    """How a routed call selects its blocks (`plan.SELECTIONS`; None: the default)."""
    fusions: tuple[str, ...] | None = None
    """The fusions a routed call runs (`plan.FUSIONS`; None: `plan.default_fusions`)."""
    arch: str = "sm_90a"
    dtype: torch.dtype = torch.bfloat16

    def routed_as(self) -> tuple[str, tuple[str, ...]]:
        """The selection and the fusions a routed call runs (those asked for, else the
        defaults for its shape)."""
        shape = plan.CallShape(self.batch, self.heads, self.length, self.length, self.dim,
                               self.dtype, self.settings, self.gated, (1, 0))
        target = Target("", arch_named(self.arch))
        selection = plan.resolve_selection(target, shape, self.selection)
        fusions = (plan.default_fusions(target, shape, selection) if self.fusions is None
                   else tuple(self.fusions))
        return selection, fusions


def _inputs(call: Call, device: torch.device) -> dict[str, torch.Tensor | None]:
    s = call.settings
    seq = ((call.batch, call.heads, call.length, call.dim) if s.layout == "bhsd"
           else (call.batch, call.length, call.heads, call.dim))
    rows = seq[:3]

    def tensor(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.randn(shape, device=device).to(dtype)

    return dict(q=tensor(*seq, dtype=call.dtype), k=tensor(*seq, dtype=call.dtype),
                v=tensor(*seq, dtype=call.dtype), grad=tensor(*seq, dtype=call.dtype),
                weight=tensor(call.dim, call.dim), bias=tensor(call.dim),
                gate=tensor(*rows) if call.gated else None)


class _Runner:
    """One call's forward and backward through the CUDA backend, on meta or CPU tensors."""

    def __init__(self, call: Call, device: torch.device) -> None:
        self.call = call
        self.target = Target("(dry run)", arch_named(call.arch))
        self.inputs = _inputs(call, device)
        self.fixed = self.route(None) if call.fixed_routing else None

    def route(self, recorder: _Recorder | None) -> Routing:
        c, x = self.call, self.inputs
        s = c.settings
        return tilelang_backend.route(x["q"], x["k"], c.topk, c.k_low, s.block_q, s.block_kv,
                                      s.layout, c.selection, target=self.target,
                                      **_recording(recorder))

    def forward(self, recorder: _Recorder | None = None):
        c, x = self.call, self.inputs
        if self.fixed is None:
            return tilelang_backend.routed_forward(
                x["q"], x["k"], x["v"], x["weight"], x["bias"], c.topk, c.k_low, c.settings,
                gate=x["gate"], selection=c.selection, fusions=c.fusions, target=self.target,
                **_recording(recorder))
        saved = tilelang_backend.forward(
            x["q"], x["k"], x["v"], self.fixed, x["weight"], x["bias"], c.settings,
            gate=x["gate"], target=self.target, **_recording(recorder))
        return saved, self.fixed

    def backward(self, saved, routing: Routing, recorder: _Recorder | None = None) -> None:
        x = self.inputs
        tilelang_backend.backward(
            x["grad"], x["q"], x["k"], x["v"], saved, routing, x["weight"], x["bias"],
            self.call.settings, gate=x["gate"], target=self.target, fusions=self.call.fusions,
            **_recording(recorder))


@contextlib.contextmanager
def _denormals_flushed() -> Iterator[None]:
    """CPU arithmetic with denormals flushed while entered: the buffers a left-out kernel
    would have written hold whatever memory held, and denormal inputs would make the torch
    steps after it many times slower than on real values (the timing, not the counts).
    Torch has no getter for the mode: it is put back to torch's default, off."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _no_launch(step: Step, args: list) -> None:
    """A kernel launch left out (the timed runs)."""


def _recording(recorder: _Recorder | None) -> dict:
    """The backend's `launch` and `watch` for a run `recorder` counts (None: a timed run,
    its launches left out)."""
    if recorder is None:
        return dict(launch=_no_launch)
    return dict(launch=recorder.launch, watch=recorder.watch)


def _count(recorder: _Recorder) -> PhaseCount:
    kernels = sum(n for name, n in recorder.launches.items() if name.endswith("(kernel)"))
    total = sum(recorder.launches.values())
    return PhaseCount(recorder.kernels, kernels, total - kernels, dict(recorder.launches),
                      dict(recorder.syncs))


WAN_1_3B = Call()
"""The Wan2.1-1.3B attention call of the benchmarks (bf16, 128x64 blocks, topk 0.05)."""


def smallest(call: Call) -> Call:
    """The smallest call whose plan runs the same steps: one batch entry and head, one block
    each way, the smallest head dim (the host's work does not depend on the sizes)."""
    s = call.settings
    return call._replace(batch=1, heads=1, length=max(s.block_q, s.block_kv),
                         dim=min(spec.HEAD_DIMS))


class _CudaPathOnCpu:
    """A backend for CPU tensors that runs the CUDA backend's path of `call`'s arch (and its
    selection and fusions), its kernel launches left out: the operators' host path, on a
    machine without the GPU."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.target = Target("(dry run)", arch_named(call.arch))

    def route(self, *args):
        return tilelang_backend.route(*args, target=self.target, launch=_no_launch)

    def routed_forward(self, *args, **options):
        return tilelang_backend.routed_forward(
            *args, **options, selection=self.call.selection, fusions=self.call.fusions,
            target=self.target, launch=_no_launch)

    def forward(self, *args, **options):
        return tilelang_backend.forward(*args, **options, target=self.target,
                                        launch=_no_launch)

    def backward(self, *args, **options):
        return tilelang_backend.backward(*args, **options, target=self.target,
                                         fusions=self.call.fusions, launch=_no_launch)


@contextlib.contextmanager
def _operators_on_cpu(call: Call) -> Iterator[None]:
    """The operators' CPU implementation replaced by the CUDA path while entered."""
    reference = dispatch.BACKENDS["cpu"]
    dispatch.BACKENDS["cpu"] = _CudaPathOnCpu(call)
    try:
        yield
    finally:
        dispatch.BACKENDS["cpu"] = reference


class _OperatorCall:
    """One call of the operators (`sla::attention`, or `sla::attention_lut` with a fixed
    routing) and its backward through autograd, on CPU tensors."""

    def __init__(self, call: Call) -> None:
        runner = _Runner(call, torch.device("cpu"))
        self.inputs, self.fixed, self.call = runner.inputs, runner.fixed, call
        for name in ("q", "k", "v"):
            self.inputs[name].requires_grad_()

    def forward(self) -> torch.Tensor:
        x, c = self.inputs, self.call
        settings = c.settings.op_args()
        if self.fixed is None:
            return torch.ops.sla.attention(x["q"], x["k"], x["v"], x["weight"], x["bias"],
                                           c.topk, c.k_low, *settings, x["gate"])
        return torch.ops.sla.attention_lut(x["q"], x["k"], x["v"], *self.fixed, x["weight"],
                                           x["bias"], *settings, x["gate"])

    def backward(self, out: torch.Tensor) -> None:
        out.backward(self.inputs["grad"])


def _check(call: Call) -> None:
    """The operators' own checks of `call` (the smallest call with its plan is what the
    timing runs, so they would not see its sizes)."""
    for name in ("batch", "heads", "length"):
        check_positive_int(name, getattr(call, name))
    if call.dtype not in validation.KERNEL_DTYPES:
        raise TypeError(f"dtype must be one of {', '.join(validation.KERNEL_DTYPE_NAMES)}; "
                        f"got {call.dtype}")
    s = call.settings

    def like(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros((), dtype=dtype).expand(shape)  # metadata only: no memory

    seq = ((call.batch, call.heads, call.length, call.dim) if s.layout == "bhsd"
           else (call.batch, call.length, call.heads, call.dim))
    q = like(*seq, dtype=call.dtype)
    gate = like(*seq[:3]) if call.gated else None
    validation.check_attention(q, q, q, like(call.dim, call.dim), like(call.dim), gate, s,
                               ratios=(call.topk, call.k_low))


def measure(call: Call = WAN_1_3B, repeats: int = 50) -> HostBudget:
    """Launches of one forward and one backward of `call` through the CUDA backend (on
    meta tensors); the Python calls of one, and the median host time of `repeats`, through
    the operators on `smallest(call)` (CPU tensors, the CUDA path standing in for the CPU's;
    each backward after its own forward, so with its own routing unless it is fixed)."""
    check_positive_int("repeats", repeats)
    _check(call)
    runner = _Runner(call, META)
    runner.backward(*runner.forward())  # plans built, routings kept where they would be
    with _Recorder() as forward:
        saved, routing = runner.forward(forward)
    with _Recorder() as backward:
        runner.backward(saved, routing, backward)
    timed = _OperatorCall(smallest(call))
    with _operators_on_cpu(call), _denormals_flushed():
        timed.backward(timed.forward())
        with _PythonCalls() as forward_calls:
            out = timed.forward()
        with _PythonCalls() as backward_calls:
            timed.backward(out)
        forward_s, backward_s = [], []
        for _ in range(repeats):
            start = time.perf_counter()
            out = timed.forward()
            middle = time.perf_counter()
            timed.backward(out)
            forward_s.append(middle - start)
            backward_s.append(time.perf_counter() - middle)
    return HostBudget(_count(forward), _count(backward), forward_calls.count,
                      backward_calls.count, statistics.median(forward_s) * 1e6,
                      statistics.median(backward_s) * 1e6)


class _PythonCalls:
    """Counts the Python function calls made while it is entered (one thread)."""

    def __init__(self) -> None:
        self.count = 0

    def _profile(self, frame, event: str, arg) -> None:
        if event == "call":
            self.count += 1

    def __enter__(self) -> _PythonCalls:
        sys.setprofile(self._profile)
        return self

    def __exit__(self, *exc) -> None:
        sys.setprofile(None)
        self.count -= 1  # __exit__ itself


def _report(call: Call, budget: HostBudget) -> list[str]:
    s = call.settings
    selection, fusions = call.routed_as()
    lines = [f"dry run on {call.arch}: B={call.batch} H={call.heads} L={call.length} "
             f"D={call.dim} {str(call.dtype).removeprefix('torch.')}, blocks "
             f"{s.block_q}x{s.block_kv}, topk {call.topk}, k_low {call.k_low}, {s.linear}"
             f"{', gated' if call.gated else ''}"
             + (", fixed routing" if call.fixed_routing else
                f", routed in each call (selection {selection}, fusions: "
                f"{', '.join(fusions) or 'none'})")]
    if not call.fixed_routing:
        lines += [f"fusion {name}: {plan.FUSIONS[name].summary}" for name in fusions]
    for name, count, calls, us in (
            ("forward", budget.forward, budget.forward_python_calls, budget.forward_us),
            ("backward", budget.backward, budget.backward_python_calls, budget.backward_us)):
        lines.append(f"{name}: {count.launches} launches ({count.kernels} kernels, "
                     f"{count.torch_ops} torch ops), {us:.0f} us of host time per call, "
                     f"{calls} Python calls (goals: 6 launches, 100 us)")
        lines += [f"  {step:<28} {n}" for step, n in count.by_step.items()]
        lines += [f"  host sync! {what} x{n}" for what, n in count.syncs.items()]
    return lines


def main(argv: list[str] | None = None) -> int:
    """Print the dry run's figures for one call."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="1,12,32760,128", help="B,H,L,D")
    parser.add_argument("--block-q", type=int, default=128, help="query block size")
    parser.add_argument("--block-kv", type=int, default=64, help="key block size")
    parser.add_argument("--topk", type=float, default=0.05, help="critical share")
    parser.add_argument("--k-low", type=float, default=0.0, help="negligible share")
    parser.add_argument("--linear", default="marginal", choices=spec.LINEAR_MODES,
                        help="linear branch over the marginal or all blocks")
    parser.add_argument("--gate", action="store_true", help="with SALAD's gate")
    parser.add_argument("--fixed-routing", action="store_true",
                        help="one routing given to every call")
    parser.add_argument("--selection", default=None, choices=plan.SELECTIONS,
                        help="how a routed call selects its blocks")
    parser.add_argument("--fusion", action="append", choices=tuple(plan.FUSIONS),
                        help="a fusion the routed call runs, repeatable (default: the "
                        "default fusions)")
    parser.add_argument("--arch", default="sm_90a", help="the arch whose plan to run")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls")
    args = parser.parse_args(argv)
    try:
        batch, heads, length, dim = _shape(args.shape)
        call = Call(batch=batch, heads=heads, length=length, dim=dim,
                    settings=Settings(block_q=args.block_q, block_kv=args.block_kv,
                                      linear=args.linear),
                    topk=args.topk, k_low=args.k_low, gated=args.gate,
                    fixed_routing=args.fixed_routing, selection=args.selection,
                    fusions=None if args.fusion is None else tuple(args.fusion),
                    arch=args.arch)
        budget = measure(call, args.repeats)
    except (ValueError, TypeError, NotImplementedError) as error:
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    print("\n".join(_report(call, budget)))
    return 0


def _shape(text: str) -> tuple[int, int, int, int]:
    """B,H,L,D from the command line; ValueError naming --shape."""
    try:
        batch, heads, length, dim = (int(n) for n in text.split(","))
    except ValueError:
        raise ValueError(f"--shape must be four integers B,H,L,D; got {text!r}") from None
    return batch, heads, length, dim


if __name__ == "__main__":
    raise SystemExit(main())
