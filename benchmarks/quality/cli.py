"""`sla-tl quality`: does fine-tuning with sparse attention recover dense quality?

    sla-tl quality --seeds 0,1,2 --out q.json --plot q.png     # CPU size: a video DiT
    sla-tl quality --size gpu --seeds 0 --out q0.json           # GPU size, CUDA kernels
    sla-tl quality --from q0.json q1.json q2.json --plot q.png  # merge and report runs
    sla-tl quality --activations qkv.pt                         # your captured q, k, v
    sla-tl quality --task mypackage.tasks:make_task --size cpu  # your own small model

Pretrains the model with dense attention, fine-tunes every arm (dense, sparse_only, sla,
sla_klow10, salad) the same number of steps on the same batches, and reports per arm the
held-out loss relative to dense, the attention output's error against dense attention on
the model's own activations, and the time per training step (means and spreads over seeds).

--task names a function (seed: int, device: torch.device) -> task, where a task has
build(make_attention) -> nn.Module (every attention to measure goes through cores made by
make_attention(head_dim), mapping q, k, v (B, H, L, D) to the output), train_batch(step),
heldout_batches() and loss(model, batch) -> scalar tensor (sla_tl.benchmarks.quality.tasks).
--activations takes a torch.save file of {"q", "k", "v"} (or a list of them, one per layer),
each (B, H, L, D) with B >= 2: the cores are fitted to dense attention on all samples but
the last, which is held out.

Exit status: 0 when it ran, 1 when training diverged, 2 on bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

from .arms import ARM_NAMES, arm_named, sparsity
from .results import load, make_result, merge, save
from .sizes import SIZES, ProtocolSettings

# Every protocol setting has a command-line override: field -> its type.
_OVERRIDES = {f.name: {"int": int, "float": float}[f.type]
              for f in dataclasses.fields(ProtocolSettings)}


class UsageError(Exception):
    """A request that cannot be served (exit status 2)."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sla-tl quality", description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n".join(__doc__.splitlines()[1:]))
    what = parser.add_argument_group("what to run")
    what.add_argument("--size", choices=tuple(SIZES), default=None,
                      help="the built-in task's size and the protocol's defaults: "
                      + "; ".join(f"{name}: {s.description}" for name, s in SIZES.items())
                      + " (default: cpu, or gpu with --device cuda)")
    source = what.add_mutually_exclusive_group()
    source.add_argument("--task", metavar="MODULE:FUNCTION",
                        help="fine-tune your own task instead of the built-in video DiT")
    source.add_argument("--activations", metavar="FILE",
                        help="fine-tune attention alone on captured q, k, v")
    what.add_argument("--layout", choices=("bhsd", "bshd"), default="bhsd",
                      help="layout of the tensors in --activations")
    what.add_argument("--seeds", default="0", help="comma-separated seeds (default 0)")
    what.add_argument("--arms", default=",".join(ARM_NAMES),
                      help=f"comma-separated, dense included (default {','.join(ARM_NAMES)})")
    what.add_argument("--device", choices=("cpu", "cuda"), default=None,
                      help="default: the size's (cpu for smoke and cpu, cuda for gpu)")
    what.add_argument("--threads", type=int, default=None,
                      help="torch CPU threads (default: torch's; on a busy shared machine 1 "
                      "is often fastest)")
    protocol = parser.add_argument_group("protocol (defaults from --size)")
    for name, kind in _OVERRIDES.items():
        protocol.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None)
    out = parser.add_argument_group("results")
    out.add_argument("--out", help="write the JSON result here")
    out.add_argument("--plot", help="write the PNG here (needs matplotlib)")
    out.add_argument("--from", dest="inputs", nargs="+", metavar="RESULT",
                     help="report these results (merged) instead of running")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(x) for x in _csv(text)]
    except ValueError:
        raise UsageError(f"--seeds wants comma-separated integers; got {text!r}") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise UsageError(f"--seeds wants distinct non-negative integers; got {text!r}")
    return seeds


def _protocol(args: argparse.Namespace, size_name: str) -> ProtocolSettings:
    given = {name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None}
    if args.activations and "pretrain_steps" not in given:
        given["pretrain_steps"] = 0  # attention alone: nothing to pretrain
    return dataclasses.replace(SIZES[size_name].protocol, **given)


def _device(args: argparse.Namespace, size_name: str) -> torch.device:
    device = torch.device(args.device or SIZES[size_name].device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda (or --size gpu) needs a CUDA GPU and none is visible "
                         "to torch; use --size cpu")
    return device


