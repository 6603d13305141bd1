"""`SparseLinearAttention`: a drop-in for thu-ml/SLA's module of the same name."""

from __future__ import annotations

import torch
from torch import nn

from . import spec
from .api import attention
from .layout import to_bhsd
from .validation import check_block, check_choice, check_ratio, check_scale, check_tensors


class SparseLinearAttention(nn.Module):
    """Sparse-Linear Attention with a learnable projection of the linear branch.

    The constructor and `forward` match thu-ml/SLA's module, and its state_dict keys
    (`proj_l.weight`, `proj_l.bias`) load unchanged. `proj_l` is zero-initialised, so an
    untrained module returns the sparse branch alone.

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
    ) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be an int; got {type(head_dim).__name__}")
        if head_dim not in spec.HEAD_DIMS:
            raise ValueError(f"head_dim must be one of {spec.HEAD_DIMS}; got {head_dim}")
        check_ratio("topk", topk)
        check_ratio("k_low", k_low)
        check_choice("feature_map", feature_map, spec.FEATURE_MAPS)
        check_block("BLKQ", BLKQ)
        check_block("BLKK", BLKK)
        check_choice("linear", linear, spec.LINEAR_MODES)
        check_choice("layout", layout, spec.LAYOUTS)
        check_scale(scale)
        self.head_dim = head_dim
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
        self.init_weights_()

    def init_weights_(self) -> None:
        """Zero the projection, so the linear branch starts switched off."""
        with torch.no_grad():
            nn.init.zeros_(self.proj_l.weight)
            nn.init.zeros_(self.proj_l.bias)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_sparsity: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Attention output in q's dtype; with `return_sparsity`, also the share of key
        blocks the sparse branch computes (what thu-ml/SLA returns under that name)."""
        self._check_inputs(q, k, v)
        out = attention(
            q.to(self.dtype), k.to(self.dtype), v.to(self.dtype),
            self.proj_l.weight, self.proj_l.bias,
            topk=self.topk, k_low=self.k_low, block_q=self.BLKQ, block_kv=self.BLKK,
            feature_map=self.feature_map, linear=self.linear, scale=self.scale,
            layout=self.layout,
        ).to(q.dtype)
        if not return_sparsity:
            return out
        n_kv = spec.num_blocks(to_bhsd(k, self.layout).shape[2], self.BLKK)
        return out, spec.num_critical(self.topk, n_kv) / n_kv

    def _check_inputs(self, q: object, k: object, v: object) -> None:
        """What the cast to the compute dtype would hide: a non-float input (the output would
        come back in an integer dtype) and a head dim other than the module's."""
        check_tensors(q=q, k=k, v=v)
        for name, x in (("q", q), ("k", k), ("v", v)):
            if not x.is_floating_point():
                raise TypeError(f"{name} must be a floating tensor; got {x.dtype}")
            if x.dim() == 4 and x.shape[-1] != self.head_dim:
                raise ValueError(f"{name} has head dim {x.shape[-1]}, but this module was built "
                                 f"with head_dim={self.head_dim}")
