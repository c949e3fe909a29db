"""``gm.compile()`` (nn.Module's in-place ``torch.compile``): exact with and without hooks, hooks attached, changed and
removed between calls, ``run_with_cache``, backward hooks, hooks dynamo cannot trace, a raising hook, meta modules.

Oracles: HF eager, with the same edits made by torch forward hooks on its decoder layers, its hidden states, and its
gradients. Llama runs the default backend (inductor) in ``make test`` and GPT-2 ``aot_eager`` (dynamo's capture and
AOT autograd, what the hook promise rests on; inductor's code generation is torch's); every other family runs
``aot_eager`` with ``-m slow`` (an inductor compile of a tiny model costs 20-60 s on a 2-core machine).
"""
import copy

import pytest
import torch
from conftest import arch_params, arch_params_fast, traced
from tiny import CONFIGS, build, forward_hooks, tokens

import fxbridge as bridge
from fxbridge.errors import UsageError

BACKENDS = {"llama": "inductor", "gpt2": "aot_eager"}


def _params():
    return arch_params_fast(BACKENDS)


def _layers(model):
    for path in ("model.layers", "transformer.h", "transformer.layers", "transformer.blocks", "model.decoder.layers",
                 "gpt_neox.layers"):
        try:
            return model.get_submodule(path)
        except AttributeError:
            continue
    raise AssertionError(f"no decoder layers found in {type(model).__name__}")


def _scale(factor):
    def hf_hook(module, args, out):
        if isinstance(out, (tuple, list)):  # a tuple, or a list (openai-gpt's Block)
            return type(out)([out[0] * factor, *out[1:]])
        return out * factor

    def hook(resid, hook):
        return resid * factor
    return hf_hook, hook


_COMPILED: dict = {}


def _compiled(arch):
    """(HF eager reference, a compiled copy of the traced module), one per architecture (its compiled graphs are
    reused by the tests, as a user's would be)."""
    if arch not in _COMPILED:
        _, ref, gm = traced(arch)
        gm = copy.deepcopy(gm)  # compile() changes the module in place: leave the shared one eager
        gm.compile(backend=BACKENDS.get(arch, "aot_eager"))
        _COMPILED[arch] = ref, gm
    ref, gm = _COMPILED[arch]
    gm.reset_hooks(including_permanent=True)
    return ref, gm


@pytest.mark.parametrize("arch", _params())
def test_compiled_module_is_exact_as_hooks_are_attached_changed_and_removed(arch):
    ref, gm = _compiled(arch)
    ids = tokens(2, 7)
    layer = 1 if gm.cfg.n_layers > 2 else 0
    name = f"blocks.{layer}.hook_resid_post"
    with torch.no_grad():
        plain = ref(ids).logits
        assert (gm(ids) - plain).abs().max() < 1e-5
        for factor in (0.5, 2.0):  # a changed hook takes effect (not the first compile's constant)
            hf_hook, hook = _scale(factor)
            with forward_hooks((_layers(ref)[layer], hf_hook)):
                expected = ref(ids).logits
            with gm.hooks([(name, hook)]):
                assert (gm(ids) - expected).abs().max() < 1e-5
            assert (expected - plain).abs().max() > 1e-3
        assert (gm(ids) - plain).abs().max() < 1e-5  # removed
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_resid_post"))
        hidden = ref(ids, output_hidden_states=True).hidden_states
    for i in range(gm.cfg.n_layers - 1):  # HF's last hidden state is after the final norm
        assert (cache[f"blocks.{i}.hook_resid_post"] - hidden[i + 1]).abs().max() < 1e-5


@pytest.mark.parametrize("arch", _params())
def test_compiled_backward_hooks_see_hfs_gradients(arch):
    ref, gm = _compiled(arch)
    ids = tokens(2, 7)
    recorded = {}

    def keep(module, args, out):
        out = out[0] if isinstance(out, (tuple, list)) else out
        out.retain_grad()
        recorded["out"] = out
    with forward_hooks((_layers(ref)[0], keep)):
        ref(ids, labels=ids).loss.backward()
    expected = recorded["out"].grad
    ref.zero_grad(set_to_none=True)
    grads = {}

    def save(grad, hook):
        grads[hook.name] = grad.detach()
    loss = gm.run_with_hooks(ids, return_type="loss", bwd_hooks=[("blocks.0.hook_resid_post", save)])
    loss.backward()
    gm.hf.zero_grad(set_to_none=True)
    assert (grads["blocks.0.hook_resid_post"] - expected).abs().max() < 1e-5


@pytest.mark.parametrize("arch", arch_params(list(BACKENDS)))
def test_hooks_dynamo_cannot_trace_stay_exact(arch, capsys):
    """A print and data-dependent Python in a hook: a graph break, not a wrong value."""
    ref, gm = _compiled(arch)
    ids = tokens(2, 7)

    def data_dependent(resid, hook):
        print("norm", float(resid.norm()))
        if resid.abs().max().item() > 1e-3:  # Python branching on a tensor's value
            return resid * 0.5
        return resid
    hf_hook, _ = _scale(0.5)
    with torch.no_grad():
        with forward_hooks((_layers(ref)[0], hf_hook)):
            expected = ref(ids).logits
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", data_dependent)])
    assert (got - expected).abs().max() < 1e-5
    assert "norm" in capsys.readouterr().out


@pytest.mark.parametrize("arch", arch_params(list(BACKENDS)))
def test_a_hook_raising_under_compile_leaves_the_module_usable_and_exact(arch):
    ref, gm = _compiled(arch)
    ids = tokens(2, 7)

    def boom(resid, hook):
        raise RuntimeError("boom")
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="boom"):
            gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.hook_resid_post", boom)])
        assert not any(hp.has_hooks for hp in gm.hook_dict.values())
        assert (gm(ids) - ref(ids).logits).abs().max() < 1e-5


def test_a_meta_traced_module_refuses_compile():
    import transformers as tf
    with torch.device("meta"):
        meta_model = tf.LlamaForCausalLM(build("llama").config)
    with pytest.raises(UsageError, match="meta device"):
        bridge.trace(meta_model).compile()


assert set(BACKENDS) <= set(CONFIGS)
