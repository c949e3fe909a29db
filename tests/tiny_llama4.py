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
MOE = ["mlp.hook_router_logits", "mlp.hook_expert_indices", "mlp.hook_routing_weights", "mlp.hook_expert_out"]
DENSE = ["mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"]

CONFIGS: dict[str, TinyConfig] = {
    "llama4_text": TinyConfig("Llama4TextConfig", **LLAMA4),
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


FEATURE_GUARDS: dict = {
    "llama4_text": _llama4,
}
FAMILY: dict = {
    # layer 3 is NoPE: no rot hooks; MoE layers have the routing hooks instead of the dense MLP's
    "llama4_text": dict(rotary=True, gated=True, pos=False, nope_layers=(3,), moe_layers=LLAMA4_MOE_LAYERS,
                        moe=MOE + ["mlp.hook_shared_out"], dense=DENSE),
}


def _llama4_sizes(model, i):
    mlp = model.model.layers[i].feed_forward
    return dict(d_mlp=mlp.up_proj.out_features if hasattr(mlp, "up_proj") else None)


LAYER_SIZES: dict = {"llama4_text": _llama4_sizes}
