"""A small video diffusion transformer (DiT): self-attention over a (frames, height, width)
token grid with 3-D rotary position embeddings, timestep-conditioned AdaLN-Zero, an MLP.

Which attention runs inside is the caller's choice: every block asks `make_attention` for
its attention core, a module mapping q, k, v (B, H, L, D), RoPE already applied, to the
output (B, H, L, D). That is the only thing the fine-tuning arms change.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

AttentionFactory = Callable[[int], nn.Module]
"""head_dim -> a fresh attention core: forward(q, k, v) -> out, all (B, H, L, D)."""

# Rotary frequencies span base**0 .. base**-1 radians per grid step. The grids here are tens
# of positions long, so a small base keeps even the slowest frequency useful.
ROPE_BASE = 100.0
TIME_FEATURES = 128


@dataclass(frozen=True)
class DiTConfig:
    """Shape of the clips and of the transformer."""

    frames: int
    size: int
    """Pixels per side of a (square) frame."""
    patch: int
    """Pixels per side of a token's patch (one frame deep)."""
    width: int
    heads: int
    depth: int
    mlp_ratio: int = 4
    channels: int = 3

    def __post_init__(self) -> None:
        if self.size % self.patch:
            raise ValueError(f"size {self.size} must be a multiple of patch {self.patch}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} must be a multiple of heads {self.heads}")

    @property
    def grid(self) -> tuple[int, int, int]:
        """Tokens along (frames, height, width)."""
        side = self.size // self.patch
        return self.frames, side, side

    @property
    def tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def patch_dim(self) -> int:
        return self.channels * self.patch * self.patch


def patchify(clips: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, F, C, S, S) -> (B, F * (S/p)^2, C * p * p), tokens in (frame, row, column) order."""
    b, f, c, s, _ = clips.shape
    n = s // patch
    x = clips.reshape(b, f, c, n, patch, n, patch).permute(0, 1, 3, 5, 2, 4, 6)
    return x.reshape(b, f * n * n, c * patch * patch)


def unpatchify(tokens: torch.Tensor, config: DiTConfig) -> torch.Tensor:
    """Inverse of `patchify`."""
    f, n, _ = config.grid
    p, c = config.patch, config.channels
    x = tokens.reshape(tokens.shape[0], f, n, n, c, p, p).permute(0, 1, 4, 2, 5, 3, 6)
    return x.reshape(tokens.shape[0], f, c, n * p, n * p)


def rope_tables(grid: tuple[int, int, int], head_dim: int,
                device: torch.device | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (L, head_dim / 2) of 3-D RoPE: the rotation pairs are split between the
    frame, row and column axes (rows and columns a third each, frames the rest)."""
    pairs = head_dim // 2
    spatial = pairs // 3
    per_axis = (pairs - 2 * spatial, spatial, spatial)
    positions = torch.stack(torch.meshgrid(*(torch.arange(n, dtype=torch.float64) for n in grid),
                                           indexing="ij"), dim=-1).reshape(-1, 3)
    angles = []
    for axis, count in enumerate(per_axis):
        frequency = ROPE_BASE ** (-torch.arange(count, dtype=torch.float64) / max(count, 1))
        angles.append(positions[:, axis, None] * frequency)
    angle = torch.cat(angles, dim=-1)
    return angle.cos().float().to(device), angle.sin().float().to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, H, L, D) by the tables: the first and second halves of D form the pairs."""
    first, second = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([first * cos - second * sin, first * sin + second * cos], dim=-1)


def timestep_features(t: torch.Tensor) -> torch.Tensor:
    """Sinusoidal features (B, TIME_FEATURES) of diffusion times t in [0, 1]."""
    half = TIME_FEATURES // 2
    frequency = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    angle = 1000.0 * t.float()[:, None] * frequency
    return torch.cat([angle.cos(), angle.sin()], dim=-1)


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention with q/k RMS norms (as in Wan2.1) and 3-D RoPE around a
    swappable attention core."""

    def __init__(self, width: int, heads: int, core: nn.Module) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.q_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(width // heads, eps=1e-6)
        self.out = nn.Linear(width, width)
        self.core = core

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, length, width = x.shape
        q, k, v = self.qkv(x).reshape(b, length, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        return self.out(self.core(q, k, v).transpose(1, 2).reshape(b, length, width))


class DiTBlock(nn.Module):
    """Attention and MLP, each modulated (shift, scale, gate) by the timestep: AdaLN-Zero."""

    def __init__(self, config: DiTConfig, core: nn.Module) -> None:
        super().__init__()
        width = config.width
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.attention = SelfAttention(width, config.heads, core)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(width, config.mlp_ratio * width),
                                 nn.GELU(approximate="tanh"),
                                 nn.Linear(config.mlp_ratio * width, width))
        self.modulation = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, condition: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(
            F.silu(condition)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attention(_modulate(self.norm1(x), shift1, scale1), cos,
                                                sin)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class VideoDiT(nn.Module):
    """Predicts the flow-matching velocity of noisy clips (B, F, C, S, S) at times t (B,)."""

    def __init__(self, config: DiTConfig, make_attention: AttentionFactory) -> None:
        super().__init__()
        self.config = config
        width = config.width
        self.embed = nn.Linear(config.patch_dim, width)
        self.time = nn.Sequential(nn.Linear(TIME_FEATURES, width), nn.SiLU(),
                                  nn.Linear(width, width))
        self.blocks = nn.ModuleList(DiTBlock(config, make_attention(config.head_dim))
                                    for _ in range(config.depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.head = nn.Linear(width, config.patch_dim)
        cos, sin = rope_tables(config.grid, config.head_dim)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self._initialise()

    def _initialise(self) -> None:
        # DiT's recipe: Xavier linears, and zero modulations and head so that every block
        # starts as the identity and the model starts by predicting zero. The attention
        # cores keep their own initialisation.
        layers = [self.embed, *self.time]
        for block in self.blocks:
            layers += [block.attention.qkv, block.attention.out, *block.mlp]
        for module in layers:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        zeroed = [block.modulation for block in self.blocks]
        for module in (*zeroed, self.final_modulation, self.head):
            nn.init.zeros_(module.weight)
            nn.init.zeros_(module.bias)

    def forward(self, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = self.embed(patchify(noisy, self.config.patch))
        condition = self.time(timestep_features(t))
        for block in self.blocks:
            x = block(x, condition, self.rope_cos, self.rope_sin)
        shift, scale = self.final_modulation(F.silu(condition)).chunk(2, dim=-1)
        return unpatchify(self.head(_modulate(self.final_norm(x), shift, scale)), self.config)
