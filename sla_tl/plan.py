"""The plan of a CUDA call: which kernels and torch steps run, in which order, on which
buffers. One object per call shape, resolved once and kept.

A call's work comes in phases (`sla_tl.phases`): routing, the forward, the backward; a
call that routes (`sla::attention`) runs its routing and its forward as one phase, so that
a kernel of one may take over work of the other (see "Fusions" below).

Everything that needs to know which kernels a call runs reads them from a plan: the CUDA
backend executes it, `sla-tl warm`, the static gate (`sla-tl kernels`) and the tuner's
candidates enumerate `kernels_for` (a plan's kernels), and the dry run (`sla_tl.dry_run`)
counts its launches.

A plan is resolved once per call shape (`attention_plan`, `routed_plan`, `route_phase`):
the target (GPU model and arch), the schedule (an override, else the tuned one from the
config store), the kernels' compile arguments and every buffer's shape; the compiled
kernels are fetched on a phase's first run and kept with it.

Fusions: a kernel (or kernel variant) that does the work of a group of steps is a `Fusion`
in `FUSIONS`, a rewrite of the step list of a routed call's forward or backward (the group's
steps go, the kernel step takes their outputs). A plan built with `fusions` runs them;
`DEFAULT_FUSIONS` are the ones a call runs unless it names its own (where they serve it).
Replacing a group of torch ops by a new kernel is one entry there (and its kernel's line in
the arch's kernel table).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from typing import NamedTuple

import tilelang
import torch

from . import block_states, config_store, kernels, routing, spec
from .kernels import KernelSpec, Schedule
from .layout import from_bhsd, to_bhsd
from .phases import Buffer, Phase, Step, kernel_step, torch_step
from .routing import Routing
from .schedules.constants import TMA_ROW_FLOATS
from .settings import ForwardOutputs, Settings
from .targets import Target, arch_named, check_block_sizes

SELECTIONS = ("sort", "kernel")
"""How routing picks each row's blocks from the pooled scores: "sort" (torch: a row sort)
or "kernel" (one selection kernel on the unsmoothed scores, in place of ~10 small torch
launches; the same blocks, up to ties). Unless a call asks, it selects by kernel where the
kernel takes its key blocks, else by sort (`resolve_selection`)."""

ROUTING = Routing._fields
"""The routing's tensors as a plan names them, in the operators' order."""

PLANS_KEPT = 256
"""Plans kept per kind (the least recently used go first): one per call shape."""


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


def _route_steps(target: Target, shape: CallShape,
                 selection: str) -> tuple[list[Step], dict[str, Buffer]]:
    """Pooled block scores (pooling kernels), then each row's critical and negligible
    blocks (`shape.widths` of them) by `selection`: the steps making `ROUTING`."""
    if selection not in SELECTIONS:
        raise ValueError(f"selection must be one of {SELECTIONS}; got {selection!r}")
    s = shape.settings
    b, h, n_q, n_kv, d = shape.batch, shape.heads, shape.n_q, shape.n_kv, shape.dim
    n_crit, n_neg = shape.widths

    def pool(block: int) -> KernelSpec:
        return _spec(target, "pool", dict(dim=d, block=block, dtype=shape.dtype_name,
                                          layout=s.layout))

    buffers = {"pooled_q": Buffer((b, h, n_q, d), torch.float32),
               "pooled_k": Buffer((b, h, n_kv, d), torch.float32)}
    steps = [kernel_step("pool_q", pool(s.block_q), ["q"], ["pooled_q"]),
             kernel_step("pool_k", pool(s.block_kv), ["k"], ["pooled_k"])]
    if selection == "sort":
        steps.append(torch_step(
            "select", functools.partial(routing.select_by_sort, lk=shape.lk, block_kv=s.block_kv,
                                        n_crit=n_crit, n_neg=n_neg),
            ["pooled_q", "pooled_k"], makes=ROUTING))
        return steps, buffers
    limit = target.arch.kernel("select").limits.get("key_blocks")
    if limit is not None and n_kv > limit:
        raise ValueError(f"selection='kernel' takes at most {limit} key blocks; got {n_kv} "
                         "(use selection='sort')")
    buffers.update({name: Buffer(size, routing.DTYPE) for name, size in
                    routing.field_shapes((b, h, n_q), shape.widths)._asdict().items()})
    buffers["scores"] = Buffer((b, h, n_q, n_kv), torch.float32)
    steps += [torch_step("scores", routing.raw_scores, ["pooled_q", "pooled_k"],
                         fills=["scores"]),
              kernel_step("select", _spec(target, "select", {}), ["scores"], ROUTING)]
    return steps, buffers


def resolve_selection(target: Target, shape: CallShape, selection: str | None) -> str:
    """`selection`, or for None the default: the selection kernel where the arch has one
    that takes this many key blocks, else the sort."""
    if selection is not None:
        return selection
    if "select" not in target.arch.kernels:
        return "sort"
    limit = target.arch.kernel("select").limits.get("key_blocks")
    return "sort" if limit is not None and shape.n_kv > limit else "kernel"


def route_phase(target: Target, shape: CallShape, selection: str | None = None) -> Phase:
    """Routing alone (`sla::route`) by `selection` (None: `resolve_selection`'s default):
    see `_route_steps`."""
    return _route_phase(target, shape, resolve_selection(target, shape, selection))


@functools.lru_cache(maxsize=PLANS_KEPT)
def _route_phase(target: Target, shape: CallShape, selection: str) -> Phase:
    s = shape.settings
    check_block_sizes(target.arch, s.block_q, s.block_kv)
    steps, buffers = _route_steps(target, shape, selection)
    return Phase("route", ["q", "k"], ROUTING, steps, buffers)


# ---------------------------------------------------------------- fusions


class Fusion(NamedTuple):
    """A kernel (variant) that does the work of a group of a routed call's steps."""

    summary: str
    """What it takes over (the dry run's report prints it)."""
    refusal: Callable[[CallShape, str | None], str | None]
    """Why it cannot serve a call of this shape and selection (None: it can; the selection
    is None for a call with a given routing)."""
    rewrite: Callable[[list[Step], dict[str, Buffer], CallShape], None]
    """Rewrites the steps and buffers of its phase in place."""
    phase: str = "routed_forward"
    """The phase whose steps it rewrites: "routed_forward" or "backward"."""
    kernel: str | None = None
    """The arch kernel it launches where that kernel's size limits (`KernelDef.limits`)
    bound the calls it can serve by default."""
    needs: tuple[str, ...] = ()
    """The fusions it builds on, which a call naming it must name too."""
    exact: bool = True
    """Whether a call's outputs on its routing are, bit for bit, those without it (False: it
    sums in another order)."""


def _index(steps: list[Step], name: str) -> int:
    return next(i for i, step in enumerate(steps) if step.name == name)


def _with_args(step: Step, fills: tuple[str, ...], **args: object) -> Step:
    """`step` with more compile arguments for its kernel and more buffers to fill."""
    spec_ = step.kernel._replace(args=step.kernel.args + tuple(args.items()))
    return step._replace(kernel=spec_, fills=step.fills + fills)


def _pooled_keys(steps: list[Step], buffers: dict[str, Buffer], shape: CallShape) -> None:
    key_pass = steps.pop(_index(steps, "key_pass"))
    del steps[_index(steps, "pool_k")]
    # First: routing reads the pooled K it writes.
    steps.insert(0, _with_args(key_pass, ("pooled_k",), pool_keys=True))


def _selection_block_map(steps: list[Step], buffers: dict[str, Buffer],
                         shape: CallShape) -> None:
    index = _index(steps, "select")
    steps[index] = _with_args(steps[index], ("marginal", "active"),
                              block_map_dtype=shape.dtype_name)
    del steps[_index(steps, "routing_flags")]
    rows = (shape.batch, shape.heads, shape.n_q)
    buffers.update(marginal=Buffer((*rows, shape.n_kv), shape.dtype),
                   active=Buffer(rows, torch.int32))


def _with_float_map(steps: list[Step], buffers: dict[str, Buffer], shape: CallShape,
                    kernel: str) -> None:
    """The step `kernel`, which writes the marginal map, writes it in float32 as well, to
    the buffer "marginal_f32"."""
    index = _index(steps, kernel)
    steps[index] = _with_args(steps[index], ("marginal_f32",), float_map=True)
    buffers["marginal_f32"] = Buffer((shape.batch, shape.heads, shape.n_q, shape.n_kv),
                                     torch.float32)


def _selection_float_map(steps: list[Step], buffers: dict[str, Buffer],
                         shape: CallShape) -> None:
    _with_float_map(steps, buffers, shape, "select")
    steps[_index(steps, "linear_states")] = torch_step(
        "linear_states", block_states.query_states_of_maps,
        ["h_block", "z_block", "marginal", "marginal_f32"], fills=["h_rows", "z_rows"])


def _with_dim(step: Step, dim: int, **args: object) -> tuple[tuple[str, object], ...]:
    """The compile arguments of `step`'s kernel with the head dim (once) and `args`."""
    have = step.kernel.args
    return have + ((("dim", dim),) if "dim" not in dict(have) else ()) + tuple(args.items())


def _selection_scores(steps: list[Step], buffers: dict[str, Buffer], shape: CallShape) -> None:
    del steps[_index(steps, "scores")]
    del buffers["scores"]
    index = _index(steps, "select")
    select = steps[index]
    steps[index] = select._replace(
        kernel=select.kernel._replace(args=_with_dim(select, shape.dim, pooled_scores=True)),
        reads=("pooled_q", "pooled_k"))


def _selection_z_rows(steps: list[Step], buffers: dict[str, Buffer], shape: CallShape) -> None:
    index = _index(steps, "select")
    select = steps[index]
    # Z_i's GEMM goes, and with it the reader of the float32 map (selection_float_map's).
    args = tuple(arg for arg in _with_dim(select, shape.dim, z_rows=True)
                 if arg[0] != "float_map")
    fills = tuple(name for name in select.fills if name != "marginal_f32")
    buffers.pop("marginal_f32", None)
    steps[index] = select._replace(kernel=select.kernel._replace(args=args),
                                   reads=(*select.reads, "z_block", "z_total"),
                                   fills=(*fills, "z_rows"))
    steps.insert(index, torch_step("z_total", block_states.key_blocks_total, ["z_block"],
                                   makes=["z_total"]))
    steps[_index(steps, "linear_states")] = torch_step(
        "linear_states", block_states.query_h_states, ["h_block", "marginal"],
        fills=["h_rows"])


def _key_major_step(shape: CallShape, arch: str,
                    buffers: dict[str, Buffer]) -> tuple[Step, bool]:
    """The key-major kernel's step for this call (its buffers added to `buffers`), and
    whether it writes the marginal map ("marginal" mode)."""
    limit = arch_named(arch).kernel("key_major").limits.get("query_blocks")
    if limit is not None and shape.n_q > limit:
        raise ValueError(f"the key-major kernel takes at most {limit} query blocks; got "
                         f"{shape.n_q} (leave its fusions out)")
    marginal = shape.settings.linear == "marginal"
    block_map = {"block_map_dtype": shape.dtype_name} if marginal else {}
    reads = list(ROUTING) if marginal else ["lut", "lut_count"]
    step = kernel_step("key_major", KernelSpec("key_major", tuple(block_map.items()), arch),
                       reads, ["reverse", "reverse_count", *(["marginal"] * marginal),
                               "active"])
    rows, keys = (shape.batch, shape.heads, shape.n_q), (shape.batch, shape.heads, shape.n_kv)
    buffers.update(reverse=Buffer((*keys, shape.n_q), torch.int32),
                   reverse_count=Buffer(keys, torch.int32), active=Buffer(rows, torch.int32))
    if marginal:
        buffers["marginal"] = Buffer((*rows, shape.n_kv), shape.dtype)
    return step, marginal


def _key_major_kernel(steps: list[Step], buffers: dict[str, Buffer], shape: CallShape) -> None:
    kernel, marginal = _key_major_step(shape, steps[_index(steps, "backward_dkdv")].kernel.arch,
                                       buffers)
    # The key blocks' states weigh by the transposed map, as a view (what the torch step
    # makes), so that their GEMMs see the same operand layout.
    view = (torch_step("marginal_t", _transposed, ["marginal"], makes=["marginal_t"])
            if marginal else torch_step("marginal_t", _no_map, [], makes=["marginal_t"]))
    del steps[_index(steps, "reverse_lut")]
    # First, where the flags were made: the query pass reads them.
    index = _index(steps, "routing_flags")
    steps[index:index + 1] = [kernel, view]


def _key_major_float_map(steps: list[Step], buffers: dict[str, Buffer],
                         shape: CallShape) -> None:
    _with_float_map(steps, buffers, shape, "key_major")
    steps[_index(steps, "marginal_t")] = torch_step(
        "marginal_t", _transposed_pair, ["marginal", "marginal_f32"],
        makes=["marginal_t", "marginal_t_f32"])
    steps[_index(steps, "key_states")] = torch_step(
        "key_states", functools.partial(block_states.key_states_of_maps, n_kv=shape.n_kv),
        ["g_rows", "gz_rows", "marginal_t", "marginal_t_f32"], makes=["dh", "dz"])


def _transposed_pair(marginal: torch.Tensor,
                     marginal_f32: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return marginal.transpose(-1, -2), marginal_f32.transpose(-1, -2)


def _needs_marginal(shape: CallShape, selection: str | None) -> str | None:
    if shape.settings.linear != "marginal":
        return "needs linear='marginal' (the global branch has no block map)"
    return None


def _key_major_flags(steps: list[Step], buffers: dict[str, Buffer], shape: CallShape) -> None:
    kernel, _ = _key_major_step(shape, steps[_index(steps, "forward")].kernel.arch, buffers)
    steps[_index(steps, "routing_flags")] = kernel


def _needs_marginal_sort_selection(shape: CallShape, selection: str | None) -> str | None:
    if selection != "sort":
        return ("needs selection='sort' (with the selection kernel, selection_block_map "
                "writes the map)")
    if shape.settings.linear != "marginal":
        return "needs linear='marginal' (the global branch has no block map)"
    return None


def _transposed(marginal: torch.Tensor) -> torch.Tensor:
    return marginal.transpose(-1, -2)


def _no_map() -> None:
    return None


def _needs_kernel_selection(shape: CallShape, selection: str | None) -> str | None:
    return None if selection == "kernel" else "needs selection='kernel'"


def _needs_marginal_kernel_selection(shape: CallShape, selection: str | None) -> str | None:
    if selection != "kernel":
        return "needs selection='kernel'"
    if shape.settings.linear != "marginal":
        return "needs linear='marginal' (the global branch has no block map)"
    return None


FUSIONS: dict[str, Fusion] = {
    "pooled_keys": Fusion(
        "the key pass also writes routing's pooled K (the pool_k kernel goes)",
        lambda shape, selection: None, _pooled_keys),
    "selection_block_map": Fusion(
        "the selection kernel also writes the marginal block map and the rows' flags (the "
        "routing_flags torch ops go)",
        _needs_marginal_kernel_selection, _selection_block_map),
    "selection_float_map": Fusion(
        "the selection kernel also writes the marginal block map in float32, for Z_i's GEMM "
        "(the map's cast goes; with selection_block_map)",
        _needs_marginal_kernel_selection, _selection_float_map,
        needs=("selection_block_map",)),
    "selection_scores": Fusion(
        "the selection kernel makes the block scores from the pooled blocks itself (the "
        "scores' GEMM goes)",
        _needs_kernel_selection, _selection_scores),
    "selection_z_rows": Fusion(
        "the selection kernel also writes each row's Z_i, the key blocks' total less its "
        "excluded blocks' z_j (Z_i's GEMM goes, and with it the float32 map; with "
        "pooled_keys and selection_block_map)",
        _needs_marginal_kernel_selection, _selection_z_rows,
        needs=("pooled_keys", "selection_block_map"), exact=False),
    "key_major_flags": Fusion(
        "the key-major kernel writes the forward's marginal block map and rows' flags from a "
        "sorted routing (the routing_flags torch ops go)",
        _needs_marginal_sort_selection, _key_major_flags),
    "key_major_kernel": Fusion(
        "one kernel writes the backward's reverse LUT, marginal block map and rows' flags "
        "(the reverse_lut and routing_flags torch ops go)",
        lambda shape, selection: None, _key_major_kernel, phase="backward",
        kernel="key_major"),
    "key_major_float_map": Fusion(
        "the key-major kernel also writes the marginal block map in float32, for dZ_j's GEMM "
        "(the map's cast goes; with key_major_kernel)",
        _needs_marginal, _key_major_float_map, phase="backward", kernel="key_major",
        needs=("key_major_kernel",)),
}
"""The fusions a routed call may run, by name, applied in this order."""

DEFAULT_FUSIONS: tuple[str, ...] = ("pooled_keys", "selection_block_map", "selection_float_map",
                                    "key_major_kernel", "key_major_float_map")
"""The fusions a routed call runs unless it names its own, where they serve it
(`default_fusions`). "key_major_flags" runs when asked (`fusions`), for the GPU tests and
the benchmarks: it is slower than the selection kernel's block map. "selection_scores"
and "selection_z_rows" run when asked: compiled for sm_90a, their GPU tests not yet run.
"key_major_kernel"
serves every backward, a fixed routing's too: there it reruns each backward (0.06 ms at
the Wan2.1-1.3B shape on the H200) what the torch steps it replaces would keep with the
routing, while a call that routes saves their ~45 launches and ~0.1 ms."""

def default_fusions(target: Target, shape: CallShape, selection: str | None) -> tuple[str, ...]:
    """The fusions of `DEFAULT_FUSIONS` that serve a call of this shape and (resolved)
    selection (None: a given routing) on `target`'s arch, within their kernels' limits."""
    serving = fusions_serving(shape, selection)
    return tuple(name for name in DEFAULT_FUSIONS if name in serving
                 and _within_limits(target, FUSIONS[name].kernel, shape))


def _within_limits(target: Target, kind: str | None, shape: CallShape) -> bool:
    """Whether the arch's kernel `kind` (None: no kernel of its own) takes this call's
    query and key blocks."""
    if kind is None:
        return True
    limits = target.arch.kernel(kind).limits
    return (shape.n_q <= limits.get("query_blocks", shape.n_q)
            and shape.n_kv <= limits.get("key_blocks", shape.n_kv))


def _in_order(fusions: Collection[str]) -> tuple[str, ...]:
    """Fusions by name, in `FUSIONS`' order; ValueError naming one that is not there."""
    for name in fusions:
        if name not in FUSIONS:
            raise ValueError(f"fusions must be among {', '.join(FUSIONS)}; got {name!r}")
    return tuple(name for name in FUSIONS if name in fusions)


@functools.lru_cache(maxsize=64)
def by_phase(fusions: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The fusions among `fusions` that rewrite a routed call's forward, and those that
    rewrite its backward, each in `FUSIONS`' order (ValueError naming one that is not
    there). Kept per tuple: the operators ask on every call."""
    chosen = _in_order(fusions)
    return (tuple(name for name in chosen if FUSIONS[name].phase == "routed_forward"),
            tuple(name for name in chosen if FUSIONS[name].phase == "backward"))


def fusions_serving(shape: CallShape, selection: str | None) -> tuple[str, ...]:
    """Every fusion that can serve a call of this shape and selection (None: a given
    routing), in `FUSIONS`' order: what "all the fusions" means for a call."""
    return tuple(name for name, fusion in FUSIONS.items()
                 if fusion.refusal(shape, selection) is None
                 and (selection is not None or fusion.phase == "backward"))


def _check_fusions(fusions: tuple[str, ...], shape: CallShape, selection: str | None) -> None:
    """ValueError naming a fusion that cannot serve this call, or that lacks a fusion it
    builds on."""
    for name in fusions:
        refusal = FUSIONS[name].refusal(shape, selection)
        if refusal is not None:
            raise ValueError(f"fusion {name!r} {refusal}")
        for needed in FUSIONS[name].needs:
            if needed not in fusions:
                raise ValueError(f"fusion {name!r} needs {needed!r} too (it builds on it)")


# ---------------------------------------------------------------- attention


class AttentionPlan(NamedTuple):
    """The forward and backward phases of a call."""

    target: Target
    shape: CallShape
    schedule: Schedule
    """The schedule knobs its kernels are built with, by tunable kernel."""
    forward: Phase
    """The forward for a given routing, or (`routed_plan`) routing then the forward: its
    outputs are then `ForwardOutputs`' fields followed by `ROUTING`."""
    backward: Phase

    def kernels(self, backward: bool = True) -> list[KernelSpec]:
        """Every kernel the forward (and the backward) launches, in order."""
        return self.forward.kernels() + (self.backward.kernels() if backward else [])


class _Routed(NamedTuple):
    """How a routed plan routes (None: the defaults for the call's shape)."""

    selection: str | None
    fusions: tuple[str, ...] | None


def _frozen(schedule: Schedule | None) -> tuple | None:
    if schedule is None:
        return None
    return tuple(sorted((kernel, kernels.freeze(knobs)) for kernel, knobs in schedule.items()))


def attention_plan(target: Target, shape: CallShape, schedule: Schedule | None = None,
                   keep_routing: bool = True,
                   fusions: Collection[str] | None = None) -> AttentionPlan:
    """The plan of a call with a given routing: `schedule` overrides the stored one (the
    tuner's candidates, the benchmarks' alternatives); `keep_routing`: what the forward
    and the backward derive from the routing is kept with it, for later calls with the
    same routing (see `sla_tl.routing`); `fusions` (None: `default_fusions`) of the
    backward's steps (ValueError naming one of a routed forward's: there is none here)."""
    if fusions is None:  # the defaults, resolved with the plan (once per shape)
        return _resolved(target, shape, schedule, keep_routing, None, None)
    forward_fusions, backward_fusions = by_phase(tuple(fusions))
    if forward_fusions:
        raise ValueError(f"fusion {forward_fusions[0]!r} rewrites the forward of a call that "
                         "routes; this call's routing is given")
    return _resolved(target, shape, schedule, keep_routing, None, backward_fusions)


def routed_plan(target: Target, shape: CallShape, schedule: Schedule | None = None,
                selection: str | None = None,
                fusions: Collection[str] | None = None) -> AttentionPlan:
    """The plan of a call that routes (`sla::attention`): routing by `selection` (None:
    `resolve_selection`'s default), then the forward, as one phase, with `fusions` (None:
    `default_fusions`); `schedule` as for `attention_plan`. The routing is the call's own,
    valid by construction: nothing derived from it is kept for another call, and it is not
    checked."""
    if fusions is None:  # the defaults, resolved with the plan (once per shape)
        return _resolved(target, shape, schedule, False, _Routed(selection, None), None)
    forward_fusions, backward_fusions = by_phase(tuple(fusions))
    return _resolved(target, shape, schedule, False, _Routed(selection, forward_fusions),
                     backward_fusions)


def _resolved(target: Target, shape: CallShape, schedule: Schedule | None, keep_routing: bool,
              routed: _Routed | None,
              backward_fusions: tuple[str, ...] | None) -> AttentionPlan:
    if schedule is None:
        # The store's schedule: plans of a store are dropped when it is read again.
        store = config_store.active_store()
        return _attention_plan(target, shape, None, keep_routing, routed, backward_fusions,
                               store, store.generation)
    return _attention_plan(target, shape, _frozen(schedule), keep_routing, routed,
                           backward_fusions, None, 0)


@functools.lru_cache(maxsize=PLANS_KEPT)
def _attention_plan(target: Target, shape: CallShape, frozen: tuple | None, keep_routing: bool,
                    routed: _Routed | None, backward_fusions: tuple[str, ...] | None,
                    store: config_store.ConfigStore | None,
                    generation: int) -> AttentionPlan:
    s = shape.settings
    check_block_sizes(target.arch, s.block_q, s.block_kv)
    if store is not None:
        schedule = store.lookup(shape.call_key(target)).schedule
    else:
        schedule = {kernel: dict(knobs) for kernel, knobs in frozen}
    steps, buffers = _forward_steps(target, shape, schedule, keep_routing,
                                    check_routing=routed is None)
    inputs = ["q", "k", "v", *ROUTING, "proj_weight", "proj_bias", *(["gate"] * shape.gated)]
    outputs = list(ForwardOutputs._fields)
    phase_name = "forward"
    selection = None
    if routed is not None:
        selection = resolve_selection(target, shape, routed.selection)
        forward_fusions = (by_phase(default_fusions(target, shape, selection))[0]
                           if routed.fusions is None else routed.fusions)
        _check_fusions(forward_fusions, shape, selection)
        route_steps, route_buffers = _route_steps(target, shape, selection)
        steps, buffers = route_steps + steps, {**route_buffers, **buffers}
        for fusion in forward_fusions:
            FUSIONS[fusion].rewrite(steps, buffers, shape)
        inputs = [tensor for tensor in inputs if tensor not in ROUTING]
        outputs += ROUTING
        phase_name = "routed_forward"
    forward = Phase(phase_name, inputs, outputs, steps, buffers)
    if backward_fusions is None:
        backward_fusions = by_phase(default_fusions(target, shape, selection))[1]
    _check_fusions(backward_fusions, shape, selection)
    return AttentionPlan(target, shape, schedule, forward,
                         _backward(target, shape, schedule, keep_routing, backward_fusions))


def _spec(target: Target, kind: str, args: dict, schedule: Schedule | None = None) -> KernelSpec:
    """One kernel of the arch's table, with the knobs `schedule` sets for the kernel it is
    tuned as; NotImplementedError naming a kernel the arch lacks."""
    definition = target.arch.kernel(kind)
    knobs = kernels.knobs_of(schedule, definition.tuned_as or kind)
    return KernelSpec(kind, tuple(args.items()), target.arch.target, knobs)


def _projection_operands(weight: torch.Tensor, bias: torch.Tensor, dtype: torch.dtype):
    """The projection as the kernels read it: the weight in the inputs' dtype, the bias in
    float32, both dense."""
    return weight.to(dtype).contiguous(), bias.float().contiguous()


def _gate_rows(gate: torch.Tensor, layout: str) -> torch.Tensor:
    """The gate as the gated kernels read it: float32 (B, H, Lq), dense."""
    return to_bhsd(gate, layout).float().contiguous()


def _forward_steps(target: Target, shape: CallShape, schedule: Schedule, keep_routing: bool,
                   check_routing: bool) -> tuple[list[Step], dict[str, Buffer]]:
    """The forward's steps for a routing (`ROUTING`) and their buffers. `check_routing`:
    the rows that break a rule of a valid routing get NaN (a routing from the caller)."""
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
                              keep=keep_routing, check=check_routing)
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
                         scale=spec.softmax_scale(d, s.scale)), schedule)
    steps.append(kernel_step(
        "forward", forward, ["q", "k", "v", "lut", "lut_count", "h_rows", "z_rows", "active",
                             "weight_in", "bias_in", *gate], ["out", "linear", "lse"]))
    return steps, buffers


