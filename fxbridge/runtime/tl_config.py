"""``gm.cfg``: TransformerLens's ``HookedTransformerConfig`` field names, read from the spec, dims and HF model.

TL notebooks and SAELens read ``model.cfg.n_layers``, ``cfg.d_head``, ``cfg.act_fn``, ``cfg.device``... This builds
the same fields for any traced family from what fxbridge already knows: sizes from ``gm.dims`` (the HF config),
layout facts from the ArchSpec (norm kind, rotary, parallel block, sandwich norms), the rest from the HF config
(activation name, rotary base, softcaps) and the HF modules (norm epsilon, MLP width). ``device`` and ``dtype`` are
read from the module each time, so they follow ``gm.to("cuda")``. Values are TL's conventions (``n_key_value_heads``
None without GQA, softcaps -1.0 when off); ``docs/tl_tokenizer_cfg.md`` has the field -> source table.
"""
from __future__ import annotations

import dataclasses
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

# TL's cfg.default_prepend_bos is False for these HF model types (legacy HookedTransformer's loading_from_pretrained
# for GPT-NeoX, Bloom, Qwen 2/3, Phi; TransformerLens 4.3's adapters for families the legacy loader lacks).
NO_DEFAULT_BOS = frozenset({
    "gpt_neox", "bloom", "qwen", "qwen2", "qwen3", "phi",  # legacy HookedTransformer
    "qwen2_moe", "qwen3_moe", "mpt", "glm", "glm4_moe", "seed_oss", "ernie4_5", "ernie4_5_moe", "minimax_m2",
    "exaone", "exaone4", "phimoe", "granite", "granitemoe", "starcoder2", "smollm3",  # TransformerLens 4.3
})
# ALiBi families whose config has no ``alibi`` flag (Falcon's has one, MPT's attn_config has one).
ALIBI_MODEL_TYPES = frozenset({"bloom"})
SOFTCAP_DISABLED = -1.0  # TL's value for "no softcap"
_ACT_CONFIG_NAMES = ("hidden_activation", "hidden_act", "activation_function", "activation", "afn")
# HF activation modules whose class is not in transformers' ACT2CLS under the name TL uses
_ACT_CLASS_NAMES = {"BloomGelu": "gelu_fast", "SiLU": "silu", "ReLU": "relu", "Tanh": "tanh"}


class _TraceFlag:
    """A TL switch that adds hook points (``cfg.use_attn_result = True``). The traced graph's hooks are fixed when
    it is traced, so a new value that differs raises, naming how to get it, instead of silently changing nothing."""

    def __init__(self, name: str, how: str | None):
        self.name, self.how = name, how

    def __get__(self, cfg, owner=None):
        return self if cfg is None else bool(cfg._traced_flags.get(self.name, False))

    def __set__(self, cfg, value) -> None:
        if bool(value) == self.__get__(cfg):
            return
        from ..errors import UsageError
        fix = (f"trace the model again: gm = {self.how}" if self.how else
               "fxbridge has no such hook points (the hooks it has are in gm.hook_dict)")
        raise UsageError(f"cfg.{self.name} is fixed when the module is traced (it is {self.__get__(cfg)}); {fix}")


