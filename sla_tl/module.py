"""`SparseLinearAttention`: a drop-in for thu-ml/SLA's module of the same name."""

from __future__ import annotations

import torch
from torch import nn

from . import spec
from .api import attention
from .layout import to_bhsd
from .validation import check_block, check_choice, check_ratio


class SparseLinearAttention(nn.Module):
    """Sparse-Linear Attention with a learnable projection of the linear branch.

    The constructor and `forward` match thu-ml/SLA's module, and its state_dict keys
    (`proj_l.weight`, `proj_l.bias`) load unchanged. `proj_l` is zero-initialised, so an
    untrained module returns the sparse branch alone.

    With `gate=True` the linear branch is balanced by an input-dependent gate, as in SALAD
    (arXiv 2601.16515): `O = O_s + g * proj_l(O_l)` with `g = sigmoid(gate_proj(q))` per
    token and head, `gate_proj` a learnable D -> 1 linear map shared across heads
    (zero-initialised: g starts at 0.5 everywhere). It adds the `gate_proj.*` state_dict keys.

    Args:
        head_dim: D, 64 or 128.
        topk: share of key blocks each query block attends to exactly (critical).
        feature_map: linear-branch feature map: "softmax", "elu" (elu+1) or "relu".
        BLKQ, BLKK: query and key block sizes (positive multiples of 16).
        use_bf16: compute in bfloat16 (True) or float16 (False); the output keeps q's dtype.
        tie_feature_map_qk: kept for compatibility; the built-in feature maps have no
            parameters, so q and k always share the same map.
        k_low: share of key blocks dropped entirely (negligible); the paper uses 0.10.
        linear: "marginal" (linear branch over the non-critical, non-negligible blocks)
            or "global" (over all blocks, as thu-ml/SLA `main`).
        layout: "bhsd" for (B, H, L, D) inputs or "bshd" for (B, L, H, D).
        scale: softmax scale of the sparse branch; None means D ** -0.5.
        gate: add SALAD's input-dependent gate on the linear branch (see above).
    """

    def __init__(
        self,
        head_dim: int,
        topk: float,
        feature_map: str = spec.DEFAULT_FEATURE_MAP,
        BLKQ: int = spec.DEFAULT_BLOCK_Q,  # noqa: N803 (thu-ml/SLA's argument name)
        BLKK: int = spec.DEFAULT_BLOCK_KV,  # noqa: N803
        use_bf16: bool = True,
        tie_feature_map_qk: bool = True,
        *,
        k_low: float = spec.DEFAULT_K_LOW,
        linear: str = spec.DEFAULT_LINEAR,
        layout: str = spec.DEFAULT_LAYOUT,
        scale: float | None = None,
        gate: bool = False,
    ) -> None:
        super().__init__()
        if head_dim not in spec.HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {spec.HEAD_DIMS}; got {head_dim}")
        check_ratio("topk", topk)
        check_ratio("k_low", k_low)
        check_choice("feature_map", feature_map, spec.FEATURE_MAPS)
        check_block("BLKQ", BLKQ)
        check_block("BLKK", BLKK)
        check_choice("linear", linear, spec.LINEAR_MODES)
        check_choice("layout", layout, spec.LAYOUTS)
        if not isinstance(gate, bool):
            raise TypeError(f"gate must be a bool; got {type(gate).__name__}")
        self.dtype = torch.bfloat16 if use_bf16 else torch.float16
        self.topk = topk
        self.k_low = k_low
        self.feature_map = feature_map
        self.BLKQ = BLKQ
        self.BLKK = BLKK
        self.tie_feature_map_qk = tie_feature_map_qk
        self.linear = linear
        self.layout = layout
        self.scale = scale
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        self.gate_proj = nn.Linear(head_dim, 1, dtype=torch.float32) if gate else None
        self.init_weights_()

    def init_weights_(self) -> None:
        """Zero the projection, so the linear branch starts switched off (and the gate's map,
        so the gate starts at 0.5)."""
        with torch.no_grad():
            for layer in (self.proj_l, self.gate_proj):
                if layer is not None:
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    def gate_of(self, q: torch.Tensor) -> torch.Tensor | None:
        """The gate for `q`, float32 (B, H, L) ((B, L, H) in layout "bshd"); None without one."""
        if self.gate_proj is None:
            return None
        return torch.sigmoid(self.gate_proj(q.float())).squeeze(-1)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_sparsity: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Attention output in q's dtype; with `return_sparsity`, also the share of key
        blocks the sparse branch computes (what thu-ml/SLA returns under that name)."""
        out = attention(
            q.to(self.dtype), k.to(self.dtype), v.to(self.dtype),
            self.proj_l.weight, self.proj_l.bias,
            topk=self.topk, k_low=self.k_low, block_q=self.BLKQ, block_kv=self.BLKK,
            feature_map=self.feature_map, linear=self.linear, scale=self.scale,
            layout=self.layout, gate=self.gate_of(q),
        ).to(q.dtype)
        if not return_sparsity:
            return out
        n_kv = spec.num_blocks(to_bhsd(k, self.layout).shape[2], self.BLKK)
        return out, spec.num_critical(self.topk, n_kv) / n_kv
