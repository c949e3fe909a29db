"""Tiny configs for Llama 4 (text) and DBRX (architectures/llama4.py, dbrx.py; merged into tiny.CONFIGS)."""
from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

# Llama 4: 4 layers; layers 1 and 3 MoE (interleave step 2: 4 experts of width 32, top-1 as HF's default, a shared
# expert), 0 and 2 dense (width 96); layer 3 NoPE (no_rope_layers[3] = 0) with temperature tuning that matters at
# these lengths (floor_scale 2), layers 0-2 rotary + L2 q/k norm with a chunked mask (attention_chunk_size 4).
LLAMA4 = dict(vocab_size=128, hidden_size=64, intermediate_size=32, intermediate_size_mlp=96, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
              interleave_moe_layer_step=2, attention_chunk_size=4, no_rope_layers=[1, 1, 1, 0], floor_scale=2,
              attn_scale=0.1, max_position_embeddings=128, tie_word_embeddings=False)
LLAMA4_MOE_LAYERS = (1, 3)

# DBRX: 2 layers, GQA (2 KV heads) in a fused Wqkv clamped at 0.15 (the clamp bites at these weights), 4 experts
# top-2 of width 32 with p=1 normalised weights. HF's DbrxAttention (5.15 and 5.24) reads attn_config.rope_theta,
# which DbrxAttentionConfig does not define (the rotary reads rope_parameters): it is given in both.
DBRX = dict(vocab_size=128, d_model=64, n_heads=4, n_layers=2, max_seq_len=128,
            attn_config=dict(clip_qkv=0.15, kv_n_heads=2, rope_theta=10000.0),
            ffn_config=dict(moe_num_experts=4, moe_top_k=2, ffn_hidden_size=32),
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0})

CONFIGS: dict[str, TinyConfig] = {
    "llama4_text": TinyConfig("Llama4TextConfig", **LLAMA4),
    "dbrx": TinyConfig("DbrxConfig", **DBRX),
}


def _llama4(m) -> bool:
    c, layers = m.config, m.model.layers
    return (tuple(c.moe_layers) == LLAMA4_MOE_LAYERS and c.layer_types[0] == "chunked_attention"
            and c.layer_types[3] == "full_attention" and c.attention_chunk_size == 4
            and not layers[3].self_attn.use_rope and layers[0].self_attn.use_rope
            and hasattr(layers[0].self_attn, "qk_norm") and c.attn_temperature_tuning and c.floor_scale == 2
            and type(layers[1].feed_forward).__name__ == "Llama4TextMoe"
            and layers[1].feed_forward.experts.gate_up_proj.shape == (4, 64, 64)
            and hasattr(layers[1].feed_forward, "shared_expert")
            and layers[0].feed_forward.up_proj.out_features == 96)


def _dbrx(m) -> bool:
    attn, ffn = m.transformer.blocks[0].norm_attn_norm.attn, m.transformer.blocks[0].ffn
    return (attn.clip_qkv == 0.15 and attn.num_key_value_heads == 2 and attn.Wqkv.out_features == 64 + 2 * 32
            and ffn.top_k == 2 and ffn.experts.num_experts == 4 and ffn.moe_normalize_expert_weights == 1.0
            and m.transformer.blocks[0].norm_attn_norm.norm_1.bias is None)


FEATURE_GUARDS: dict = {
    "llama4_text": _llama4,
    "dbrx": _dbrx,
}
FAMILY: dict = {
    # layer 3 is NoPE: no rot hooks; MoE layers have the routing hooks (and a shared expert) instead of the dense MLP's
    "llama4_text": dict(rotary=True, gated=True, pos=False, nope_layers=(3,), moe_layers=LLAMA4_MOE_LAYERS,
                        moe_extra=["mlp.hook_shared_out"]),
    # every layer MoE, no dense MLP, no shared expert; top-k reads the softmax of the logits
    "dbrx": dict(rotary=True, gated=False, pos=False, moe_layers=(0, 1), moe_extra=["mlp.hook_router_probs"]),
}


def _llama4_sizes(model, i):
    mlp = model.model.layers[i].feed_forward
    return dict(d_mlp=mlp.up_proj.out_features if hasattr(mlp, "up_proj") else None)


LAYER_SIZES: dict = {"llama4_text": _llama4_sizes}
