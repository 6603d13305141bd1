"""Procedurally generated video clips with real space-time structure, from a seed.

Each clip is a background texture (a sum of random colour plane waves) translating rigidly
(a camera pan) under a few textured shapes: soft-edged ellipses that move across the frame,
bounce off its edges, rotate, and breathe (their axes deform over time), each carrying a
wave texture of its own that moves and turns with it, the later shapes occluding the
earlier ones. A frame is predictable from its
neighbours in time and space, which is what attention in a video denoiser exploits; nothing
is downloaded.
"""

from __future__ import annotations

import math

import torch

BACKGROUND_WAVES = 24
"""Plane waves summed into the background texture."""
SHAPE_WAVES = 4
"""Plane waves of each shape's texture."""


def _uniform(generator: torch.Generator, low: float, high: float, *shape: int) -> torch.Tensor:
    draw = torch.rand(*shape, generator=generator, dtype=torch.float64, device=generator.device)
    return low + (high - low) * draw


def _bounce(start: torch.Tensor, velocity: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
    """Positions in [0, 1] of points moving at constant velocity, reflected at the edges."""
    position = torch.remainder(start.unsqueeze(-1) + velocity.unsqueeze(-1) * time, 2.0)
    return torch.where(position > 1.0, 2.0 - position, position)


def _waves(generator: torch.Generator, clips: int, count: int, cycles: tuple[float, float]):
    """Random plane waves: wave vectors (clips, count, 2) of `cycles` cycles per frame width,
    phases (clips, count) and colours (clips, count, 3), amplitude 1 / sqrt(count)."""
    angle = _uniform(generator, 0.0, 2 * math.pi, clips, count)
    frequency = _uniform(generator, *cycles, clips, count) * 2 * math.pi
    vector = torch.stack([torch.cos(angle), torch.sin(angle)], dim=-1) * frequency[..., None]
    phase = _uniform(generator, 0.0, 2 * math.pi, clips, count)
    colour = _uniform(generator, -1.0, 1.0, clips, count, 3) / math.sqrt(count)
    return vector, phase, colour


def _texture(u: torch.Tensor, w: torch.Tensor, vector: torch.Tensor, phase: torch.Tensor,
             colour: torch.Tensor) -> torch.Tensor:
    """(clips, frames, 3, size, size): the waves at coordinates u, w (clips, frames, size, size)."""
    argument = (vector[:, None, :, None, None, 0] * u[:, :, None]
                + vector[:, None, :, None, None, 1] * w[:, :, None]
                + phase[:, None, :, None, None])  # (clips, frames, waves, size, size)
    return torch.einsum("cfnyx,cnk->cfkyx", torch.sin(argument), colour)


def _background(grid_y: torch.Tensor, grid_x: torch.Tensor, time: torch.Tensor, clips: int,
                generator: torch.Generator) -> torch.Tensor:
    """(clips, frames, 3, size, size): a wave texture translating rigidly (a camera pan)."""
    pan = _uniform(generator, -0.12, 0.12, clips, 2)  # frame widths over the whole clip
    u = grid_x - pan[:, 0, None, None, None] * time[:, None, None]
    w = grid_y - pan[:, 1, None, None, None] * time[:, None, None]
    return _texture(u, w, *_waves(generator, clips, BACKGROUND_WAVES, (1.0, 6.0)))


def _shapes(grid_y: torch.Tensor, grid_x: torch.Tensor, time: torch.Tensor, clips: int,
            shapes: int, frame: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Paint `shapes` textured, moving, deforming ellipses over `frame` (in place order)."""
    for _ in range(shapes):
        centre_y = _bounce(_uniform(generator, 0.1, 0.9, clips),
                           _uniform(generator, -0.5, 0.5, clips), time)  # (clips, frames)
        centre_x = _bounce(_uniform(generator, 0.1, 0.9, clips),
                           _uniform(generator, -0.5, 0.5, clips), time)
        spin = _uniform(generator, -2.0, 2.0, clips)
        orientation = _uniform(generator, 0.0, math.pi, clips)[:, None] + spin[:, None] * time
        breathe = _uniform(generator, 1.0, 3.0, clips)[:, None] * time
        axis_a = _uniform(generator, 0.1, 0.22, clips)[:, None] * (1 + 0.3 * torch.sin(breathe))
        axis_b = _uniform(generator, 0.07, 0.16, clips)[:, None] * (1 + 0.3 * torch.cos(breathe))
        waves = _waves(generator, clips, SHAPE_WAVES, (2.0, 8.0))
        tint = _uniform(generator, -0.8, 0.8, clips, 3)
        dy = grid_y - centre_y[..., None, None]  # (clips, frames, size, size)
        dx = grid_x - centre_x[..., None, None]
        cos, sin = torch.cos(orientation)[..., None, None], torch.sin(orientation)[..., None, None]
        u, w = cos * dx + sin * dy, -sin * dx + cos * dy
        radius = (u / axis_a[..., None, None]) ** 2 + (w / axis_b[..., None, None]) ** 2
        inside = torch.sigmoid((1.0 - radius) * 12.0)  # a soft edge
        # The texture is fixed to the shape: it moves and turns with it.
        paint = tint[:, None, :, None, None] + _texture(u, w, *waves)
        frame = frame + inside[:, :, None] * (paint - frame)
    return frame


def make_clips(count: int, frames: int, size: int, shapes: int,
               generator: torch.Generator) -> torch.Tensor:
    """`count` clips, float32 (count, frames, 3, size, size), values in about [-1, 1], made
    on the generator's device.

    The same generator state gives the same clips; time runs over [0, 1] across the clip.
    """
    if min(count, frames, size) < 1 or shapes < 0:
        raise ValueError(f"count, frames and size must be positive and shapes non-negative; "
                         f"got {count}, {frames}, {size}, {shapes}")
    device = generator.device
    axis = (torch.arange(size, dtype=torch.float64, device=device) + 0.5) / size
    grid_y, grid_x = torch.meshgrid(axis, axis, indexing="ij")
    time = torch.linspace(0.0, 1.0, frames, dtype=torch.float64, device=device)
    frame = _background(grid_y, grid_x, time, count, generator)
    frame = _shapes(grid_y, grid_x, time, count, shapes, frame, generator)
    return frame.clamp(-1.0, 1.0).float()
