"""Tiny configs for the fused-MLP (Phi-3, GLM, GLM-4) and LayerNorm-with-bias (StarCoder 2, StableLM, Persimmon)
families (merged into tiny.CONFIGS; see tiny.GROUPS)."""
from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

# vocab 101: the default pad/bos/eos ids lie outside it
IDS = dict(pad_token_id=0, bos_token_id=0, eos_token_id=0)
SANDWICH = ["ln1_post.hook_scale", "ln1_post.hook_normalized", "ln2_post.hook_scale", "ln2_post.hook_normalized"]


def _rope(partial: float) -> dict:
    return {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}


CONFIGS: dict[str, TinyConfig] = {
    # fused qkv_proj with GQA, fused gate_up_proj, partial rotary (Phi-4-mini style: 12 of 16 lanes)
    "phi3": TinyConfig("Phi3Config", **COMMON, **IDS, rope_parameters=_rope(0.75)),
    # partial interleaved rotary (8 of 16 lanes), q/k/v biases, fused gate_up_proj
    "glm": TinyConfig("GlmConfig", **COMMON, **IDS, rope_parameters=_rope(0.5)),
    "glm4": TinyConfig("Glm4Config", **COMMON, **IDS, rope_parameters=_rope(0.5)),
    # biases everywhere, sliding window 4, tied embeddings (StarCoder 2's default)
    "starcoder2": TinyConfig("Starcoder2Config", **dict(COMMON, tie_word_embeddings=True), **IDS, sliding_window=4),
    # sequential block with per-head q/k LayerNorms and q/k/v biases; rotary on 4 of 16 lanes
    "stablelm": TinyConfig("StableLmConfig", **COMMON, **IDS, qk_layernorm=True, use_qkv_bias=True,
                           rope_parameters=_rope(0.25)),
    # parallel residual, no q/k norms
    "stablelm_parallel": TinyConfig("StableLmConfig", **COMMON, **IDS, use_parallel_residual=True,
                                    rope_parameters=_rope(0.25)),
    # MHA only (fused per-head [q_h, k_h, v_h]), q/k LayerNorm, ReLU^2, rotary on 8 of 16 lanes
    "persimmon": TinyConfig("PersimmonConfig", **dict(COMMON, num_key_value_heads=4), **IDS,
                            rope_parameters=_rope(0.5)),
}


def _mlp(m):
    return m.model.layers[0].mlp


FEATURE_GUARDS: dict = {
    "phi3": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads
    and _mlp(m).gate_up_proj.out_features == 2 * m.config.intermediate_size
    and m.model.layers[0].self_attn.qkv_proj.out_features == (4 + 2 * 2) * 16
    and m.config.rope_parameters["partial_rotary_factor"] < 1,
    "glm": lambda m: m.config.rope_parameters["partial_rotary_factor"] < 1
    and m.model.layers[0].self_attn.q_proj.bias is not None and hasattr(_mlp(m), "gate_up_proj"),
    "glm4": lambda m: hasattr(m.model.layers[0], "post_mlp_layernorm") and hasattr(_mlp(m), "gate_up_proj")
    and m.config.rope_parameters["partial_rotary_factor"] < 1,
    "starcoder2": lambda m: m.config.sliding_window == 4 and m.model.layers[0].self_attn.o_proj.bias is not None
    and m.model.layers[0].input_layernorm.bias is not None and m.lm_head.weight is m.model.embed_tokens.weight
    and m.config.num_key_value_heads < m.config.num_attention_heads,
    "stablelm": lambda m: m.config.qk_layernorm and not m.config.use_parallel_residual
    and m.model.layers[0].self_attn.q_proj.bias is not None and m.model.layers[0].self_attn.rotary_ndims == 4,
    "stablelm_parallel": lambda m: m.config.use_parallel_residual and not m.config.qk_layernorm
    and m.model.layers[0].post_attention_layernorm is None,
    "persimmon": lambda m: m.config.qk_layernorm and m.config.hidden_act == "relu2"
    and m.model.layers[0].self_attn.rotary_ndims == 8,
}

GATED = dict(rotary=True, gated=True, pos=False)
FAMILY: dict[str, dict] = {
    "phi3": GATED,
    "glm": GATED,
    "glm4": dict(GATED, sandwich=True),
    "starcoder2": dict(rotary=True, gated=False, pos=False),
    "stablelm": GATED,
    "stablelm_parallel": dict(GATED, parallel=True, ln2=False),
    "persimmon": dict(rotary=True, gated=False, pos=False),
}