@dataclass
class HookedConfig:
    """TransformerLens's model config fields for a traced module (attribute access and ``to_dict()``)."""

    n_layers: int
    d_model: int
    n_heads: int
    d_head: int
    d_mlp: int | None
    d_vocab: int
    d_vocab_out: int
    n_ctx: int | None
    act_fn: str | None
    eps: float
    normalization_type: str | None
    positional_embedding_type: str | None
    original_architecture: str
    model_name: str
    n_key_value_heads: int | None = None
    rotary_dim: int | None = None
    rotary_base: float | int = 10000
    rotary_base_local: float | int | None = None
    rotary_adjacent_pairs: bool = False
    parallel_attn_mlp: bool = False
    final_rms: bool = False
    gated_mlp: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    attn_scores_soft_cap: float = SOFTCAP_DISABLED
    output_logits_soft_cap: float = SOFTCAP_DISABLED
    use_normalization_before_and_after: bool = False
    post_embedding_ln: bool = False
    use_qk_norm: bool = False
    window_size: int | None = None
    use_local_attn: bool = False
    attn_types: list | None = None
    use_attn_scale: bool = True
    attn_scale: float = 1.0
    tie_word_embeddings: bool = False
    initializer_range: float = -1.0
    tokenizer_name: str | None = None
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool | None = None
    attn_only: bool = False
    attention_dir: str = "causal"
    n_devices: int = 1
    seed: int | None = None
    from_checkpoint: bool = False
    load_in_4bit: bool = False
    ungroup_grouped_query_attention: bool = False
    n_params: int | None = None
    _module: Any = field(default=None, repr=False, compare=False)  # weakref to the traced module (device/dtype)
    _traced_flags: dict = field(default_factory=dict, repr=False, compare=False)  # trace options (use_attn_result)

    # TL's switches for optional hook points: fixed at trace time here (the graph has the hooks or not)
    use_attn_result = _TraceFlag("use_attn_result", "fxbridge.trace(gm.hf, use_attn_result=True)")
    use_split_qkv_input = _TraceFlag("use_split_qkv_input", None)
    use_hook_mlp_in = _TraceFlag("use_hook_mlp_in", None)
    use_attn_in = _TraceFlag("use_attn_in", None)
    use_hook_tokens = _TraceFlag("use_hook_tokens", None)

    @property
    def device(self) -> str | None:
        """Where the module's token embedding lives now, as TL's string (``"cpu"``, ``"cuda:0"``); it follows
        ``gm.to(...)``."""
        gm = self._module() if self._module is not None else None
        device = None if gm is None else _device_of(gm)
        return None if device is None else str(device)

    @device.setter
    def device(self, value) -> None:
        from ..errors import UsageError
        raise UsageError(f"cfg.device follows the module's weights (now {self.device}); move the module with "
                         f"gm.to({str(value)!r}) instead of setting cfg.device")

    @property
    def default_padding_side(self) -> str:
        """The tokenizer's ``padding_side`` (what ``padding_side=None`` means); "right" without a tokenizer."""
        gm = self._module() if self._module is not None else None
        return getattr(getattr(gm, "tokenizer", None), "padding_side", None) or "right"

    @default_padding_side.setter
    def default_padding_side(self, value: str) -> None:
        from ..errors import UsageError
        gm = self._module() if self._module is not None else None
        if value not in ("left", "right") or getattr(gm, "tokenizer", None) is None:
            raise UsageError(f"cfg.default_padding_side is the tokenizer's padding side: 'left' or 'right' once a "
                             f"tokenizer is set (gm.set_tokenizer(tok)), got {value!r}")
        gm.tokenizer.padding_side = value

    @property
    def dtype(self) -> torch.dtype | None:
        """The floating dtype the module was traced in (its weights' dtype)."""
        gm = self._module() if self._module is not None else None
        return None if gm is None else _dtype_of(gm)

    def to_dict(self) -> dict[str, Any]:
        """Every field, as TL's ``cfg.to_dict()`` (device and dtype included)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if not f.name.startswith("_")}
        out.update(device=self.device, dtype=self.dtype, default_padding_side=self.default_padding_side)
        out.update({name: getattr(self, name) for name, value in vars(type(self)).items()
                    if isinstance(value, _TraceFlag)})
        return out

    def __getstate__(self) -> dict:
        """Pickle without the module reference (an unpickled cfg reads device / dtype as None)."""
        return {**self.__dict__, "_module": None}

    def __repr__(self) -> str:
        return "HookedConfig(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"


def config_for(gm) -> HookedConfig:
    """``gm.cfg`` for a traced module (bound to it for device and dtype)."""
    options = getattr(gm, "_fxb_options", {}) or {}
    cfg = build_config(gm.spec, gm.dims, gm.hf, use_attn_result=bool(options.get("use_attn_result")))
    cfg._module = weakref.ref(gm)
    return cfg


def build_config(spec, dims: dict, model, *, use_attn_result: bool = False) -> HookedConfig:
    """The TL fields for an HF ``model`` (real or on the meta device) of ``spec``'s family, with ``dims`` its sizes."""
    config = model.config
    n_heads, d_head, n_kv = dims["n_heads"], dims["d_head"], dims["n_kv_heads"]
    rotary = _rotary(spec, config, d_head)
    softcap = _attr(config, "attn_logit_softcapping")
    final_cap = _attr(config, spec.final_softcap_config) if spec.final_softcap_config else None
    window = _attr(config, "sliding_window")
    cfg = HookedConfig(
        n_layers=dims["n_layers"], d_model=dims["d_model"], n_heads=n_heads, d_head=d_head,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        d_mlp=_d_mlp(spec, dims, model), d_vocab=dims["d_vocab"], d_vocab_out=_d_vocab_out(spec, dims, model),
        n_ctx=_n_ctx(config), act_fn=_act_fn(spec, model), eps=_eps(spec, model),
        normalization_type="RMS" if spec.norm == "rms" else "LN",
        positional_embedding_type=_positions(spec, config), original_architecture=type(model).__name__,
        model_name=_model_name(config), **rotary, parallel_attn_mlp=spec.parallel,
        final_rms=spec.norm == "rms" and spec.final_norm is not None,
        gated_mlp=spec.mlp_gate is not None,
        num_experts=dims.get("n_experts"), experts_per_token=dims.get("top_k"),
        attn_scores_soft_cap=float(softcap) if softcap else SOFTCAP_DISABLED,
        output_logits_soft_cap=float(final_cap) if final_cap else SOFTCAP_DISABLED,
        use_normalization_before_and_after=spec.ln1 is not None and (spec.ln1_post or spec.ln2_post) is not None,
        post_embedding_ln=spec.embed_norm is not None, use_qk_norm=_has_qk_norm(spec, model),
        window_size=window if isinstance(window, int) else None, use_local_attn=isinstance(window, int),
        attn_types=_attn_types(config, dims["n_layers"]), attn_scale=_attn_scale(config, d_head),
        tie_word_embeddings=bool(_attr(config, "tie_word_embeddings")),
        initializer_range=float(_attr(config, "initializer_range") or -1.0),
        tokenizer_name=getattr(config, "_name_or_path", None) or None,
        default_prepend_bos=config.model_type not in NO_DEFAULT_BOS,
        _traced_flags={"use_attn_result": use_attn_result})
    cfg.n_params = _n_params(cfg)
    return cfg


