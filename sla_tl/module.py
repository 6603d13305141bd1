"""`SparseLinearAttention` and `SageSparseLinearAttention`: drop-ins for the modules of the same
names in thu-ml/SLA and TurboDiffusion, giving thu-ml/SLA `main`'s numbers by default."""

from __future__ import annotations

import torch
from torch import nn

from . import presets, spec
from .api import attention
from .feature_maps import FEATURE_MAPS
from .layout import to_bhsd
from .validation import check_block, check_choice, check_ratio, check_scale, check_tensors

FEATURE_MAP_FUNCTIONS = {name: entry.phi for name, entry in FEATURE_MAPS.items()}
"""The linear branch's feature maps as upstream modules expose them (`feature_map_q`,
`feature_map_k`), by the names of `spec.FEATURE_MAPS` (the kernels compute these only).
Module-level functions, so a module holding them deep-copies (EMA copies) and pickles with
its maps still recognisable."""


class SparseLinearAttention(nn.Module):
    """Sparse-Linear Attention with a learnable projection of the linear branch.

    The constructor, `forward`, attributes (`topk`, `BLKQ`, `BLKK`, `dtype`, `proj_l`,
    `feature_map_q`, `feature_map_k`) and state_dict keys (`proj_l.weight`, `proj_l.bias`)
    are thu-ml/SLA's, and by default so are the numbers: its `main` branch (linear branch
    over all blocks, (B, H, L, D), 64x64 blocks). `preset` picks another published variant
    (see `sla_tl.presets.PRESETS`): "sla-1", "paper", "turbodiffusion", "sagesla",
    "turbodiffusion-sagesla". `proj_l` is zero-initialised, so an untrained module returns
    the sparse branch alone.

    With `gate=True` the linear branch is balanced by an input-dependent gate, as in SALAD
    (arXiv 2601.16515): `O = O_s + g * proj_l(O_l)` with `g = sigmoid(gate_proj(q))` per
    token and head, `gate_proj` a learnable D -> 1 linear map shared across heads
    (zero-initialised: g starts at 0.5 everywhere). It adds the `gate_proj.*` state_dict keys.

    Args:
        head_dim: D, 64 or 128.
        topk: share of key blocks each query block attends to exactly (critical).
        feature_map: linear-branch feature map: "softmax", "elu" (elu+1) or "relu".
        BLKQ, BLKK: query and key block sizes (positive multiples of 16); None: the preset's.
        use_bf16: compute in bfloat16 (True) or float16 (False); the output keeps q's dtype.
        tie_feature_map_qk: kept for compatibility; the built-in feature maps have no
            parameters, so q and k always share the same map.
        preset: the variant whose settings fill every argument left None.
        k_low: share of key blocks dropped entirely (negligible); None: the preset's.
        linear: "global" (linear branch over all blocks) or "marginal" (over the
            non-critical, non-negligible ones); None: the preset's.
        layout: "bhsd" for (B, H, L, D) inputs or "bshd" for (B, L, H, D); None: the preset's.
        scale: softmax scale of the sparse branch; None means D ** -0.5.
        gate: add SALAD's input-dependent gate on the linear branch (see above).
    """

    def __init__(
        self,
        head_dim: int,
        topk: float,
        feature_map: str = spec.DEFAULT_FEATURE_MAP,
        BLKQ: int | None = None,  # noqa: N803 (thu-ml/SLA's argument name)
        BLKK: int | None = None,  # noqa: N803
        use_bf16: bool = True,
        tie_feature_map_qk: bool = True,
        *,
        preset: str = presets.DEFAULT_PRESET,
        k_low: float | None = None,
        linear: str | None = None,
        layout: str | None = None,
        scale: float | None = None,
        gate: bool = False,
    ) -> None:
        super().__init__()
        if isinstance(head_dim, bool) or not isinstance(head_dim, int):
            raise TypeError(f"head_dim must be an int; got {type(head_dim).__name__}")
        chosen = presets.preset(preset)
        BLKQ = chosen.block_q if BLKQ is None else BLKQ  # noqa: N806
        BLKK = chosen.block_kv if BLKK is None else BLKK  # noqa: N806
        k_low = chosen.k_low if k_low is None else k_low
        linear = chosen.linear if linear is None else linear
        layout = chosen.layout if layout is None else layout
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
        if not isinstance(gate, bool):
            raise TypeError(f"gate must be a bool; got {type(gate).__name__}")
        self.head_dim = head_dim
        self.dtype = torch.bfloat16 if use_bf16 else torch.float16
        self.topk = topk
        self.k_low = k_low
        self.feature_map = feature_map
        self.feature_map_q = FEATURE_MAP_FUNCTIONS[feature_map]
        self.feature_map_k = self.feature_map_q
        self.BLKQ = BLKQ
        self.BLKK = BLKK
        self.tie_feature_map_qk = tie_feature_map_qk
        self.preset = preset
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

    def check_feature_maps(self) -> None:
        """`feature_map_q` and `feature_map_k` must still be the built-in map `feature_map`
        names: the kernels compute only those, so a replaced map would be ignored."""
        builtin = FEATURE_MAP_FUNCTIONS[self.feature_map]
        for name in ("feature_map_q", "feature_map_k"):
            if getattr(self, name) is not builtin:
                raise ValueError(
                    f"{name} is not the built-in {self.feature_map!r} map: sla-tl computes "
                    f"only {', '.join(spec.FEATURE_MAPS)}; set feature_map to one of them "
                    "instead of replacing the function"
                )

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, return_sparsity: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, float]:
        """Attention output in q's dtype and layout; with `return_sparsity`, also the share of
        key blocks the sparse branch computes (what thu-ml/SLA returns under that name)."""
        self.check_feature_maps()
        self._check_inputs(q, k, v)
        out = attention(
            q.to(self.dtype), k.to(self.dtype), v.to(self.dtype),
            self.proj_l.weight, self.proj_l.bias, **self.attention_options(),
            gate=self.gate_of(q),
        ).to(q.dtype)
        if not return_sparsity:
            return out
        return out, self.density(to_bhsd(k, self.layout).shape[2])

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

    def attention_options(self) -> dict[str, object]:
        """The keyword arguments of `sla_tl.attention` this module calls it with."""
        return dict(topk=self.topk, k_low=self.k_low, block_q=self.BLKQ, block_kv=self.BLKK,
                    feature_map=self.feature_map, linear=self.linear, scale=self.scale,
                    layout=self.layout)

    def density(self, kv_length: int) -> float:
        """Share of key blocks the sparse branch computes for `kv_length` keys."""
        n_kv = spec.num_blocks(kv_length, self.BLKK)
        return spec.num_critical(self.topk, n_kv) / n_kv


class SageSparseLinearAttention(SparseLinearAttention):
    """The call signature of SageSLA (thu-ml/SLA `SageSLA`, and TurboDiffusion's with
    preset="turbodiffusion-sagesla"): no block arguments; its Hopper blocks, 64x128, and its
    linear branch over all blocks. The sparse branch runs sla-tl's bf16/fp16 kernels, not
    SageSLA's int8/fp8 ones, so the numbers are those of exact attention on the same blocks.
    """

    def __init__(
        self,
        head_dim: int,
        topk: float,
        feature_map: str = spec.DEFAULT_FEATURE_MAP,
        use_bf16: bool = True,
        tie_feature_map_qk: bool = True,
        *,
        preset: str = "sagesla",
        k_low: float | None = None,
        linear: str | None = None,
        layout: str | None = None,
        scale: float | None = None,
    ) -> None:
        super().__init__(head_dim, topk, feature_map, None, None, use_bf16, tie_feature_map_qk,
                         preset=preset, k_low=k_low, linear=linear, layout=layout, scale=scale)
