"""Errors name what was found and what to do."""
import pytest
import torch
import transformers as tf

import fxbridge as bridge
from tiny import mid_hook, tokens


def test_unknown_hook_name_suggests_close_matches(core_trio):
    _, _, gm = core_trio
    with pytest.raises(KeyError, match="blocks.0.attn.hook_pattern"):
        gm.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.0.attn.hook_patern", lambda t, hook: None)])
    with pytest.raises(KeyError, match="hook_resid_post"):
        gm.run_with_cache(tokens(1, 3), names_filter=["blocks.1.hook_resid_pots"])


def test_wrongly_shaped_hook_return_names_hook_and_shapes(core_trio):
    _, _, gm = core_trio
    mid = mid_hook(gm, 0)
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
    model = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                               intermediate_size=48))  # no attention: nothing to infer either
    with pytest.raises(bridge.UnsupportedArchitecture) as info:
        bridge.trace(model)
    assert "'mamba'" in str(info.value)
    for name in ("llama", "gpt2", "mistral", "qwen2", "qwen3"):
        assert name in str(info.value)
    assert set(bridge.supported_architectures()) >= {"llama", "gpt2", "mistral", "qwen2", "qwen3"}


def test_bad_inputs_are_reported():
    from conftest import traced
    _, _, gm = traced("llama")
    with pytest.raises(TypeError, match="token ids"):
        gm(torch.randn(2, 4))
    with pytest.raises(TypeError, match="token ids"):
        gm(3)
    with pytest.raises(ValueError, match="attention_mask"):
        gm(tokens(2, 4), attention_mask=torch.ones(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="stop_at_layer"):
        gm(tokens(2, 4), stop_at_layer=7)


def test_export_of_an_untraced_module_says_to_trace_it(tmp_path):
    from tiny import build
    model = build("llama")
    for call in (lambda: bridge.export(model, tmp_path / "x.dot"), lambda: bridge.to_networkx(model)):
        with pytest.raises(bridge.NotTracedError, match=r"fxbridge\.trace\(model\)"):
            call()
    assert not (tmp_path / "x.dot").exists()


def test_a_hook_raising_inside_a_core_leaves_the_module_usable(core_trio):
    """The pattern hook fires inside the attention core (eager path); after it raises, the fused path is back."""
    model, ref, gm = core_trio
    ids = tokens(2, 5)

    def boom(t, hook):
        raise RuntimeError(f"bad hook at {hook.name}")

    with pytest.raises(RuntimeError, match="blocks.1.attn.hook_pattern"):
        gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_pattern", boom)])
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())
    with torch.no_grad():
        assert (gm(ids) - ref(ids).logits).abs().max().item() < 1e-5


def _hf_forward_hooks(model):
    return sum(len(m._forward_hooks) for m in model.modules())


def test_verify_passes_on_an_exact_trace(core_trio):
    from fxbridge.verify import verify
    model, _, gm = core_trio
    diffs = verify(gm)
    assert set(diffs) == {f"blocks.{i}.hook_resid_post" for i in range(gm.dims["n_layers"])} | {"logits"}
    assert max(diffs.values()) < 1e-4
    assert _hf_forward_hooks(model) == 0  # the HF forward hooks were temporary


def test_verify_names_the_first_diverging_layer():
    from tiny import build
    from fxbridge.verify import verify
    model = build("llama")
    gm = bridge.trace(model, verify=True)  # exact: passes
    gm.add_hook("blocks.1.hook_resid_mid", lambda t, hook: t + 0.5, is_permanent=True)
    try:
        with pytest.raises(bridge.VerificationError) as info:
            verify(gm)
    finally:
        gm.reset_hooks(including_permanent=True)
    err = info.value
    assert isinstance(err, bridge.FxBridgeError)
    assert err.where.startswith("blocks.1.hook_resid_post") and "model.layers.1" in err.where
    assert err.max_diff > err.tolerance
    assert "blocks.0.hook_resid_post 0.0e+00" in str(err)  # the layer before agrees, and says so
    assert _hf_forward_hooks(model) == 0
    with pytest.raises(ValueError, match="meta"):
        with torch.device("meta"):
            meta_model = tf.LlamaForCausalLM(model.config)
        verify(bridge.trace(meta_model))
