"""Tiny configs of the Llama-like families (architectures/llama.py): separate q/k/v, RMSNorm or LayerNorm, RoPE."""
from tiny import COMMON, TinyConfig

_PAD = dict(COMMON, pad_token_id=0)  # several configs default pad_token_id beyond the tiny vocabulary
_NON_GATED = dict(rotary=True, gated=False, pos=False)
_GATED = dict(rotary=True, gated=True, pos=False)

CONFIGS = {
    "exaone": TinyConfig("ExaoneConfig", **_PAD),  # transformers' LlamaForCausalLM under another model_type
    "internlm3": TinyConfig("InternLM3Config", **_PAD),
    "ministral": TinyConfig("MinistralConfig", **_PAD, sliding_window=4,
                            layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
    "ministral3": TinyConfig("Ministral3Config", **_PAD),
    "helium": TinyConfig("HeliumConfig", **_PAD),
    "seed_oss": TinyConfig("SeedOssConfig", **_PAD, attention_bias=True),
    "ernie4_5": TinyConfig("Ernie4_5Config", **_PAD),
    "jais2": TinyConfig("Jais2Config", **_PAD),
    "nanochat": TinyConfig("NanoChatConfig", **_PAD),
    "smollm3": TinyConfig("SmolLM3Config", **_PAD, no_rope_layers=[1, 0, 1]),  # layer 1 has no RoPE
    "apertus": TinyConfig("ApertusConfig", **_PAD),
    "arcee": TinyConfig("ArceeConfig", **_PAD),
    "nemotron": TinyConfig("NemotronConfig", **_PAD),  # partial rotary: 0.5 by default
    "hunyuan_v1_dense": TinyConfig("HunYuanDenseV1Config", **_PAD),
    "olmo": TinyConfig("OlmoConfig", **_PAD),
}


def _cls(model, i=0, part="self_attn"):
    return type(getattr(model.model.layers[i], part)).__name__


def _mlp_act(model) -> str:
    mlp = model.model.layers[0].mlp
    return type(getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)).__name__


FEATURE_GUARDS = {
    "exaone": lambda m: type(m).__name__ == "LlamaForCausalLM" and m.config.model_type == "exaone",
    "internlm3": lambda m: type(m).__name__ == "LlamaForCausalLM" and m.config.model_type == "internlm3",
    "ministral": lambda m: "sliding_attention" in m.config.layer_types and m.config.sliding_window == 4,
    "ministral3": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads,
    "helium": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads,
    "seed_oss": lambda m: m.model.layers[0].self_attn.q_proj.bias is not None,
    "ernie4_5": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads,
    "jais2": lambda m: not hasattr(m.model.layers[0].mlp, "gate_proj") and _mlp_act(m) == "ReLUSquaredActivation"
    and m.model.layers[0].input_layernorm.bias is not None,
    "nanochat": lambda m: hasattr(m.model.layers[0].self_attn, "q_norm") and hasattr(m.model.layers[0].mlp, "fc1")
    and m.config.final_logit_softcapping is not None,
    "smollm3": lambda m: list(m.config.no_rope_layers) == [1, 0, 1],
    "apertus": lambda m: hasattr(m.model.layers[0], "attention_layernorm") and _mlp_act(m) == "XIELUActivation"
    if hasattr(m.model.layers[0].mlp, "act_fn") else False,
    "arcee": lambda m: not hasattr(m.model.layers[0].mlp, "gate_proj") and _mlp_act(m) == "ReLUSquaredActivation",
    "nemotron": lambda m: type(m.model.layers[0].input_layernorm).__name__ == "NemotronLayerNorm1P"
    and m.config.rope_parameters.get("partial_rotary_factor", 0.5) < 1,
    "hunyuan_v1_dense": lambda m: hasattr(m.model.layers[0].self_attn, "query_layernorm"),
    "olmo": lambda m: type(m.model.layers[0].input_layernorm).__name__ == "OlmoLayerNorm",
}

FAMILY = {
    "exaone": _GATED, "internlm3": _GATED, "ministral": _GATED, "ministral3": _GATED, "helium": _GATED,
    "seed_oss": _GATED, "ernie4_5": _GATED, "jais2": _NON_GATED, "nanochat": dict(_NON_GATED, final_softcap=True),
    "smollm3": dict(_GATED, nope_layers=(1,)), "apertus": _NON_GATED, "arcee": _NON_GATED, "nemotron": _NON_GATED,
    "hunyuan_v1_dense": _GATED, "olmo": _GATED,
}
