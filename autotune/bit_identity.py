"""Schedule knobs change speed only: a candidate whose outputs are not the default schedule's,
bit for bit, on the measurement inputs is refused before it is timed.

The comparison (`difference`) is a pure function of two dicts of tensors; `IdentityGate`
holds the default schedule's outputs for one study and the verdict on each candidate.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch

from .candidates import label

Outputs = Callable[[dict], dict[str, torch.Tensor]]
"""Every output of a call run with a schedule ({kernel: knobs}) on the measurement inputs,
by name (forward: out, lse, o_lin, h_rows, z_rows; with the backward also dq, dk, dv,
d_weight, d_bias; per input set)."""

REFUSED = "not bit-identical to the default"

# Integer dtypes of each element width: comparing bit patterns (rather than values) makes
# NaN equal to the same NaN and tells -0.0 from 0.0.
_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


class Refusal(NamedTuple):
    """A candidate refused as not bit-identical to the default schedule."""

    kernel: str
    candidate: str
    """The candidate's label, e.g. "num_stages=2,warp_specialization=pingpong"."""
    reason: str


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_BITS[t.element_size()]) if t.dtype != torch.bool else t


def _describe(name: str, reference: torch.Tensor, candidate: torch.Tensor) -> str | None:
    """What differs between two tensors of one output (None: same shape, dtype and bits)."""
    if reference.shape != candidate.shape or reference.dtype != candidate.dtype:
        return (f"{name} differs in shape or dtype ({tuple(candidate.shape)} {candidate.dtype} "
                f"against {tuple(reference.shape)} {reference.dtype})")
    unequal = _bits(reference) != _bits(candidate)
    count = int(unequal.sum())
    if count == 0:
        return None
    diff = (candidate[unequal].double() - reference[unequal].double()).abs().max().item()
    return f"{name} differs, max |diff| {diff:.3g} in {count} of {reference.numel()} elements"


def difference(reference: Mapping[str, torch.Tensor],
               candidate: Mapping[str, torch.Tensor]) -> str | None:
    """None when `candidate` holds exactly `reference`'s outputs with the same shapes, dtypes
    and bits; otherwise what differs: the first differing output (in `reference`'s order)
    with its largest absolute difference, then the names of the others that differ."""
    missing = [name for name in reference if name not in candidate]
    extra = [name for name in candidate if name not in reference]
    if missing or extra:
        return f"outputs differ by name (missing: {missing}, unexpected: {extra})"
    found = [(name, _describe(name, reference[name], candidate[name])) for name in reference]
    differing = [(name, text) for name, text in found if text is not None]
    if not differing:
        return None
    first = differing[0][1]
    others = [name for name, _ in differing[1:]]
    return first + (f"; also {', '.join(others)}" if others else "")


class IdentityGate:
    """The default schedule's outputs for one study, and the verdict on each candidate.

    A candidate of one kernel is run with every other kernel at its default, once per
    study. The kernels are separate deterministic launches, so a trial whose every kernel
    passed this way gives the default's outputs bit for bit: each kernel then reads exactly
    the inputs it was checked on.
    """

    def __init__(self, default: Mapping[str, Mapping], outputs: Outputs) -> None:
        """Run the default schedule twice; RuntimeError when it does not reproduce its own
        bits (nothing could then be checked against it)."""
        self._default = {kernel: dict(knobs) for kernel, knobs in default.items()}
        self._outputs = outputs
        self._reference = outputs(self._default)
        unstable = difference(self._reference, outputs(self._default))
        if unstable is not None:
            raise RuntimeError("the default schedule does not give the same outputs twice on "
                               f"the same inputs ({unstable}), so no candidate can be checked "
                               "for bit identity against it")
        self._verdicts: dict[tuple[str, str], str | None] = {}

    def refusal(self, kernel: str, knobs: Mapping) -> str | None:
        """Why `kernel`'s candidate `knobs` is refused (None: its outputs are the default's)."""
        knobs = dict(knobs)
        if knobs == self._default[kernel]:
            return None
        key = (kernel, label(knobs))
        if key not in self._verdicts:
            found = difference(self._reference, self._outputs({**self._default, kernel: knobs}))
            self._verdicts[key] = None if found is None else f"{REFUSED}: {found}"
        return self._verdicts[key]
