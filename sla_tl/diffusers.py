"""SLA in the self-attention of diffusers' Wan-class transformers (`WanTransformer3DModel`).

    transformer = WanTransformer3DModel.from_pretrained(path, subfolder="transformer",
                                                        torch_dtype=torch.bfloat16)
    sla_tl.diffusers.enable_sla(transformer, topk=0.05)    # self-attention only
    sla_tl.diffusers.load_sla_weights(transformer, path + "/transformer")  # trained projections
    sla_tl.diffusers.set_topk(transformer, 0.1)            # between steps: no recompile

Self-attention (`blocks.N.attn1`) gets SLA through diffusers' public processor interface
(`set_attn_processor`); cross-attention and image attention (`attn2`) stay as they were.
Each self-attention module gets a child `sla` whose projection is a registered float32
parameter, `blocks.N.attn1.sla.proj_l.weight` and `.bias`: `save_pretrained` writes it,
`load_sla_weights` reads it back (a fresh `from_pretrained` has no place for it and says
the keys were not used), and casting the model (`torch_dtype=torch.bfloat16`, `.to(dtype)`)
leaves it float32. `load_turbowan_weights` takes TurboWan-Diffusers and TurboDiffusion
checkpoints, whose projections sit under `...attn_op.local_attn.proj_l`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

try:
    import diffusers  # noqa: F401  (fail here, clearly, without the extra)
    from diffusers.models.embeddings import apply_rotary_emb
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("sla_tl.diffusers needs diffusers: pip install 'sla-tl[diffusers]' "
                      "(from a clone: pip install '.[diffusers]')") from error

from . import presets, spec
from .dynamic_topk import attention_dynamic_topk, topk_tensor
from .ulysses import ulysses_attention
from .validation import check_block, check_choice, check_ratio

SLA_CHILD = "sla"
"""Name of the child module SLA adds to each self-attention module (its state_dict prefix)."""
SELF_ATTENTION = "attn1"
"""What Wan transformer blocks call their self-attention module."""
_TURBOWAN_KEY = re.compile(
    r"^(?P<block>(?:.*\.)?blocks\.\d+)\.(?:attn1|self_attn)\.attn_op\.local_attn\."
    r"proj_l\.(?P<param>weight|bias)$")


class WanSelfAttentionSLA(nn.Module):
    """The SLA of one self-attention layer: its projection `proj_l` (float32, zero at first)
    and settings; topk is a tensor shared by all layers of a transformer (`set_topk`)."""

    def __init__(self, head_dim: int, topk: torch.Tensor, feature_map: str, chosen: presets.Preset):
        super().__init__()
        self.topk = topk  # a plain attribute: it stays on the CPU when the model moves
        self.feature_map = feature_map
        self.k_low = chosen.k_low
        self.block_q = chosen.block_q
        self.block_kv = chosen.block_kv
        self.linear = chosen.linear
        self.proj_l = nn.Linear(head_dim, head_dim, dtype=torch.float32)
        with torch.no_grad():
            nn.init.zeros_(self.proj_l.weight)
            nn.init.zeros_(self.proj_l.bias)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """SLA of (B, L, H, D) q, k, v, in that layout."""
        return attention_dynamic_topk(
            q, k, v, self.proj_l.weight, self.proj_l.bias, self.topk, k_low=self.k_low,
            block_q=self.block_q, block_kv=self.block_kv, feature_map=self.feature_map,
            linear=self.linear, layout="bshd",
        )

    def _apply(self, fn, recurse=True):
        # A cast of the whole model (`.to(torch.bfloat16)`, `.half()`) leaves the projection
        # float32, where a fine-tune's small updates survive; moves between devices apply.
        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            moved = fn(t)
            return moved if moved.dtype == t.dtype else t.to(device=moved.device)

        return super()._apply(keep_dtype, recurse)


class SLAWanAttnProcessor:
    """Self-attention of a Wan block with SLA, as a diffusers attention processor.

    It reads only the attention module's public parts (`to_q`, `to_k`, `to_v` or the fused
    `to_qkv`, `norm_q`, `norm_k`, `heads`, `to_out`) and applies the rotary embedding with
    diffusers' public `apply_rotary_emb`; the module's `sla` child computes the attention.

    Under diffusers' context parallelism (`transformer.enable_parallelism(config=
    ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=P)))`),
    each rank holds a shard of the sequence: the attention then goes through
    `sla_tl.ulysses_attention` on the config's Ulysses group, so routing sees every token
    of each head. Ring attention (ring_degree > 1) would split a head's keys across ranks,
    which SLA's routing cannot work with: it is refused.
    """

    # diffusers' `enable_parallelism` hands its config to processors that have this
    # attribute (and leaves it None otherwise).
    _parallel_config = None

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        **kwargs,
    ) -> torch.Tensor:
        if encoder_hidden_states is not None:
            raise ValueError("SLAWanAttnProcessor serves self-attention only; got "
                             "encoder_hidden_states (cross-attention keeps its own processor)")
        if attention_mask is not None:
            raise ValueError("SLAWanAttnProcessor takes no attention_mask: SLA chooses the "
                             "key blocks itself")
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = (attn.to_q(hidden_states), attn.to_k(hidden_states),
                                 attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            # Wan's (cos, sin) are (1, L, 1, D), with each frequency repeated for its pair.
            cos, sin = (f.reshape(f.shape[1], f.shape[-1]) for f in rotary_emb)
            query, key = (apply_rotary_emb(x, (cos, sin), use_real=True, use_real_unbind_dim=-1,
                                           sequence_dim=1) for x in (query, key))
        sla = getattr(attn, SLA_CHILD)
        context = getattr(self._parallel_config, "context_parallel_config", None)
        if context is None:
            out = sla(query, key, value)
        else:
            out = _sequence_parallel(sla, query, key, value, context)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


def _sequence_parallel(sla: WanSelfAttentionSLA, query: torch.Tensor, key: torch.Tensor,
                       value: torch.Tensor, context: object) -> torch.Tensor:
    """SLA of this rank's (B, L/P, H, D) shards over the whole sequence (Ulysses)."""
    if (getattr(context, "ring_degree", None) or 1) > 1:
        raise ValueError(
            "diffusers' context parallelism with ring_degree > 1 splits each head's keys "
            "across ranks, and SLA routes on every token of a head: use "
            "ContextParallelConfig(ulysses_degree=...) with ring_degree=1")
    # diffusers keeps the Ulysses process group on this (private) mesh of the config.
    mesh = getattr(context, "_ulysses_mesh", None)
    if mesh is None:
        raise ValueError("the context-parallel config has no Ulysses mesh yet (diffusers sets "
                         "it up in enable_parallelism); cannot attend over the sequence")
    return ulysses_attention(
        query, key, value, sla.proj_l.weight, sla.proj_l.bias, group=mesh.get_group(),
        topk=float(sla.topk), k_low=sla.k_low, block_q=sla.block_q, block_kv=sla.block_kv,
        feature_map=sla.feature_map, linear=sla.linear, layout="bshd")


def _self_attention_modules(transformer: nn.Module) -> dict[str, nn.Module]:
    found = {name: module for name, module in transformer.named_modules()
             if name.rsplit(".", 1)[-1] == SELF_ATTENTION and hasattr(module, "set_processor")}
    if not found:
        raise ValueError(f"transformer ({type(transformer).__name__}) has no Wan-style "
                         f"self-attention modules (blocks.N.{SELF_ATTENTION})")
    return found


def sla_modules(transformer: nn.Module) -> dict[str, WanSelfAttentionSLA]:
    """The SLA child of each self-attention module, by the module's name."""
    return {name: module for name, module in transformer.named_modules()
            if isinstance(module, WanSelfAttentionSLA)}


def enable_sla(
    transformer: nn.Module,
    topk: float,
    *,
    preset: str = presets.DEFAULT_PRESET,
    feature_map: str = spec.DEFAULT_FEATURE_MAP,
    k_low: float | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    linear: str | None = None,
) -> list[str]:
    """Give every self-attention module of a Wan-class transformer SLA; cross-attention and
    image attention keep their processors. Returns the names of the modules changed.

    `preset` (see `sla_tl.presets.PRESETS`) fills the settings left None; its layout does
    not apply, diffusers hands over (B, L, H, D). Each module gets a zero float32
    projection under `<module>.sla.proj_l` on its own device: the model starts out
    computing SLA's sparse branch alone, until the projections are trained or loaded.
    """
    check_ratio("topk", topk)
    check_choice("feature_map", feature_map, spec.FEATURE_MAPS)
    chosen = presets.preset(preset)
    chosen = chosen._replace(
        k_low=chosen.k_low if k_low is None else k_low,
        block_q=chosen.block_q if block_q is None else block_q,
        block_kv=chosen.block_kv if block_kv is None else block_kv,
        linear=chosen.linear if linear is None else linear)
    check_ratio("k_low", chosen.k_low)
    check_block("block_q", chosen.block_q)
    check_block("block_kv", chosen.block_kv)
    check_choice("linear", chosen.linear, spec.LINEAR_MODES)
    targets = _self_attention_modules(transformer)
    enabled = [name for name, attn in targets.items() if hasattr(attn, SLA_CHILD)]
    if enabled:
        raise ValueError(f"SLA is already enabled on {enabled[0]} (and {len(enabled) - 1} "
                         "more); change topk with set_topk")
    shared_topk = topk_tensor(topk)
    processors = dict(transformer.attn_processors)
    for name, attn in targets.items():
        head_dim = attn.to_q.out_features // attn.heads
        if head_dim not in spec.HEAD_DIMS:
            raise ValueError(f"{name} has head dim {head_dim}; SLA takes {spec.HEAD_DIMS}")
        child = WanSelfAttentionSLA(head_dim, shared_topk, feature_map, chosen)
        attn.add_module(SLA_CHILD, child.to(attn.to_q.weight.device))
        processors[f"{name}.processor"] = SLAWanAttnProcessor()
    transformer.set_attn_processor(processors)
    return list(targets)


def set_topk(transformer: nn.Module, topk: float) -> None:
    """Change the topk share of every SLA layer in place: a compiled transformer runs the new
    value without being compiled again (topk schedules over denoising steps)."""
    check_ratio("topk", topk)
    modules = sla_modules(transformer)
    if not modules:
        raise ValueError("transformer has no SLA layers: call enable_sla first")
    for tensor in {id(m.topk): m.topk for m in modules.values()}.values():
        tensor.fill_(float(topk))


# ---------------------------------------------------------------- loading projections


def _checkpoint_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
        raise ValueError(f"{path}: no .safetensors files in this directory")
    raise ValueError(f"{path}: no such file or directory")


def _read_tensors(file: Path, wanted: Callable[[str], str | None]) -> dict[str, torch.Tensor]:
    """The tensors of one checkpoint file whose keys `wanted` maps to a name, by that name."""
    try:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as f:
                return {wanted(key): f.get_tensor(key) for key in f.keys() if wanted(key)}
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # noqa: BLE001  (any damage: reported with the path)
        raise ValueError(f"{file}: not a readable checkpoint ({type(error).__name__}: "
                         f"{error})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{file}: holds a {type(state).__name__}, not a state_dict")
    return {wanted(key): value for key, value in state.items()
            if isinstance(key, str) and wanted(key)}


def _load_projections(transformer: nn.Module, path: str | os.PathLike,
                      rename: Callable[[str], str | None]) -> int:
    modules = sla_modules(transformer)
    if not modules:
        raise ValueError("transformer has no SLA layers: call enable_sla first")
    params = {f"{name}.proj_l.{p}": getattr(m.proj_l, p)
              for name, m in modules.items() for p in ("weight", "bias")}
    found: dict[str, torch.Tensor] = {}
    for file in _checkpoint_files(Path(path)):
        tensors = _read_tensors(file, rename)
        repeated = sorted(set(tensors) & set(found))
        if repeated:
            raise ValueError(f"{file}: {repeated[0]} is also in another file of {path}")
        found.update(tensors)
    missing = sorted(set(params) - set(found))
    unknown = sorted(set(found) - set(params))
    if missing or unknown:
        raise ValueError(
            f"{path}: the projections do not match this transformer's SLA layers "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unknown)} without a layer, "
            f"e.g. {unknown[:2]})")
    with torch.no_grad():
        for key, param in params.items():
            value = found[key]
            if tuple(value.shape) != tuple(param.shape):
                raise ValueError(f"{path}: {key} has shape {tuple(value.shape)}; the layer "
                                 f"wants {tuple(param.shape)}")
            param.copy_(value.to(param.dtype))
    return len(params)


def load_sla_weights(transformer: nn.Module, path: str | os.PathLike) -> int:
    """Load the SLA projections (`blocks.N.attn1.sla.proj_l.*`) that `save_pretrained` wrote,
    from its directory (every .safetensors file in it, so sharded ones too) or one file
    (.safetensors, or a torch.save'd state_dict). Returns the number of tensors loaded.
    Call after `enable_sla`; a missing, extra or misshapen key is a ValueError naming path."""
    suffix = re.compile(rf"\.{SLA_CHILD}\.proj_l\.(?:weight|bias)$")
    return _load_projections(transformer, path, lambda key: key if suffix.search(key) else None)


def turbowan_key(key: str) -> str | None:
    """Our key for a TurboWan-Diffusers (`blocks.N.attn1.attn_op.local_attn.proj_l.weight`)
    or TurboDiffusion (`blocks.N.self_attn.attn_op.local_attn.proj_l.weight`) projection key."""
    match = _TURBOWAN_KEY.match(key)
    if match is None:
        return None
    return f"{match['block']}.{SELF_ATTENTION}.{SLA_CHILD}.proj_l.{match['param']}"


def load_turbowan_weights(transformer: nn.Module, path: str | os.PathLike) -> int:
    """Load the SLA projections of a TurboWan-Diffusers checkpoint (a directory or
    .safetensors file) or a TurboDiffusion .pth; pair with `enable_sla(transformer, topk,
    preset="turbodiffusion")` (TurboDiffusion's inference uses topk 0.1). Returns the number
    of tensors loaded."""
    return _load_projections(transformer, path, turbowan_key)
