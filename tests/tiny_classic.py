"""Tiny configs for the classic families (architectures/learned_pos.py, architectures/alibi.py)."""
from tiny import VOCAB, TinyConfig

OPT = dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=96, num_attention_heads=4, num_hidden_layers=3,
           max_position_embeddings=128, word_embed_proj_dim=64, pad_token_id=1, bos_token_id=2, eos_token_id=2)

CONFIGS: dict[str, TinyConfig] = {
    "opt": TinyConfig("OPTConfig", **OPT),
    # OPT-350m style: post-LN blocks, no final norm, embeddings of width 48 projected in and out
    "opt_350m": TinyConfig("OPTConfig", **dict(OPT, do_layer_norm_before=False, word_embed_proj_dim=48)),
    "xglm": TinyConfig("XGLMConfig", vocab_size=VOCAB, d_model=64, ffn_dim=96, attention_heads=4, num_layers=3,
                       max_position_embeddings=128, pad_token_id=1, bos_token_id=0, eos_token_id=2),
    # layers: global, local, local with a window of 4 (shorter than the test sequences)
    "gpt_neo": TinyConfig("GPTNeoConfig", vocab_size=VOCAB, hidden_size=64, num_heads=4, num_layers=3,
                          attention_types=[[["global", "local"], 1], [["local"], 1]], window_size=4,
                          max_position_embeddings=128, intermediate_size=96, bos_token_id=0, eos_token_id=0),
    "openai-gpt": TinyConfig("OpenAIGPTConfig", vocab_size=VOCAB, n_embd=64, n_head=4, n_layer=3, n_positions=128),
    "bloom": TinyConfig("BloomConfig", vocab_size=VOCAB, hidden_size=64, n_head=4, n_layer=3, bos_token_id=0,
                        eos_token_id=0, pad_token_id=0),
    "mpt": TinyConfig("MptConfig", vocab_size=VOCAB, d_model=64, n_heads=4, n_layers=3, max_seq_len=128),
}


def _opt_layer(m):
    layer = m.model.decoder.layers[0]
    return hasattr(layer, "fc1") and not hasattr(layer, "mlp")


FEATURE_GUARDS: dict = {
    "opt": lambda m: _opt_layer(m) and m.config.do_layer_norm_before and m.model.decoder.project_in is None
    and m.model.decoder.final_layer_norm is not None and m.model.decoder.embed_positions.offset == 2,
    "opt_350m": lambda m: _opt_layer(m) and not m.config.do_layer_norm_before
    and m.model.decoder.project_in.in_features == 48 and m.model.decoder.project_out.out_features == 48
    and m.model.decoder.final_layer_norm is None,
    "xglm": lambda m: m.config.scale_embedding and float(m.model.embed_tokens.embed_scale) == 8.0
    and hasattr(m.model.layers[0], "fc1"),
    "gpt_neo": lambda m: [layer.attn.attention_type for layer in m.transformer.h] == ["global", "local", "local"]
    and m.config.window_size == 4,
    "openai-gpt": lambda m: not hasattr(m.transformer, "ln_f") and type(m.transformer.h[0].attn.c_attn).__name__
    == "Conv1D",
    "bloom": lambda m: hasattr(m.transformer, "word_embeddings_layernorm")
    and m.transformer.h[0].self_attention.query_key_value.out_features == 3 * 64,
    "mpt": lambda m: m.config.attn_config.alibi and m.transformer.blocks[0].norm_1.bias is None
    and m.transformer.blocks[0].attn.Wqkv.out_features == 3 * 64,
}

LN_EMBED = ["ln_embed.hook_scale", "ln_embed.hook_normalized"]
FAMILY: dict[str, dict] = {  # golden-hook facts, as tests/runtime/test_hooks.py FAMILY
    "opt": dict(rotary=False, gated=False, pos=True),
    "opt_350m": dict(rotary=False, gated=False, pos=True, final_norm=False),
    "xglm": dict(rotary=False, gated=False, pos=True),
    "gpt_neo": dict(rotary=False, gated=False, pos=True),
    "openai-gpt": dict(rotary=False, gated=False, pos=True, final_norm=False),
    "bloom": dict(rotary=False, gated=False, pos=False, top=LN_EMBED),
    "mpt": dict(rotary=False, gated=False, pos=False),
}

# MLP widths the generic shape test cannot read from config.intermediate_size
LAYER_SIZES: dict = {
    "opt": lambda m, i: dict(d_mlp=m.config.ffn_dim),
    "opt_350m": lambda m, i: dict(d_mlp=m.config.ffn_dim),
    "xglm": lambda m, i: dict(d_mlp=m.config.ffn_dim),
}
