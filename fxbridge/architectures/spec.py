"""ArchSpec: everything fxbridge needs to know about one HF model family, as data.

Module paths are HF's (``model.layers.{i}.self_attn.q_proj``); per-layer paths are relative to the layer.
Sizes (layers, heads, KV heads, head dim) come from the HF config through ``dims``; a spec only names where
things are, which layout facts hold and which passes run, in order. A pass with parameters is listed configured
(``remove_eval_dropout(per_layer=2)``): the facts only one family's pass needs stay with that family's spec.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..passes import (GraphPass, check_order, hook_attention, hook_attn_result, hook_embeddings, hook_mlp, hook_norms,
                      hook_qkv, hook_residual, hook_unembed)

# Llama's: separate q/k/v projections, attention through HF's AttentionInterface.
DEFAULT_PASSES = (hook_embeddings, hook_attention, hook_qkv, hook_mlp, hook_norms, hook_residual, hook_unembed)


@dataclass(frozen=True)
class ArchSpec:
    """One family's facts: where HF keeps each part, its layout, and its pass list. Defaults are Llama's."""

    model_types: tuple[str, ...]
    family: str
    # model level
    layers: str = "model.layers"
    embed: str = "model.embed_tokens"
    pos_embed: str | None = None
    embed_norm: str | None = None  # a norm of the embeddings before layer 0 (Bloom): ln_embed hooks
    final_norm: str | None = "model.norm"  # None: no final norm (OpenAI GPT, post-LN OPT)
    unembed: str = "lm_head"
    # per layer (relative to f"{layers}.{i}")
    ln1: str | None = "input_layernorm"  # None: no pre-attention norm (OLMo 2 post-norm blocks)
    ln2: str | None = "post_attention_layernorm"
    ln1_post: str | None = None  # sandwich norms (Gemma 2/3/4): output is hook_attn_out
    ln2_post: str | None = None  # ... and hook_mlp_out
    attn: str = "self_attn"
    o_proj: str = "o_proj"  # attention output projection (hook_result splits it per head)
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    qkv: str | None = None  # fused projection, split by `qkv_layout`
    qkv_layout: str = "contiguous"  # [q | k | v]; "per_head" [q_h,k_h,v_h] x H; "per_group" [q..q,k,v] x Hkv;
    # "blocks:M:ORDER" M blocks of H/M heads per role, roles in ORDER (CodeGen "blocks:4:qvk"); see qkv_layouts.py
    # where the attention / MLP branch output is not the module's (Bloom, MPT add the residual inside the
    # module): the module whose output is hook_attn_out / hook_mlp_out
    attn_out_at: str | None = None
    mlp_out_at: str | None = None
    # mixture-of-experts layers (``hook_moe``; set by ``configure`` from the config): there the MoE block is the MLP
    # (no hook_pre/hook_post) unless ``moe_beside_mlp`` (Gemma 4: a dense MLP and an MoE branch in every layer)
    moe_layers: tuple[int, ...] = ()
    moe_beside_mlp: bool = False
    mlp: str | None = "mlp"  # None: the MLP projections sit on the decoder layer itself (OPT, XGLM)
    mlp_gate: str | None = "gate_proj"  # gated MLP: hook_pre = gate output, hook_pre_linear = mlp_in output
    mlp_in: str = "up_proj"
    mlp_out: str = "down_proj"
    # layout facts
    norm: str = "rms"  # "rms" | "layernorm"
    rotary: bool = True
    parallel: bool = False  # attention and MLP both read resid_pre (no hook_resid_mid)
    final_softcap_config: str | None = None  # config attribute holding the final-logit softcap
    # facts that config flags choose (Falcon, GPTBigCode): config -> {field: value} applied by for_config
    configure: Callable[[object], dict] | None = None
    # sizes only this family has or computes its own way: config -> {dim: size}, added to dims_from_config's
    dims_of: Callable[[object], dict[str, int]] | None = None
    notes: str = ""
    # why ``trace(..., use_attn_result=True)`` cannot split this family's output projection per head (None: it can)
    no_attn_result: str | None = None
    inferred: bool = False  # read from the model by architectures/infer.py, not registered (trace verifies it)
    # names the installed transformers must export for this family (its config class): where one is missing
    # (a family newer than the installed transformers) the spec is not listed and get_spec says so
    requires: tuple[str, ...] = ()
    # (HF module class name, forward) pairs: while the model is captured, that class runs this forward instead, an
    # exportable equivalent of one torch.export cannot capture (DBRX's data-dependent loop over the hit experts).
    # It must compute HF's values; the HF model itself is left as it was.
    capture_forwards: tuple[tuple[str, Callable], ...] = ()
    passes: tuple[GraphPass, ...] = DEFAULT_PASSES

    def __post_init__(self):
        for p in self.passes:
            if not isinstance(p, GraphPass):
                raise TypeError(f"{self.family}: ArchSpec.passes lists pass objects (from fxbridge.passes import "
                                f"{p}), not {type(p).__name__} {p!r}")
            p.check_configured()
        check_order(self.passes)

    def layer(self, i: int, rel: str | None = None) -> str:
        base = f"{self.layers}.{i}"
        return base if rel is None else f"{base}.{rel}"

    def mlp_path(self, i: int, rel: str | None = None) -> str:
        """The MLP module of layer i (the layer itself where ``mlp`` is None), or ``rel`` inside it."""
        base = self.layer(i, self.mlp)
        return base if rel is None else f"{base}.{rel}"

    @property
    def model_type(self) -> str:
        return self.model_types[0]

    def for_config(self, config) -> ArchSpec:
        """This spec with the optional features ``config`` switches off removed (a final softcap set to None)."""
        if self.configure is not None:  # apply the config-chosen layout facts first, then the rest below
            return replace(self, configure=None, **self.configure(config)).for_config(config)
        if self.final_softcap_config and getattr(config, self.final_softcap_config, None) is None:
            return replace(self, final_softcap_config=None)
        return self

    def pipeline(self, *, use_attn_result: bool = False) -> tuple[GraphPass, ...]:
        """The passes ``trace`` runs: the spec's, then ``hook_attn_result`` for ``use_attn_result=True``."""
        return self.passes + ((hook_attn_result,) if use_attn_result else ())


def dims_from_config(config, spec: ArchSpec) -> dict[str, int]:
    """n_layers, d_model, n_heads, n_kv_heads, d_head, d_vocab from an HF config (standard v5 attribute names),
    plus and over them the sizes the spec's ``dims_of`` reads."""
    n_heads = int(config.num_attention_heads)
    d_model = int(config.hidden_size)
    n_kv = _layer0_attr(config, "num_key_value_heads") or n_heads
    d_head = _layer0_attr(config, "head_dim") or d_model // n_heads
    dims = {
        "n_layers": int(config.num_hidden_layers),
        "d_model": d_model,
        "n_heads": n_heads,
        "n_kv_heads": int(n_kv),
        "d_head": int(d_head),
        "d_vocab": int(config.vocab_size),
    }
    if spec.dims_of is not None:
        dims.update(spec.dims_of(config))
    return dims


def _layer0_attr(config, name: str):
    """``config.<name>``; where HF marks it per-layer (heterogeneous configs, Gemma 4), layer 0's value."""
    try:
        return getattr(config, name, None)
    except RuntimeError:  # transformers' AmbiguousGlobalPerLayerAttributeError
        return getattr(config.per_layer_config[0], name, None)
