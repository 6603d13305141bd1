"""Structured synthetic attention inputs that behave like a video DiT's, for demos and calibration.

Tokens sit on a (frames, height, width) grid. Each head's q and k are scaled random
Fourier features of the token's position plus noise, so a query attends mostly to keys
near it in space-time: the locality that makes block-sparse attention work on real
video models. Random Gaussian q and k, by contrast, give near-uniform attention, where
no sparse method can be accurate.
"""

from __future__ import annotations

import math

import torch


def video_grid(length: int) -> tuple[int, int, int]:
    """A (frames, height, width) grid with at least `length` cells, height = width, near-cubic."""
    side = max(1, round(length ** (1 / 3)))
    frames = max(1, math.ceil(length / (side * side)))
    return frames, side, side


def video_like_qkv(
    batch: int,
    heads: int,
    length: int,
    dim: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    sharpness: float = 8.0,
    bandwidth: float = 6.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, k, v of shape (B, H, L, D) with local, position-driven attention.

    `sharpness` is the typical logit gap (after the D ** -0.5 scale) between a key at the
    query's own position and a far one; `bandwidth` sets how fast similarity decays
    with distance on the unit cube.
    """
    frames, height, width = video_grid(length)
    axes = [torch.linspace(0.0, 1.0, n, dtype=torch.float64) for n in (frames, height, width)]
    coords = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)[:length]
    amplitude = math.sqrt(sharpness * math.sqrt(dim))

    def draw(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    freqs = draw(batch, heads, 3, dim // 2) * bandwidth
    phase = coords @ freqs  # (B, H, L, D/2)
    features = torch.cat([phase.cos(), phase.sin()], dim=-1) * math.sqrt(2.0 / dim)
    q = amplitude * features + draw(batch, heads, length, dim)
    k = amplitude * features + draw(batch, heads, length, dim)
    v = draw(batch, heads, length, dim)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))
