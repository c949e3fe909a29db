"""Tiny configs for the parallel-block group (architectures/parallel.py), merged into tiny.CONFIGS.

Every config has rotary on part of each head only (NeoX 1/4, GPT-J/CodeGen rotary_dim < head_dim, Phi 1/2) or
interleaved rotary (GPT-J, CodeGen, Cohere), 3 layers and odd MLP widths. CodeGen has 8 heads so each of HF's 4
model-parallel blocks holds 2 heads per role; Phi and Cohere use GQA (2 KV heads).
"""
from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

_NEOX = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=3, intermediate_size=96,
             max_position_embeddings=128, tie_word_embeddings=False, attention_bias=True,
             rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25})
_GPTJ = dict(vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=3, rotary_dim=8, n_inner=96, n_positions=128,
             tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
_PHI = dict(COMMON, rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5})
_COHERE = dict(COMMON, logit_scale=0.25)

CONFIGS: dict[str, TinyConfig] = {
    "gpt_neox": TinyConfig("GPTNeoXConfig", **_NEOX),
    "gpt_neox_seq": TinyConfig("GPTNeoXConfig", **_NEOX, use_parallel_residual=False),
    "gptj": TinyConfig("GPTJConfig", **_GPTJ),
    "codegen": TinyConfig("CodeGenConfig", **dict(_GPTJ, n_head=8, rotary_dim=4), n_ctx=128),
    "phi": TinyConfig("PhiConfig", **_PHI),
    "phi_qk_norm": TinyConfig("PhiConfig", **dict(_PHI, num_key_value_heads=4), qk_layernorm=True),
    "cohere": TinyConfig("CohereConfig", **_COHERE),
    "cohere_qk_norm": TinyConfig("CohereConfig", **_COHERE, use_qk_norm=True),
    "cohere2": TinyConfig("Cohere2Config", **_COHERE, sliding_window=4,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
}


def _rot(attn) -> int:
    return getattr(attn, "rotary_ndims", None) or getattr(attn, "rotary_dim", None)


FEATURE_GUARDS: dict = {
    "gpt_neox": lambda m: m.config.use_parallel_residual and _rot(m.gpt_neox.layers[0].attention) == 4
    and m.gpt_neox.layers[0].attention.query_key_value.bias is not None,
    "gpt_neox_seq": lambda m: not m.config.use_parallel_residual,
    "gptj": lambda m: m.config.rotary_dim < m.config.n_embd // m.config.n_head and not hasattr(m.transformer.h[0],
                                                                                                "ln_2"),
    "codegen": lambda m: m.config.n_head == 8 and m.transformer.h[0].attn.qkv_proj.out_features == 3 * 64
    and m.config.rotary_dim < 8,
    "phi": lambda m: _rot(m.model.layers[0].self_attn) == 8 and m.config.num_key_value_heads == 2
    and m.model.layers[0].input_layernorm.bias is not None and not m.config.qk_layernorm,
    "phi_qk_norm": lambda m: hasattr(m.model.layers[0].self_attn, "q_layernorm"),
    "cohere": lambda m: m.config.logit_scale == 0.25 and m.config.num_key_value_heads == 2
    and type(m.model.norm).__name__ == "CohereLayerNorm" and not m.config.use_qk_norm,
    "cohere_qk_norm": lambda m: hasattr(m.model.layers[0].self_attn, "q_norm"),
    "cohere2": lambda m: m.config.logit_scale == 0.25 and m.config.sliding_window == 4
    and m.config.layer_types[1] == "full_attention",
}

_ONE_NORM = dict(pos=False, parallel=True, ln2=False)
FAMILY: dict[str, dict] = {  # golden-hook facts, as tests/runtime/test_hooks.py FAMILY
    "gpt_neox": dict(rotary=True, gated=False, pos=False, parallel=True),
    "gpt_neox_seq": dict(rotary=True, gated=False, pos=False),
    "gptj": dict(rotary=True, gated=False, **_ONE_NORM),
    "codegen": dict(rotary=True, gated=False, **_ONE_NORM),
    "phi": dict(rotary=True, gated=False, **_ONE_NORM),
    "phi_qk_norm": dict(rotary=True, gated=False, **_ONE_NORM),
    "cohere": dict(rotary=True, gated=True, **_ONE_NORM, top=["hook_logits"]),
    "cohere_qk_norm": dict(rotary=True, gated=True, **_ONE_NORM, top=["hook_logits"]),
    "cohere2": dict(rotary=True, gated=True, **_ONE_NORM, top=["hook_logits"], nope_layers=(1,)),
}

# GPT-J / CodeGen name their MLP width n_inner (the hook test's default is intermediate_size or 4 * D)
LAYER_SIZES: dict = {name: (lambda model, i: dict(d_mlp=model.config.n_inner)) for name in ("gptj", "codegen")}