def _forward_flags(*tensors: torch.Tensor, n_kv: int, linear: str, dtype: torch.dtype,
                   keep: bool, check: bool) -> routing.ForwardFlags:
    return routing.forward_flags(Routing(*tensors), n_kv, linear, dtype, keep, check)


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
    # torch.mm itself: the GEMMs `@` would run on these 2-D operands, with fewer ops on
    # the host around them.
    d_weight = torch.mm(rows.t(), linear.reshape(-1, dim)).to(proj_weight.dtype)
    d_bias = torch.mm(rows.new_ones((1, rows.shape[0])), rows).view(dim).to(proj_bias.dtype)
    return d_weight, d_bias


def _gate_grad(d_gate_rows: torch.Tensor, gate: torch.Tensor, layout: str) -> torch.Tensor:
    """d(gate) in the gate's layout and dtype, from the query pass's float32 (B, H, Lq)."""
    return from_bhsd(d_gate_rows, layout).contiguous().to(gate.dtype)


def _tma_rows(lse: torch.Tensor, delta: torch.Tensor, rows: int):
    """LSE and delta padded with zeros to `rows` (a multiple of TMA_ROW_FLOATS), for dK/dV's
    TMA loads."""
    pad = (0, rows - lse.shape[-1])
    return torch.nn.functional.pad(lse, pad), torch.nn.functional.pad(delta, pad)


