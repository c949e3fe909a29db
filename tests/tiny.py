"""Tiny random-weight models built from config classes (no hub), odd sizes to catch shape bugs."""
from __future__ import annotations

import contextlib
import copy

import torch
import transformers as tf

VOCAB = 101
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
              head_dim=16, num_hidden_layers=3, max_position_embeddings=128, tie_word_embeddings=False)
# Gemma 2/3: sliding and global layers, a query_pre_attn_scalar unlike head_dim, and weights large enough
# (initializer_range 0.2) that the softcaps 5.0 (scores) and 3.0 (logits) really bend the values.
GEMMA_SANDWICH = dict(COMMON, sliding_window=4, query_pre_attn_scalar=20, initializer_range=0.2,
                      layer_types=["sliding_attention", "full_attention", "sliding_attention"])
# GPTBigCode and Falcon: 2 layers; every fused-QKV layout (MQA contiguous, per head, per group), RoPE and ALiBi,
# parallel and sequential blocks. falcon_40b: 8 heads in 2 KV groups, where TransformerLens gets the logits wrong.
BIGCODE = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
FALCON = dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
              max_position_embeddings=128, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
FALCON_OLD = dict(FALCON, new_decoder_architecture=False, alibi=False, bias=False)
# Gemma 4: 5 layers [sliding, sliding, full, sliding, full]; the last 2 reuse the k/v of layers 1 and 2 (KV
# sharing, double-wide MLP), full layers have head_dim 32 and 1 KV head with k = v (no v_proj); per-layer
# embeddings (width 8), a 4-expert top-2 MoE block, final softcap, sliding window 4.
GEMMA4 = dict(COMMON, num_hidden_layers=5, sliding_window=4, global_head_dim=32, num_global_key_value_heads=1,
              layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention",
                           "full_attention"], attention_k_eq_v=True, num_kv_shared_layers=2, use_double_wide_mlp=True,
              hidden_size_per_layer_input=8, vocab_size_per_layer_input=VOCAB, enable_moe_block=True, num_experts=4,
              top_k_experts=2, moe_intermediate_size=24, final_logit_softcapping=30.0)


class TinyConfig:
    """A recipe for a tiny config: the transformers config class by name (a class the installed transformers
    lacks is then detectable without building, see ``missing_config_class``) and its keyword arguments."""

    def __init__(self, cls: str, **kwargs):
        self.cls, self.kwargs = cls, kwargs

    def __call__(self):
        return getattr(tf, self.cls)(**copy.deepcopy(self.kwargs))


CONFIGS = {
    "llama": TinyConfig("LlamaConfig", **COMMON),
    "mistral": TinyConfig("MistralConfig", **COMMON, sliding_window=4),
    "qwen2": TinyConfig("Qwen2Config", **COMMON),
    "qwen3": TinyConfig("Qwen3Config", **COMMON),
    "gpt2": TinyConfig("GPT2Config", vocab_size=VOCAB, n_embd=64, n_layer=3, n_head=4, n_positions=128,
                       bos_token_id=0, eos_token_id=0),
    "gemma": TinyConfig("GemmaConfig", **dict(COMMON, num_key_value_heads=1, head_dim=24)),  # MQA, H*dh != D
    "gemma2": TinyConfig("Gemma2Config", **GEMMA_SANDWICH, attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    "gemma3_text": TinyConfig("Gemma3TextConfig", **GEMMA_SANDWICH, final_logit_softcapping=3.0, rope_parameters={
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1000.0}}),
    "gpt_bigcode": TinyConfig("GPTBigCodeConfig", **BIGCODE, multi_query=True),
    "gpt_bigcode_mha": TinyConfig("GPTBigCodeConfig", **BIGCODE, multi_query=False),
    "falcon_7b": TinyConfig("FalconConfig", **dict(FALCON_OLD, multi_query=True, parallel_attn=True)),
    "falcon_mha": TinyConfig("FalconConfig", **dict(FALCON_OLD, multi_query=False, parallel_attn=False)),
    "falcon_rw": TinyConfig("FalconConfig", **dict(FALCON_OLD, multi_query=False, parallel_attn=False, alibi=True,
                                                   bias=True)),
    "falcon_new_mqa": TinyConfig("FalconConfig", **FALCON, new_decoder_architecture=True, num_kv_heads=1),
    "falcon_40b": TinyConfig("FalconConfig", **dict(FALCON, num_attention_heads=8), new_decoder_architecture=True,
                             num_kv_heads=2),
    "gemma4_text": TinyConfig("Gemma4TextConfig", **GEMMA4),  # transformers >= 5.5
}


