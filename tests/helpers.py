"""Input makers and error measures shared by the tests."""

from __future__ import annotations

from typing import NamedTuple

import torch

from sla_tl.settings import Settings


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref||, computed in float64."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def random_qkv(
    batch: int, heads: int, lq: int, lk: int, dim: int, dtype: torch.dtype,
    generator: torch.Generator, device: str = "cpu",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Standard-normal q (B, H, Lq, D), k and v (B, H, Lk, D)."""
    def draw(length: int) -> torch.Tensor:
        x = torch.randn(batch, heads, length, dim, generator=generator, dtype=torch.float64)
        return x.to(device=device, dtype=dtype)

    return draw(lq), draw(lk), draw(lk)


def random_projection(
    dim: int, dtype: torch.dtype, generator: torch.Generator, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """A non-zero projection (weight, bias), so the linear branch shows in the output."""
    weight = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / dim**0.5
    bias = torch.randn(dim, generator=generator, dtype=torch.float64) * 0.1
    return weight.to(device=device, dtype=dtype), bias.to(device=device, dtype=dtype)


class Case(NamedTuple):
    """One configuration of the GPU kernel tests (an id of its fields, joined by "-")."""

    dim: int
    dtype: str
    layout: str
    feature: str
    linear: str
    block_q: int
    block_kv: int
    lq: int
    lk: int
    topk: float
    k_low: float
    batch: int = 2
    heads: int = 3

    @property
    def settings(self) -> Settings:
        """The call's settings."""
        return Settings(block_q=self.block_q, block_kv=self.block_kv, feature_map=self.feature,
                        linear=self.linear, layout=self.layout)

    @property
    def reference_device(self) -> str:
        """Where the float64 reference runs: on the GPU for long sequences, else the CPU."""
        return "cuda" if self.lq * self.lk > 4e7 else "cpu"

    def __str__(self) -> str:
        return "-".join(str(x) for x in self)


def case_inputs(case: Case, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Fresh q, k, v (in the case's layout) and a projection (weight, bias) on the GPU."""
    q, k, v = random_qkv(case.batch, case.heads, case.lq, case.lk, case.dim,
                         getattr(torch, case.dtype), generator, device="cuda")
    if case.layout == "bshd":
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
    weight, bias = random_projection(case.dim, torch.float32, generator, device="cuda")
    return q, k, v, weight, bias


def bhsd64(x: torch.Tensor, layout: str, device: str) -> torch.Tensor:
    """A (B, L, H, ...) tensor of `layout` "bshd" (or one already (B, H, L, ...)) in the
    (B, H, L, ...) view, float64 on `device`."""
    x = x if layout == "bhsd" else x.transpose(1, 2)
    return x.to(device=device, dtype=torch.float64)