def _backward(target: Target, shape: CallShape, schedule: Schedule, keep_routing: bool,
              fusions: tuple[str, ...]) -> Phase:
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
    ]
    # dK/dV loads LSE and delta by TMA, which needs their rows padded (TMA_ROW_FLOATS).
    tma_rows = -(-lq // TMA_ROW_FLOATS) * TMA_ROW_FLOATS
    row_vectors = ["lse", "delta"]
    if tma_rows != lq:
        row_vectors = ["lse_rows", "delta_rows"]
        steps.append(torch_step("tma_rows", functools.partial(_tma_rows, rows=tma_rows),
                                ["lse", "delta"], makes=row_vectors))
    steps += [
        kernel_step("backward_dkdv", dkdv, ["q", "k", "v", "grad_out", *row_vectors,
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
    for fusion in fusions:
        FUSIONS[fusion].rewrite(steps, buffers, shape)
    inputs = ["grad_out", "q", "k", "v", "out", "lse", "linear", "h_rows", "z_rows", *ROUTING,
              "proj_weight", "proj_bias", *(["gate"] * shape.gated)]
    return Phase("backward", inputs, outputs, steps, buffers)


# ---------------------------------------------------------------- enumeration


def kernels_for(arch: str, dim: int, dtype: str, settings: Settings, gated: bool = False,
                backward: bool = True, schedule: Schedule | None = None,
                selection: str | None = None, fusions: Collection[str] | None = None,
                routes: bool | None = None) -> list[KernelSpec]:
    """Every kernel that a call with these settings launches, in order, with `schedule`'s
    knobs where it sets any (the defaults elsewhere; the tuned store is not read): with
    `routes`, a call that routes (`routed_plan`, by `selection` and `fusions`); with
    `routes=False`, a call with a given routing (`attention_plan`); with None, both, and the
    routing that makes a given one (`route_phase`), each kernel once. What `sla-tl warm`,
    the static gate and the tuner compile (None): the kernels a plan launches do not depend
    on the lengths. `backward` adds the backward's."""
    shape = CallShape(1, 1, settings.block_q, settings.block_kv, dim, getattr(torch, dtype),
                      settings, gated, (1, 0))
    target = Target("", arch_named(arch))

    def routed() -> list[KernelSpec]:
        return routed_plan(target, shape, schedule or {}, selection, fusions).kernels(backward)

    def given() -> list[KernelSpec]:
        backward_fusions = None if fusions is None else by_phase(tuple(fusions))[1]
        return attention_plan(target, shape, schedule or {}, True,
                              backward_fusions).kernels(backward)

    if routes is not None:
        return routed() if routes else given()
    making = route_phase(target, shape, selection).kernels()
    return list(dict.fromkeys(routed() + making + given()))