# The families the whole generic suite runs on (export, hygiene, errors, saving...). Every family in CONFIGS,
# these and those the group modules below add, runs the contract tests (parity, padding, hooks, head ablation).
CORE = tuple(CONFIGS)


def missing_config_class(arch: str) -> str | None:
    """The config class of tiny ``arch`` when the installed transformers lacks it (a newer family), else None."""
    name = CONFIGS[arch].cls
    return None if hasattr(tf, name) else name


# What each tiny config must really contain, so a test cannot pass on a config that lost its feature.
FEATURE_GUARDS = {
    "llama": lambda m: m.config.num_key_value_heads < m.config.num_attention_heads,
    "mistral": lambda m: m.config.sliding_window == 4 and m.config.num_key_value_heads < m.config.num_attention_heads,
    "qwen2": lambda m: m.model.layers[0].self_attn.q_proj.bias is not None,
    "qwen3": lambda m: hasattr(m.model.layers[0].self_attn, "q_norm"),
    "gpt2": lambda m: type(m.transformer.h[0].attn.c_attn).__name__ == "Conv1D",
    "gemma": lambda m: m.config.num_key_value_heads == 1 and m.config.head_dim * m.config.num_attention_heads
    != m.config.hidden_size and float(m.model.embed_tokens.embed_scale) == m.config.hidden_size ** 0.5,
    "gemma2": lambda m: hasattr(m.model.layers[0], "post_feedforward_layernorm")
    and m.config.attn_logit_softcapping == 5.0 and m.config.final_logit_softcapping == 3.0
    and {"sliding_attention", "full_attention"} <= set(m.config.layer_types) and m.config.sliding_window == 4
    and m.config.query_pre_attn_scalar != m.config.head_dim,
    "gemma3_text": lambda m: hasattr(m.model.layers[0].self_attn, "q_norm")
    and hasattr(m.model.layers[0], "post_feedforward_layernorm") and m.config.final_logit_softcapping == 3.0
    and {"sliding_attention", "full_attention"} <= set(m.config.layer_types)
    and m.config.rope_parameters["sliding_attention"]["rope_theta"]
    != m.config.rope_parameters["full_attention"]["rope_theta"],
    "gpt_bigcode": lambda m: m.config.multi_query and m.transformer.h[0].attn.c_attn.out_features == 64 + 2 * 16,
    "gpt_bigcode_mha": lambda m: not m.config.multi_query and m.transformer.h[0].attn.c_attn.out_features == 3 * 64,
    "falcon_7b": lambda m: m.config.multi_query and m.config.parallel_attn and not m.config.alibi
    and not m.config.new_decoder_architecture and m.transformer.h[0].self_attention.query_key_value.out_features == 96,
    "falcon_mha": lambda m: not (m.config.multi_query or m.config.parallel_attn or m.config.alibi
                                 or m.config.new_decoder_architecture),
    "falcon_rw": lambda m: m.config.alibi and not m.config.parallel_attn and not m.config.multi_query
    and m.transformer.h[0].self_attention.query_key_value.bias is not None
    and hasattr(m.transformer.h[0], "post_attention_layernorm"),
    "falcon_new_mqa": lambda m: m.config.new_decoder_architecture and m.config.num_kv_heads == 1
    and hasattr(m.transformer.h[0], "ln_mlp"),
    "falcon_40b": lambda m: m.config.new_decoder_architecture and m.config.num_attention_heads == 8
    and m.config.num_kv_heads == 2 and not m.config.alibi and hasattr(m.transformer.h[0], "ln_mlp"),
    "gemma4_text": lambda m: _gemma4_features(m),
}