def _task(args: argparse.Namespace, size_name: str) -> tuple:
    """(task factory, settings that describe the task)."""
    from .tasks import VideoDenoisingTask, check_task, load_task_factory

    if args.activations:
        from .activations import ActivationsTask, load_activations

        captured = load_activations(args.activations, args.layout)
        return (lambda seed, device: ActivationsTask(captured, device),
                dict(task=f"activations:{os.path.basename(args.activations)}",
                     loss="||O - O_dense||^2 / ||O_dense||^2 on held-out samples",
                     loss_against_dense=True))
    if args.task:
        factory = load_task_factory(args.task)
        return (lambda seed, device: check_task(factory(seed, device), args.task),
                dict(task=args.task, loss="the task's", loss_against_dense=False))
    task_size = SIZES[size_name].task
    return (lambda seed, device: VideoDenoisingTask(task_size, seed, device),
            dict(task="video_dit", size=size_name, task_size=dataclasses.asdict(task_size),
                 loss="flow-matching velocity MSE", loss_against_dense=False))


def _prewarm(settings: ProtocolSettings, arms: list, head_dim: int) -> None:
    """Compile the arms' CUDA kernels in parallel processes before training starts."""
    from sla_tl.parallel import compile_in_parallel
    from sla_tl.plan import kernels_for
    from sla_tl.settings import Settings
    from sla_tl.targets import target_of

    arch = target_of(torch.device("cuda")).arch.target
    specs = []
    for arm in arms:
        if arm.sparse:
            s = Settings(block_q=settings.block_q, block_kv=settings.block_kv, linear=arm.linear)
            specs += kernels_for(arch, head_dim, "bfloat16", s, gated=arm.gate)
    print(f"compiling {len(set(specs))} sla-tl kernels for {arch}", file=sys.stderr, flush=True)
    compile_in_parallel(specs)


def _measure(args: argparse.Namespace) -> dict:
    from ..environment import describe_environment
    from .protocol import run_protocol

    size_name = args.size or ("gpu" if args.device == "cuda" else "cpu")
    device = _device(args, size_name)
    if args.threads is not None:
        if args.threads < 1:
            raise UsageError(f"--threads must be at least 1; got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = _protocol(args, size_name)
    arms = [arm_named(name) for name in _csv(args.arms)]
    if len({a.name for a in arms}) != len(arms):
        raise UsageError(f"--arms lists an arm twice: {args.arms!r}")
    seeds = _seeds(args.seeds)
    factory, described = _task(args, size_name)
    if device.type == "cuda" and described["task"] == "video_dit":
        _prewarm(settings, arms, SIZES[size_name].task.model.head_dim)
    environment = describe_environment()  # the commit and date at the start
    measured = run_protocol(factory, settings, arms, seeds, device, progress=not args.quiet,
                            log=lambda line: print(line, file=sys.stderr, flush=True))
    lengths = measured["lengths"]
    doc_settings = dict(
        described, device=str(device), protocol=measured["protocol"],
        sparsity=sparsity(settings.topk, lengths[0], settings.block_kv)
        if len(lengths) == 1 else None, tokens=lengths,
        arms=[dataclasses.asdict(a) for a in arms], seeds=seeds, threads=torch.get_num_threads(),
        command=" ".join(["sla-tl", "quality", *args.command_line]))
    doc_settings.setdefault("size", None)
    return make_result(environment, doc_settings, measured["pretrain"], measured["runs"])


def _check_writable(path: str | None, option: str) -> None:
    if path and not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        raise UsageError(f"{option} {path}: its directory does not exist")


def run(args: argparse.Namespace) -> int:
    """Measure (or read) a result, write and report it; the exit status."""
    from .report import format_report

    if args.plot:
        from ..plot import require_matplotlib

        require_matplotlib()
    _check_writable(args.out, "--out")
    _check_writable(args.plot, "--plot")
    if args.inputs:
        docs = [load(path) for path in args.inputs]
        doc = merge(docs) if len(docs) > 1 else docs[0]
    else:
        doc = _measure(args)
    if args.out:
        save(doc, args.out)
    print(format_report(doc), flush=True)
    if args.out:
        print(f"wrote {args.out}")
    if args.plot:
        from .plot import write_plot

        write_plot(doc, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _one_line(error: BaseException) -> str:
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def main(argv: list[str] | None = None) -> int:
    """Entry point of `sla-tl quality`."""
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    args.command_line = argv
    try:
        return run(args)
    except FloatingPointError as error:
        print(f"sla-tl quality: training diverged: {error}", file=sys.stderr)
        return 1
    except (UsageError, ValueError, TypeError, ImportError) as error:
        print(f"sla-tl quality: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
