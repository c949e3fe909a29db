"""Tiny configs for the diffattn group (architectures/diffattn.py; merged into tiny.CONFIGS)."""
from tiny import COMMON, VOCAB, TinyConfig  # noqa: F401

# DiffLlama: 4 query heads (2 differential head pairs), 2 KV heads (HF needs an even number), 2 layers (their
# lambda_init differs). JetMoE: 4 attention / MLP experts, top 2, 2 KV heads of 12 (so H = 4 query heads and
# H * dh = 48 != hidden 64), 2 layers.
CONFIGS: dict[str, TinyConfig] = {
    "diffllama": TinyConfig("DiffLlamaConfig", **dict(COMMON, num_hidden_layers=2)),
    "jetmoe": TinyConfig("JetMoeConfig", vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_local_experts=4, num_experts_per_tok=2, kv_channels=12, num_key_value_heads=2,
                         max_position_embeddings=128, tie_word_embeddings=False),
}


def _jetmoe(m) -> bool:
    attn, mlp = m.model.layers[0].self_attention, m.model.layers[0].mlp
    return (type(attn.experts).__name__ == "JetMoeMoA" and attn.experts.num_experts == 4 and attn.top_k == 2
            and m.config.num_attention_heads == 4 and attn.head_dim * 4 != m.config.hidden_size
            and type(mlp.router).__name__ == "JetMoeTopKGating" and mlp.router.num_experts == 4)


def _jetmoe_zero_head(ref, layer: int, head: int, d_head: int) -> list:
    """Zero query head ``head`` (= slot k * Hkv + kv head j) of layer ``layer`` in HF: in the rows the output
    experts read (sorted by expert; the router's first output maps them back to (token, slot) = t*K + k), the
    columns of kv head j in the rows of slot k."""
    attn = ref.model.layers[layer].self_attention
    slot, kv_head = divmod(head, attn.num_key_value_heads)
    seen = {}

    def keep_order(module, args, out):
        seen["order"] = out[0]

    def zero_columns(module, args):
        rows = seen["order"] % attn.top_k == slot
        x = args[0].clone()
        x[rows, kv_head * d_head:(kv_head + 1) * d_head] = 0.0
        return (x, *args[1:])

    return [attn.experts.router.register_forward_hook(keep_order),
            attn.experts.output_linear.register_forward_pre_hook(zero_columns)]


FEATURE_GUARDS: dict = {
    "diffllama": lambda m: hasattr(m.model.layers[0].self_attn, "lambda_q1")
    and m.model.layers[0].self_attn.lambda_init != m.model.layers[1].self_attn.lambda_init
    and m.config.num_key_value_heads == 2 < m.config.num_attention_heads,
    "jetmoe": _jetmoe,
}
# Golden per-layer hooks beyond Llama's (tests/runtime/test_hooks.py)
DIFF = ["attn.hook_lambda", "attn.hook_diff_pattern", "attn.hook_diff"]
ROUTED = ["hook_router_logits", "hook_expert_indices", "hook_routing_weights", "hook_expert_out"]
FAMILY: dict = {
    "diffllama": dict(rotary=True, gated=True, pos=False, extra=DIFF, z_of_values=None),
    # no dense MLP: hook_pre / hook_post do not exist; both routers and their slots are hooked
    "jetmoe": dict(rotary=True, gated=False, pos=False, drop=["mlp.hook_pre", "mlp.hook_post"],
                   extra=[f"{m}.{h}" for m in ("attn", "mlp") for h in ROUTED], zero_head_in_hf=_jetmoe_zero_head,
                   z_of_values=lambda v, n_rep: v.repeat(1, 1, n_rep, 1)),
}
