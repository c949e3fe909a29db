"""Errors name what was found and what to do."""
import pytest
import torch
import transformers as tf

import fxbridge as bridge
from tiny import tokens


def test_unknown_hook_name_suggests_close_matches(trio):
    _, _, gm = trio
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        gm.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.attn.hook_patern", lambda t, hook: None)])
    with pytest.raises(KeyError, match="hook_resid_post"):
        gm.run_with_cache(tokens(1, 3), names_filter=["blocks.1.hook_resid_pots"])


def test_wrongly_shaped_hook_return_names_hook_and_shapes(trio):
    _, _, gm = trio
    mid = "blocks.0.hook_resid_mid" if not gm.spec.parallel else "blocks.0.hook_attn_out"  # parallel: no mid
    with pytest.raises(bridge.HookShapeError) as info:
        gm.run_with_hooks(tokens(2, 4), fwd_hooks=[(mid, lambda t, hook: t[:, :-1])])
    msg = str(info.value)
    assert mid in msg
    assert str((2, 4, 64)) in msg and str((2, 3, 64)) in msg
    with pytest.raises(bridge.HookShapeError, match="list"):
        gm.run_with_hooks(tokens(2, 4), fwd_hooks=[("hook_embed", lambda t, hook: [1, 2])])
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())


def test_unsupported_architecture_lists_supported():
    torch.manual_seed(0)
    model = tf.OPTForCausalLM(tf.OPTConfig(vocab_size=50, hidden_size=32, num_attention_heads=2, ffn_dim=48,
                                           num_hidden_layers=1, word_embed_proj_dim=32))
    with pytest.raises(bridge.UnsupportedArchitecture) as info:
        bridge.trace(model)
    assert "'opt'" in str(info.value)
    for name in ("llama", "gpt2", "mistral", "qwen2", "qwen3"):
        assert name in str(info.value)
    assert set(bridge.supported_architectures()) >= {"llama", "gpt2", "mistral", "qwen2", "qwen3"}


def test_bad_inputs_are_reported():
    from conftest import traced
    _, _, gm = traced("llama")
    with pytest.raises(TypeError, match="input_ids"):
        gm("hello")
    with pytest.raises(ValueError, match="attention_mask"):
        gm(tokens(2, 4), attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="stop_at_layer"):
        gm(tokens(2, 4), stop_at_layer=7)
