"""The throughput gate: sla-tl's speedup over dense cuDNN, against a committed baseline.

Both times in a speedup come from the same run, so a noisy or different machine of the
same GPU model moves both and the ratio holds. A baseline from another GPU model is
refused, and so is one timed another way (`timing.TIMINGS`). A case fails when its
speedup falls by more than the tolerance (relative to the baseline's), or when it was
not measured.

Gate with kernel timing (`--timing kernels`, CUDA graph replays): the host's share of a
short call depends on the machine's CPU, which a ratio against cuDNN does not cancel.
"""

from __future__ import annotations

from dataclasses import dataclass

from sla_tl.validation import is_finite_positive

from .result_file import describe_row, row_key
from .suite import Case, Shape
from .systems import GATED_SYSTEM


class WrongGPUError(ValueError):
    """The baseline was measured on another GPU model than the result."""


@dataclass(frozen=True)
class Verdict:
    """One gated case: its speedups and, when it fails, why."""

    name: str
    baseline: float
    current: float | None
    failure: str | None

    @property
    def drop(self) -> float | None:
        """Relative fall of the speedup (negative when it rose)."""
        return None if self.current is None else 1.0 - self.current / self.baseline


def check_tolerance(tolerance: float) -> None:
    """ValueError unless `tolerance` (the largest allowed relative fall) is in [0, 1)."""
    if not 0.0 <= tolerance < 1.0:
        raise ValueError(f"tolerance must be in [0, 1), got {tolerance}")


def refuse_other_gpu(baseline: dict, gpu: str) -> None:
    """WrongGPUError unless `baseline` was measured on GPU model `gpu`."""
    want = baseline["environment"]["gpu"]
    if want != gpu:
        raise WrongGPUError(f"the baseline was measured on {want!r}, this result on {gpu!r}: "
                            "speedups of different GPU models are not comparable")


def gated_rows(baseline: dict) -> list[dict]:
    """The baseline's rows the gate checks: sla-tl with a speedup over cuDNN."""
    return [row for row in baseline["rows"]
            if row["system"] == GATED_SYSTEM and "speedup_vs_cudnn" in row]


def gated_cases(baseline: dict) -> tuple[list[Case], list[str]]:
    """The cases and modes to run so that every gated row is measured again."""
    rows = gated_rows(baseline)
    cases = [Case(Shape(r["shape"], r["batch"], r["heads"], r["length"], r["dim"], r["dtype"]),
                  r["sparsity"], r["block_q"], r["block_kv"]) for r in rows]
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    return list(dict.fromkeys(cases)), modes


def check(baseline: dict, result: dict, tolerance: float) -> list[Verdict]:
    """A verdict per gated baseline row. Raises WrongGPUError for another GPU model's baseline,
    ValueError for a tolerance outside [0, 1) or a baseline with nothing to gate."""
    check_tolerance(tolerance)
    refuse_other_gpu(baseline, result["environment"]["gpu"])
    want, have = baseline["settings"]["timing"], result["settings"]["timing"]
    if want != have:
        raise ValueError(f"the baseline was timed {want!r}, this result {have!r}: "
                         "measure both the same way")
    rows = gated_rows(baseline)
    if not rows:
        raise ValueError(f"the baseline has no {GATED_SYSTEM} speedup over cuDNN to check")
    unusable = [describe_row(r) for r in rows if not _usable(r["speedup_vs_cudnn"])]
    if unusable:
        raise ValueError(f"the baseline's speedup is not a finite positive number for "
                         f"{unusable[0]}" + (f" and {len(unusable) - 1} more"
                                             if len(unusable) > 1 else ""))
    current = {row_key(r): r for r in result["rows"]}
    verdicts = []
    for base in rows:
        name, was = describe_row(base), base["speedup_vs_cudnn"]
        now = current.get(row_key(base))
        if now is None:
            verdicts.append(Verdict(name, was, None, "missing: not measured in this run"))
        elif "error" in now:
            verdicts.append(Verdict(name, was, None, f"missing: failed with {now['error']}"))
        elif "speedup_vs_cudnn" not in now:
            verdicts.append(Verdict(name, was, None, "missing: cuDNN did not run alongside"))
        elif not _usable(now["speedup_vs_cudnn"]):
            verdicts.append(Verdict(name, was, None, f"speedup {now['speedup_vs_cudnn']!r} is "
                                    "not a finite positive number"))
        else:
            verdict = Verdict(name, was, now["speedup_vs_cudnn"], None)
            if verdict.drop > tolerance:
                verdict = Verdict(name, was, verdict.current,
                                  f"speedup fell {verdict.drop:.1%} (more than "
                                  f"{tolerance:.1%}): {was:.2f}x -> {verdict.current:.2f}x")
            verdicts.append(verdict)
    return verdicts


def _usable(speedup: object) -> bool:
    """A speedup the gate can compare: a finite positive number (NaN passes every `>`)."""
    return is_finite_positive(speedup)


def format_verdicts(verdicts: list[Verdict], tolerance: float) -> str:
    """A line per gated case, then a summary line."""
    lines = []
    for v in verdicts:
        if v.failure:
            lines.append(f"FAIL {v.name}: {v.failure}")
        else:
            lines.append(f"ok   {v.name}: {v.baseline:.2f}x -> {v.current:.2f}x "
                         f"({-v.drop:+.1%})")
    failed = sum(v.failure is not None for v in verdicts)
    lines.append(f"throughput gate (tolerance {tolerance:.1%}): {len(verdicts) - failed} of "
                 f"{len(verdicts)} cases within, {failed} failed")
    return "\n".join(lines)
