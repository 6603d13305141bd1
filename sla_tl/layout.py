"""Conversions between the user's layout and the canonical (B, H, L, D) view, without copies."""

from __future__ import annotations

import torch


def to_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View `x` as (B, H, L, D); a (B, L, H, D) tensor becomes a strided view, not a copy."""
    return x if layout == "bhsd" else x.transpose(1, 2)


def from_bhsd(x: torch.Tensor, layout: str) -> torch.Tensor:
    """View a (B, H, L, D) tensor in the user's layout (inverse of `to_bhsd`)."""
    return x if layout == "bhsd" else x.transpose(1, 2)

