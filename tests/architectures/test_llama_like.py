"""Llama-like families (architectures/llama.py): where each family's own convention puts its hooks.

Oracles: the HF modules' own outputs (forward hooks on the eager reference) and hand computations.
"""
import pytest
import torch

from conftest import arch_params, traced
from tiny import forward_hooks, tokens

TOL = 1e-5


def _hf_outputs(ref, ids, *modules) -> list[list]:
    """Every output of each HF module during ``ref(ids)`` (a module HF calls twice has two)."""
    outputs = [[] for _ in modules]
    hooks = [(m, lambda mod, args, out, seen=seen: seen.append(out)) for m, seen in zip(modules, outputs)]
    with forward_hooks(*hooks), torch.no_grad():
        ref(ids)
    return outputs


def _heads_first(x):  # HF's [B, H, S, dh] -> the hook layout [B, S, H, dh]
    return x.transpose(1, 2)


@pytest.mark.parametrize("arch", arch_params(["smollm3"]))
def test_nope_layers_have_no_rotary_and_rope_layers_rotate(arch):
    _, _, gm = traced(arch)
    nope = [i for i, use in enumerate(gm.hf.config.no_rope_layers) if not use]
    assert nope == [1]
    assert "blocks.1.attn.hook_rot_q" not in gm.hook_dict and "blocks.0.attn.hook_rot_q" in gm.hook_dict
    _, cache = gm.run_with_cache(tokens(1, 6))
    # the rope layer's queries really are rotated (position 0 is the identity rotation, later ones are not)
    q, rot = cache["blocks.0.attn.hook_q"], cache["blocks.0.attn.hook_rot_q"]
    torch.testing.assert_close(rot[:, 0], q[:, 0])
    assert (rot[:, 1:] - q[:, 1:]).abs().max() > 1e-3


@pytest.mark.parametrize("arch", arch_params(["hunyuan_v1_dense"]))
def test_rot_hooks_are_after_the_post_rope_qk_norms(arch):
    _, ref, gm = traced(arch)
    attn = ref.model.layers[1].self_attn
    ids = tokens(2, 5)
    q_out, k_out = _hf_outputs(ref, ids, attn.query_layernorm, attn.key_layernorm)
    _, cache = gm.run_with_cache(ids)
    assert (cache["blocks.1.attn.hook_rot_q"] - _heads_first(q_out[0])).abs().max() < TOL
    assert (cache["blocks.1.attn.hook_rot_k"] - _heads_first(k_out[0])).abs().max() < TOL
    # and hook_q is before them: the norm changes it
    assert (cache["blocks.1.attn.hook_q"] - _heads_first(q_out[0])).abs().max() > 1e-3


def _eps(norm) -> float:
    return getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", None) or 1e-5  # OLMo's: a literal 1e-5


@pytest.mark.parametrize("arch,one_plus", [("nemotron", True), ("olmo", False), ("jais2", False)])
def test_layer_norm_hooks_are_before_the_affine_part(arch, one_plus):
    _, ref, gm = traced(arch)
    norm = ref.model.layers[0].input_layernorm
    ids = tokens(2, 5)
    out, = _hf_outputs(ref, ids, norm)
    _, cache = gm.run_with_cache(ids)
    normalized = cache["blocks.0.ln1.hook_normalized"]
    x = cache["blocks.0.hook_resid_pre"]
    centred = x - x.mean(-1, keepdim=True)
    torch.testing.assert_close(cache["blocks.0.ln1.hook_scale"], (centred.pow(2).mean(-1, keepdim=True)
                                                                 + _eps(norm)).sqrt(), atol=TOL, rtol=0)
    weight = getattr(norm, "weight", None)
    expected = normalized if weight is None else normalized * ((1 + weight) if one_plus else weight)
    if getattr(norm, "bias", None) is not None:
        expected = expected + norm.bias
    assert (expected - out[0]).abs().max() < TOL


@pytest.mark.parametrize("arch", ["jais2", "arcee", "nanochat", "nemotron"])
def test_non_gated_relu2_mlp_hooks(arch):
    _, _, gm = traced(arch)
    _, cache = gm.run_with_cache(tokens(2, 5))
    pre, post = cache["blocks.1.mlp.hook_pre"], cache["blocks.1.mlp.hook_post"]
    assert "blocks.1.mlp.hook_pre_linear" not in gm.hook_dict
    assert (post - torch.relu(pre) ** 2).abs().max() < TOL


def test_final_norm_called_twice_hooks_its_last_call():
    """nanochat runs model.norm on the embeddings and again before lm_head: ln_final is the second call."""
    _, ref, gm = traced("nanochat")
    ids = tokens(2, 5)
    out, = _hf_outputs(ref, ids, ref.model.norm)
    assert len(out) == 2
    _, cache = gm.run_with_cache(ids)
    assert (cache["ln_final.hook_normalized"] - out[1]).abs().max() < TOL
    assert (cache["blocks.0.hook_resid_pre"] - out[0]).abs().max() < TOL


@pytest.mark.parametrize("arch", arch_params(["exaone", "internlm3"]))
def test_llama_classes_under_other_model_types_use_the_llama_spec(arch):
    model, _, gm = traced(arch)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == arch
    assert gm.spec.family == "Llama"