def _attr(config, name: str):
    """``config.<name>``, None where absent or where HF marks it per layer (heterogeneous configs)."""
    try:
        return getattr(config, name, None)
    except RuntimeError:
        return None


def _module(model, path: str | None):
    if path is None:
        return None
    try:
        return model.get_submodule(path)
    except AttributeError:
        return None


def _dense_layers(spec, dims) -> list[int]:
    return [i for i in range(dims["n_layers"]) if i not in spec.moe_layers or spec.moe_beside_mlp]


def _d_mlp(spec, dims, model) -> int | None:
    """The dense MLP's hidden width (first dense layer's input projection); the expert width where every layer is
    MoE (TL's Mixtral convention: d_mlp is one expert's width)."""
    dense = _dense_layers(spec, dims) if dims.get("n_experts") else range(dims["n_layers"])
    for i in dense:
        width = _out_features(_module(model, spec.mlp_path(i, spec.mlp_in)))
        if width is not None:
            return width // 2 if spec.mlp_gate == spec.mlp_in else width  # fused [gate | up]
    config = model.config
    for holder in (config, getattr(config, "ffn_config", None)):
        for name in ("moe_intermediate_size", "expert_intermediate_size", "ffn_hidden_size", "intermediate_size"):
            value = _attr(holder, name) if holder is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None


