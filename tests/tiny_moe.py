"""Tiny configs for the routed-MoE group (architectures/moe.py; merged into tiny.CONFIGS): 4 experts, top-2, one
shared expert where the family has one, dense layers before / between MoE layers where the family has them."""
from tiny import COMMON, TinyConfig

_MOE = dict(COMMON, moe_intermediate_size=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_E4 = dict(num_experts=4, num_experts_per_tok=2)  # Qwen-MoE, OLMoE, FlexOlmo, MiniMax-M2
_LOCAL4 = dict(num_local_experts=4, num_experts_per_tok=2)  # Mixtral, PhiMoE, GraniteMoE

CONFIGS: dict[str, TinyConfig] = {
    "mixtral": TinyConfig("MixtralConfig", **_MOE, **_LOCAL4, sliding_window=4),
    # layer 1 dense (mlp_only_layers), renormalised top-k
    "qwen3_moe": TinyConfig("Qwen3MoeConfig", **_MOE, **_E4, mlp_only_layers=[1], norm_topk_prob=True),
    "olmoe": TinyConfig("OlmoeConfig", **_MOE, **_E4),
    "flex_olmo": TinyConfig("FlexOlmoConfig", **_MOE, **_E4),
    "minimax_m2": TinyConfig("MiniMaxM2Config", **_MOE, **_E4),
    "phimoe": TinyConfig("PhimoeConfig", **_MOE, **_LOCAL4),
    "qwen2_moe": TinyConfig("Qwen2MoeConfig", **_MOE, **_E4, shared_expert_intermediate_size=48,
                            decoder_sparse_step=1, mlp_only_layers=[0]),
    # layer 0 dense (moe_layer_start_index=1), one shared expert
    "ernie4_5_moe": TinyConfig("Ernie4_5_MoeConfig", **_MOE, moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                               moe_layer_start_index=1),
    # layer 0 dense (first_k_dense_replace=1), one shared expert, 2 groups of 2 experts, top-1 group
    "glm4_moe": TinyConfig("Glm4MoeConfig", **_MOE, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
                           first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.5),
    "granitemoe": TinyConfig("GraniteMoeConfig", **_MOE, **_LOCAL4, embedding_multiplier=3.0,
                             residual_multiplier=0.5, attention_multiplier=0.07, logits_scaling=4.0),
}


def _moe_at(*layers):
    return lambda m: [i for i, layer in enumerate(m.model.layers)
                      if hasattr(getattr(layer, "mlp", None) or layer.block_sparse_moe, "experts")] == list(layers)


FEATURE_GUARDS: dict = {
    "mixtral": _moe_at(0, 1, 2),
    "qwen3_moe": _moe_at(0, 2),
    "olmoe": _moe_at(0, 1, 2),
    "flex_olmo": lambda m: _moe_at(0, 1, 2)(m) and not hasattr(m.model.layers[0], "input_layernorm"),
    "minimax_m2": _moe_at(0, 1, 2),
    "phimoe": _moe_at(0, 1, 2),
    "qwen2_moe": lambda m: _moe_at(1, 2)(m) and hasattr(m.model.layers[1].mlp, "shared_expert_gate"),
    "ernie4_5_moe": lambda m: _moe_at(1, 2)(m) and m.model.layers[1].mlp.shared_experts is not None,
    "glm4_moe": lambda m: _moe_at(1, 2)(m) and m.config.n_group == 2,
    "granitemoe": lambda m: _moe_at(0, 1, 2)(m) and m.config.residual_multiplier == 0.5,
}

_LLAMA = dict(rotary=True, gated=True, pos=False)
_POST = dict(_LLAMA, drop=["ln1.hook_scale", "ln1.hook_normalized", "ln2.hook_scale", "ln2.hook_normalized"],
             extra=["ln1_post.hook_scale", "ln1_post.hook_normalized", "ln2_post.hook_scale",
                    "ln2_post.hook_normalized"])
FAMILY: dict[str, dict] = {
    "mixtral": dict(_LLAMA, moe_layers=(0, 1, 2)),
    "qwen3_moe": dict(_LLAMA, moe_layers=(0, 2)),
    "olmoe": dict(_LLAMA, moe_layers=(0, 1, 2)),
    "flex_olmo": dict(_POST, moe_layers=(0, 1, 2)),
    "minimax_m2": dict(_LLAMA, moe_layers=(0, 1, 2)),
    "phimoe": dict(_LLAMA, moe_layers=(0, 1, 2)),
    "qwen2_moe": dict(_LLAMA, moe_layers=(1, 2), moe_extra=["mlp.hook_shared_gate", "mlp.hook_shared_out"]),
    "ernie4_5_moe": dict(_LLAMA, moe_layers=(1, 2), moe_extra=["mlp.hook_shared_out"]),
    "glm4_moe": dict(_LLAMA, moe_layers=(1, 2), moe_extra=["mlp.hook_shared_out"]),
    "granitemoe": dict(_LLAMA, moe_layers=(0, 1, 2), top=["hook_logits"]),
}