def _gemma4_features(m) -> bool:
    layers = m.model.layers
    return (not hasattr(layers[3].self_attn, "k_proj") and not hasattr(layers[4].self_attn, "k_proj")  # KV sharing
            and layers[2].self_attn.v_proj is None and layers[0].self_attn.v_proj is not None  # k = v on full layers
            and layers[2].self_attn.head_dim != layers[0].self_attn.head_dim and hasattr(layers[0].self_attn, "v_norm")
            and hasattr(layers[0], "per_layer_input_gate") and hasattr(layers[0], "experts")
            and all(float(layer.layer_scalar) != 1.0 for layer in layers) and m.config.final_logit_softcapping == 30.0
            and m.config.sliding_window == 4 and layers[3].mlp.up_proj.out_features == 2 * m.config.intermediate_size)


def _gemma4_weights(model) -> None:
    """Checkpoint-like values random init leaves at 1: ``layer_scalar`` (a buffer) and the post-norm gains.

    With gains of 1 every Gemma 4 branch (attention, MLP, MoE, PLE) adds O(1) after its post-norm and the
    residual of a random 5-layer model grows to ~10, where fp32 noise between HF's own sdpa and eager paths
    (~1e-6 relative) already exceeds the 1e-5 absolute tolerance; gains of 0.1 keep the residual ~1.
    """
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.layer_scalar.fill_(0.9 - 0.05 * i)
            for name in ("post_attention_layernorm", "post_feedforward_layernorm", "post_feedforward_layernorm_1",
                         "post_feedforward_layernorm_2", "post_per_layer_input_norm"):
                getattr(layer, name).weight.mul_(0.1)


# Per-architecture touches after the generic perturbation (weights random init leaves meaningless).
ADJUST = {"gemma4_text": _gemma4_weights}


def build_from_config(config, seed: int = 0) -> torch.nn.Module:
    """A random-weight model for ``config``; the same seed gives the same weights."""
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(config).eval()
    # Random-init norms are all ones; perturb every parameter so norm weights and biases matter.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def build(arch: str, seed: int = 0, attn_implementation: str | None = None) -> torch.nn.Module:
    config = CONFIGS[arch]()
    if attn_implementation:
        config._attn_implementation = attn_implementation
    model = build_from_config(config, seed)
    if arch in ADJUST:
        ADJUST[arch](model)
    return model


@contextlib.contextmanager
def forward_hooks(*pairs):
    """Forward hooks ``(module, fn)`` on HF modules while inside, removed after (the tests' HF-side recorders)."""
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def eager_reference(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy of ``model`` running HF's eager attention."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref.eval()


def mid_hook(gm, layer: int) -> str:
    """A residual-stream hook inside the layer: resid_mid, or attn_out on parallel blocks (which have no mid)."""
    return f"blocks.{layer}.hook_attn_out" if gm.spec.parallel else f"blocks.{layer}.hook_resid_mid"


def tokens(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def left_padded(batch: int, seq: int, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokens(batch, seq, seed=2)
    mask = torch.ones(batch, seq, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
        ids[row, :n] = 0
    return ids, mask


# Family groups live in their own modules (tests/tiny_<group>.py), each defining CONFIGS, FEATURE_GUARDS, FAMILY
# (the golden-hook facts tests/runtime/test_hooks.py reads), and optionally ADJUST and LAYER_SIZES.
GROUPS = ("tiny_llama_like", "tiny_parallel", "tiny_fused", "tiny_classic", "tiny_resid",
          "tiny_moe",
          "tiny_mla",
          "tiny_sinks",
          "tiny_diffattn",
          "tiny_llama4")
FAMILY: dict[str, dict] = {}
LAYER_SIZES: dict = {}


def _merge_groups() -> None:
    import importlib
    for group in GROUPS:
        mod = importlib.import_module(group)
        for table, extra in ((CONFIGS, "CONFIGS"), (FEATURE_GUARDS, "FEATURE_GUARDS"), (FAMILY, "FAMILY"),
                             (ADJUST, "ADJUST"), (LAYER_SIZES, "LAYER_SIZES")):
            entries = getattr(mod, extra, {})
            clash = set(entries) & set(table)
            assert not clash, f"{group}.{extra} redefines {sorted(clash)}"
            table.update(entries)


_merge_groups()