def _out_features(module) -> int | None:
    if module is None:
        return None
    if hasattr(module, "out_features"):
        return int(module.out_features)
    if hasattr(module, "nf"):  # transformers' Conv1D (GPT-2 family)
        return int(module.nf)
    weight = getattr(module, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _d_vocab_out(spec, dims, model) -> int:
    return _out_features(_module(model, spec.unembed)) or dims["d_vocab"]


def _n_ctx(config) -> int | None:
    for holder in (config, getattr(config, "text_config", None)):
        for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"):
            value = _attr(holder, name) if holder is not None else None
            if isinstance(value, int) and value > 0:
                return value
    return None  # ALiBi models (Bloom) have no length limit in their config


def _act_fn(spec, model) -> str | None:
    """HF's activation name, which TL uses as act_fn (``gelu_new``, ``silu``, ``gelu_pytorch_tanh``...): from the
    config where it names one, else from the activation module in layer 0's MLP."""
    config = model.config
    for holder in (config, getattr(config, "ffn_config", None)):
        for name in _ACT_CONFIG_NAMES + ("ffn_act_fn",):
            value = _attr(holder, name) if holder is not None else None
            if isinstance(value, dict):
                value = value.get("name")
            if isinstance(value, str) and value:
                return value
    mlp = _module(model, spec.mlp_path(0))
    return _act_of_module(mlp) if mlp is not None else None


def _act_of_module(mlp: torch.nn.Module) -> str | None:
    from transformers.activations import ACT2CLS
    names = {}
    for name, entry in ACT2CLS.items():
        cls = entry[0] if isinstance(entry, tuple) else entry
        names.setdefault(cls, name)
    for sub in mlp.modules():
        cls = type(sub)
        if isinstance(sub, torch.nn.GELU):
            return "gelu_pytorch_tanh" if sub.approximate == "tanh" else "gelu"
        if cls.__name__ in _ACT_CLASS_NAMES:
            return _ACT_CLASS_NAMES[cls.__name__]
        if cls in names:
            return names[cls]
    return None


def _eps(spec, model) -> float:
    """The norm epsilon, read off layer 0's first norm module (every HF norm class stores it)."""
    for path in (spec.layer(0, spec.ln1) if spec.ln1 else None, spec.layer(0, spec.ln1_post) if spec.ln1_post else
                 None, spec.final_norm):
        norm = _module(model, path)
        for name in ("variance_epsilon", "eps", "epsilon", "layer_norm_eps"):
            value = getattr(norm, name, None) if norm is not None else None
            if isinstance(value, (int, float)):
                return float(value)
    return 1e-5


def _positions(spec, config) -> str | None:
    if spec.rotary:
        return "rotary"
    if spec.pos_embed is not None:
        return "standard"
    attn_config = getattr(config, "attn_config", None)
    if _attr(config, "alibi") or getattr(attn_config, "alibi", False) or config.model_type in ALIBI_MODEL_TYPES:
        return "alibi"
    return None


def _rope_params(config) -> tuple[dict, dict | None]:
    """(layer 0's / the global RoPE parameters, the local ones where they differ per layer type)."""
    params = _attr(config, "rope_parameters") or {}
    if isinstance(params, dict) and "full_attention" in params:
        types = _attr(config, "layer_types") or []
        first = params.get(types[0]) if types else None
        return params["full_attention"], params.get("sliding_attention") if first is not None else None
    return (params if isinstance(params, dict) else {}), None


def _rotary(spec, config, d_head: int) -> dict:
    if not spec.rotary:
        return {}
    params, local = _rope_params(config)
    first = local if local is not None else params  # layer 0 is a local layer in the hybrid configs
    base = params.get("rope_theta", _attr(config, "rope_theta") or _attr(config, "rotary_emb_base") or 10000)
    dim = _attr(config, "rotary_dim") or _attr(config, "qk_rope_head_dim")
    if not dim:
        factor = first.get("partial_rotary_factor", _attr(config, "partial_rotary_factor") or
                           _attr(config, "rotary_pct") or 1.0)
        dim = int(d_head * factor)
    out = {"rotary_dim": int(dim), "rotary_base": base,
           "rotary_adjacent_pairs": config.model_type in ("gptj", "codegen")}
    if local is not None:
        out["rotary_base_local"] = local.get("rope_theta")
    return out


def _has_qk_norm(spec, model) -> bool:
    attn = _module(model, spec.layer(0, spec.attn))
    return attn is not None and any(hasattr(attn, name) for name in ("q_norm", "q_layernorm"))


def _attn_types(config, n_layers: int) -> list | None:
    types = _attr(config, "layer_types")
    if not isinstance(types, (list, tuple)) or len(types) != n_layers:
        return None
    return ["local" if "sliding" in str(t) else "global" for t in types]


def _attn_scale(config, d_head: int) -> float:
    """What scores are divided by: sqrt(d_head), or Gemma 2/3's sqrt(query_pre_attn_scalar)."""
    scalar = _attr(config, "query_pre_attn_scalar")
    return math.sqrt(scalar if scalar else d_head)


def _model_name(config) -> str:
    path = getattr(config, "_name_or_path", "") or ""
    return path.rstrip("/").split("/")[-1] or config.model_type


def _n_params(cfg: HookedConfig) -> int:
    """TL's count: attention and MLP weight matrices only (no embeddings, biases, norms)."""
    n = cfg.n_layers * cfg.d_model * cfg.d_head * cfg.n_heads * 4
    if cfg.d_mlp:
        per_layer = cfg.d_model * cfg.d_mlp * (2 + cfg.gated_mlp)
        if cfg.num_experts:
            per_layer = (per_layer + cfg.d_model) * cfg.num_experts
        n += cfg.n_layers * per_layer
    return n


def _device_of(gm) -> torch.device | None:
    param = _first_param(gm)
    return None if param is None else param.device


def _dtype_of(gm) -> torch.dtype | None:
    traced = getattr(gm, "_fxb_dtype", None)
    if traced is not None:
        return traced
    param = _first_param(gm)
    return None if param is None else param.dtype


def _first_param(gm):
    embed = _module(gm.hf, gm.spec.embed)
    weight = getattr(embed, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight
    return next(iter(gm.hf.parameters()), None)
