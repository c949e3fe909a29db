"""Tiny configs for the MLA group: DeepSeek V2 / V3 (architectures/mla.py; merged into tiny.CONFIGS)."""
from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

# Multi-head latent attention with every size distinct: q LoRA rank 24, KV LoRA rank 16, rope part 8, nope part 8
# (q/k head 16), value head 12; MoE with 4 routed experts, top-2, one shared expert, 2 groups (top-1 group); the
# first layer dense.
MLA = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
           num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2,
           n_shared_experts=1, n_group=2, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
           qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, max_position_embeddings=128,
           tie_word_embeddings=False)

CONFIGS: dict[str, TinyConfig] = {
    "deepseek_v3": TinyConfig("DeepseekV3Config", **MLA),
    # V2: softmax router with the group-limited top-k and a routed scale away from 1
    "deepseek_v2": TinyConfig("DeepseekV2Config", **MLA, topk_method="group_limited_greedy", routed_scaling_factor=2.0),
}


def _mla(m, rope_layout: str) -> bool:
    attn, cfg = m.model.layers[0].self_attn, m.config
    return (attn.q_a_layernorm is not None and attn.kv_a_layernorm.weight.numel() == cfg.kv_lora_rank == 16
            and attn.q_b_proj.in_features == cfg.q_lora_rank == 24 and cfg.v_head_dim != cfg.qk_nope_head_dim
            and cfg.qk_rope_head_dim == 8 and attn.o_proj.in_features == 4 * 12
            and (rope_layout == "complex" or bool(cfg.rope_interleave) == (rope_layout == "interleaved")))


FEATURE_GUARDS: dict = {
    "deepseek_v3": lambda m: _mla(m, "interleaved") and m.config.norm_topk_prob
    and m.config.routed_scaling_factor != 1.0,
    "deepseek_v2": lambda m: _mla(m, "complex") and m.config.topk_method == "group_limited_greedy"
    and m.config.routed_scaling_factor == 2.0,
}
_MLA_HOOKS = ["attn.hook_q_latent", "attn.hook_kv_latent", "attn.hook_k_rope"]
# layer 0 dense (first_k_dense_replace=1), layers 1-2 MoE with one shared expert
_FACTS = dict(rotary=True, gated=True, pos=False, extra=_MLA_HOOKS, moe_layers=(1, 2),
              moe_extra=["mlp.hook_shared_out"])
FAMILY: dict = {"deepseek_v3": _FACTS, "deepseek_v2": _FACTS}
