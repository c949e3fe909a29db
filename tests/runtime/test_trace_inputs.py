"""What trace() accepts and refuses: one-line errors naming what was passed, hooks never baked in, modes restored.

Regression tests for the reliability probe's defects 2 (module hooks baked into the graph), 8 (misleading errors),
9 (meta module silently running on real ids) and 12 (the caller's train/eval mode).
"""
import pytest
import torch
import transformers as tf

import fxbridge as bridge
from tiny import CONFIGS, build, build_from_config, tokens


def _one_line(exc: BaseException) -> str:
    msg = str(exc)
    assert "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("thing, named", [(torch.nn.Linear(4, 4), "Linear"), (None, "NoneType"), (3, "int")])
def test_non_models_are_named(thing, named):
    with pytest.raises(bridge.UnsupportedModel) as err:
        bridge.trace(thing)
    assert named in _one_line(err.value)


def test_a_hub_id_string_points_to_loading():
    with pytest.raises(bridge.UnsupportedModel) as err:
        bridge.trace("some-org/some-model")  # only the message is checked: nothing is loaded
    msg = _one_line(err.value)
    assert "AutoModelForCausalLM" in msg and "'some-org/some-model'" in msg and "fxbridge inspect" in msg


def test_an_already_traced_module_is_refused():
    gm = bridge.trace(build("llama"))
    with pytest.raises(bridge.UsageError) as err:
        bridge.trace(gm)
    assert "already traced" in _one_line(err.value) and "gm.hf" in str(err.value)


@pytest.mark.parametrize("base, head", [(tf.LlamaModel, "LlamaForCausalLM"), (tf.GPT2Model, "GPT2LMHeadModel"),
                                        (tf.LlamaForSequenceClassification, "LlamaForCausalLM")])
def test_a_model_without_lm_head_names_the_causal_lm_class(base, head):
    config = CONFIGS["llama" if "Llama" in base.__name__ else "gpt2"]()
    if base is tf.LlamaForSequenceClassification:
        config.pad_token_id = 0
    with pytest.raises(bridge.UnsupportedModel) as err:
        bridge.trace(base(config))
    msg = _one_line(err.value)
    assert base.__name__ in msg and f"pass {head}" in msg and "report" not in msg


def test_a_wrapper_with_a_config_says_to_pass_the_inner_model():
    class Wrapper(torch.nn.Module):  # what PEFT's PeftModel looks like from outside
        def __init__(self, inner):
            super().__init__()
            self.base_model, self.config = inner, inner.config

        def forward(self, input_ids, attention_mask=None, **kw):
            return self.base_model(input_ids, attention_mask=attention_mask, **kw)

    with pytest.raises(bridge.UnsupportedModel) as err:
        bridge.trace(Wrapper(build("llama")))
    msg = _one_line(err.value)
    assert "Wrapper" in msg and "'llama'" in msg and "merge_and_unload" in msg


def test_an_instance_patched_forward_is_refused_in_one_line():
    model = build("llama")
    original = model.forward
    model.forward = lambda *a, **k: original(*a, **k)
    with pytest.raises(bridge.UnsupportedModel) as err:
        bridge.trace(model)
    assert "forward(*a, **k)" in _one_line(err.value) and "del model.forward" in str(err.value)


@pytest.mark.parametrize("kind", ["forward", "forward_pre", "full_backward"])
def test_torch_module_hooks_at_trace_time_are_refused(kind):
    model = build("llama")
    steer = torch.randn(64)

    def add_steering(module, args, output):
        return (output[0] + steer,) + tuple(output[1:]) if isinstance(output, tuple) else output + steer

    register = {"forward": lambda m: m.register_forward_hook(add_steering),
                "forward_pre": lambda m: m.register_forward_pre_hook(lambda mod, args: None),
                "full_backward": lambda m: m.register_full_backward_hook(lambda mod, gi, go: None)}[kind]
    handle = register(model.model.layers[1])
    with pytest.raises(bridge.UsageError) as err:
        bridge.trace(model)
    msg = _one_line(err.value)
    assert "model.model.layers.1" in msg and "LlamaDecoderLayer" in msg
    if kind == "forward":
        assert "add_steering" in msg
    handle.remove()
    gm = bridge.trace(model)  # once removed, the trace is of the clean model
    with torch.no_grad():
        torch.testing.assert_close(gm(tokens(2, 7)), model(tokens(2, 7)).logits, rtol=0, atol=1e-5)


def test_a_global_module_hook_is_refused():
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, a, o: None)
    try:
        with pytest.raises(bridge.UsageError, match="global torch module forward hook"):
            bridge.trace(build("llama"))
    finally:
        handle.remove()


def test_trace_restores_the_callers_train_and_eval_modes():
    model = build("gpt2")
    model.train()
    model.transformer.h[1].eval()  # a mixed state, as after freezing a part
    before = {name: m.training for name, m in model.named_modules()}
    gm = bridge.trace(model)
    assert {name: m.training for name, m in model.named_modules()} == before
    assert gm.training is False
    model.eval()
    ids = tokens(2, 7)
    with torch.no_grad():  # the capture is of inference: no dropout, equal to the eval-mode model
        torch.testing.assert_close(gm(ids), model(ids).logits, rtol=0, atol=1e-5)


def test_gm_train_warns_that_the_graph_has_no_dropout():
    model = build_from_config(tf.GPT2Config(**dict(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                   resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5)))
    gm = bridge.trace(model)
    with pytest.warns(UserWarning, match="inference capture"):
        gm.train()
    ids = tokens(2, 7)
    with torch.no_grad():
        assert torch.equal(gm(ids), gm(ids))  # honest about it: dropout is not applied
    assert gm.training is False
    gm.eval()  # no warning, and the HF model is back in eval mode
    assert not gm.hf.training


def test_a_meta_traced_module_refuses_real_inputs():
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(CONFIGS["llama"]())
    gm = bridge.trace(model)
    assert gm(tokens(2, 5).to("meta")).device.type == "meta"  # shapes-only runs still work
    with pytest.raises(bridge.UsageError) as err:
        gm(tokens(2, 5))
    assert "meta device" in _one_line(err.value) and "trace it again" in str(err.value)
