"""Tiny configs for the post-norm / multiplier group (architectures/postnorm.py; merged into tiny.CONFIGS)."""
from tiny import COMMON, GEMMA_SANDWICH, VOCAB, TinyConfig  # noqa: F401

SLIDING = dict(sliding_window=4, layer_types=["sliding_attention", "full_attention", "sliding_attention"])
POST_NORM = ["ln1.hook_scale", "ln1.hook_normalized"]  # post-norm-only blocks: no pre-norms (ln2=False drops ln2)

CONFIGS: dict[str, TinyConfig] = {
    "olmo2": TinyConfig("Olmo2Config", **COMMON),
    "olmo3": TinyConfig("Olmo3Config", **COMMON, **SLIDING, rope_parameters={  # a rotary base per layer type
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    "exaone4": TinyConfig("Exaone4Config", **COMMON, **SLIDING),
    "vaultgemma": TinyConfig("VaultGemmaConfig", **GEMMA_SANDWICH, attn_logit_softcapping=5.0,
                             final_logit_softcapping=3.0),
    # every Granite constant away from 1 (and the attention scale away from 1/sqrt(dh)), biases on
    "granite": TinyConfig("GraniteConfig", **COMMON, embedding_multiplier=3.0, residual_multiplier=0.5,
                          attention_multiplier=0.07, logits_scaling=4.0, attention_bias=True, mlp_bias=True),
    # the defaults (all 1.0: HF still multiplies / divides by them), MHA, tied embeddings
    "granite_unit": TinyConfig("GraniteConfig", **dict(COMMON, num_key_value_heads=4, tie_word_embeddings=True)),
    "bitnet": TinyConfig("BitNetConfig", **COMMON),
}


def _post_norm_only(m) -> bool:
    layer = m.model.layers[0]
    return not hasattr(layer, "input_layernorm") and hasattr(layer, "post_feedforward_layernorm")


FEATURE_GUARDS: dict = {
    "olmo2": lambda m: _post_norm_only(m) and m.model.layers[0].self_attn.q_norm.weight.numel() == 4 * 16
    and m.config.num_key_value_heads < m.config.num_attention_heads,
    "olmo3": lambda m: _post_norm_only(m) and m.model.layers[1].self_attn.sliding_window is None
    and m.model.layers[0].self_attn.sliding_window == 4 and m.config.rope_parameters["sliding_attention"]["rope_theta"]
    != m.config.rope_parameters["full_attention"]["rope_theta"],
    "exaone4": lambda m: _post_norm_only(m) and m.model.layers[0].self_attn.q_norm.weight.numel() == 16
    and m.model.layers[0].self_attn.is_sliding and not m.model.layers[1].self_attn.is_sliding
    and m.config.sliding_window == 4,
    "vaultgemma": lambda m: not hasattr(m.model.layers[0], "post_attention_layernorm")
    and hasattr(m.model.layers[0], "pre_feedforward_layernorm") and m.config.attn_logit_softcapping == 5.0
    and m.config.final_logit_softcapping == 3.0 and m.config.query_pre_attn_scalar != m.config.head_dim
    and {"sliding_attention", "full_attention"} <= set(m.config.layer_types),
    "granite": lambda m: (m.config.embedding_multiplier, m.config.residual_multiplier, m.config.attention_multiplier,
                          m.config.logits_scaling) == (3.0, 0.5, 0.07, 4.0)
    and m.model.layers[0].self_attn.scaling == 0.07 and m.model.layers[0].mlp.down_proj.bias is not None,
    "granite_unit": lambda m: m.config.residual_multiplier == 1.0 and m.config.logits_scaling == 1.0
    and m.config.num_key_value_heads == m.config.num_attention_heads
    and m.lm_head.weight is m.model.embed_tokens.weight,
    "bitnet": lambda m: hasattr(m.model.layers[0].self_attn, "attn_sub_norm")
    and m.model.layers[0].mlp.ffn_sub_norm.weight.numel() == m.config.intermediate_size != m.config.hidden_size
    and m.config.num_key_value_heads < m.config.num_attention_heads,
}
_POST = dict(rotary=True, gated=True, pos=False, sandwich=True, ln2=False, drop=POST_NORM)
FAMILY: dict[str, dict] = {
    "olmo2": _POST,
    "olmo3": _POST,
    "exaone4": dict(_POST, nope_layers=(1,)),  # the full layer has no rotary (sliding window configured)
    "vaultgemma": dict(rotary=True, gated=True, pos=False, attn_softcap=True, final_softcap=True),
    "granite": dict(rotary=True, gated=True, pos=False, top=["hook_logits"]),
    # hook_z feeds the attention sub-norm, not o_proj: the head-zeroing test zeroes that module's input columns
    "bitnet": dict(rotary=True, gated=True, pos=False, extra=["attn.ln_sub.hook_scale", "attn.ln_sub.hook_normalized",
                                                            "mlp.ln_sub.hook_scale", "mlp.ln_sub.hook_normalized"],
                   z_feeds="self_attn.attn_sub_norm"),
    "granite_unit": dict(rotary=True, gated=True, pos=False, top=["hook_logits"]),
}
