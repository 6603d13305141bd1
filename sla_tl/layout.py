"""Conversions between the user's layout and the canonical (B, H, L, D) view, without copies,
and the guard against a tensor handed over in the other layout."""

from __future__ import annotations

import torch

# No diffusion transformer has this many heads; an axis read as heads that is longer than
# this and than the sequence axis is a sequence axis read in the wrong layout.
MOST_PLAUSIBLE_HEADS = 128
_OTHER_LAYOUT = {"bhsd": "bshd", "bshd": "bhsd"}
_AXES = {"bhsd": "(B, H, L, D)", "bshd": "(B, L, H, D)"}


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View `x` as (B, H, L, D); a (B, L, H, D) tensor becomes a strided view, not a copy."""
    return x if layout == "bhsd" else x.transpose(1, 2)


def from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a (B, H, L, D) tensor in the user's layout (inverse of `to_bhsd`)."""
    return x if layout == "bhsd" else x.transpose(1, 2)


def check_layout_plausible(layout: str, **named: object) -> None:
    """Refuse a call whose tensors evidently come in the other layout: read in `layout`, the
    head axis is longer than both the sequence axis and any real model's head count.

    Attending over the head axis instead of the sequence would give a wrong result without
    a word, so this raises a ValueError naming `layout`. Tensors that are not rank-4 are
    left to the operators' own checks.
    """
    if layout not in _OTHER_LAYOUT:
        return
    for name, x in named.items():
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            continue
        _, heads, length, _ = to_bhsd(x, layout).shape
        if heads > length and heads > MOST_PLAUSIBLE_HEADS:
            other = _OTHER_LAYOUT[layout]
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} read as {_AXES[layout]} (layout={layout!r}) "
                f"has {heads} heads and {length} tokens: it is probably {_AXES[other]}. "
                f"Pass layout={other!r} (TurboDiffusion's modules take (B, L, H, D): "
                "preset='turbodiffusion')"
            )
