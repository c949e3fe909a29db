"""hook_norms on toy graphs: RMSNorm (rsqrt or pow -0.5) and LayerNorm become cores with hook_scale/hook_normalized."""
import functools

import torch
from torch import nn

from fxbridge.runtime.cores import LayerNormCore, RMSNormCore
from toy import (missed, D, GPT2_SPEC, LLAMA_SPEC, TOL, RMSNorm, capture_toy, captured, delta, eager, hook_points,
                 max_diff, module_calls, module_io, no_match, op_counts, run, run_pass, tokens, toy_dims, toy_lm, watch)

SITES = ["blocks.0.ln1", "blocks.0.ln2", "blocks.1.ln1", "blocks.1.ln2", "ln_final"]
PATHS = ["model.layers.0.input_layernorm", "model.layers.0.post_attention_layernorm",
         "model.layers.1.input_layernorm", "model.layers.1.post_attention_layernorm", "model.norm"]


class WeightRsqrt(RMSNorm):
    """x * rsqrt(...) where the rsqrt is not of x's variance: not a norm."""

    def forward(self, x):
        return x * torch.rsqrt(self.weight.pow(2).mean() + self.eps)


@functools.cache
def _one_layer(norm):
    return capture_toy(toy_lm(1, norm=norm))


def test_rms_norms_become_cores_and_keep_the_values():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_norms", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 5
    assert delta(before, op_counts(graph)) == {"aten.mul.Tensor": -5, "aten.rsqrt.default": -5}
    assert module_calls(graph) == SITES
    assert all(isinstance(root.get_submodule(s), RMSNormCore) for s in SITES)
    assert hook_points(root) == [f"{s}.hook_{h}" for s in SITES for h in ("scale", "normalized")]
    ids = tokens()
    want = eager(toy.model, ids)
    assert max_diff(run(root, graph, ids), want) == 0.0  # unhooked: HF's own x * rsqrt(v)
    seen = watch(root, [f"{s}.hook_{h}" for s in SITES for h in ("scale", "normalized")])
    assert max_diff(run(root, graph, ids), want) < TOL  # hooked: x / sqrt(v)
    io = module_io(toy.model, ids, PATHS)
    for site, path in zip(SITES, PATHS):
        x = io[path][0]
        scale = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
        assert seen[f"{site}.hook_scale"].shape == (2, 5, 1)
        assert max_diff(seen[f"{site}.hook_scale"], scale) < TOL, site
        assert max_diff(seen[f"{site}.hook_normalized"], x / scale) < TOL, site


def test_editing_hook_normalized_takes_effect_before_the_weight():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_norms", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    root.get_submodule("ln_final.hook_normalized").add_hook(lambda t, hook: t * 0.5)
    ids = tokens()
    handle = toy.model.model.norm.register_forward_hook(lambda mod, args, out: out * 0.5)  # w * (0.5 n) = 0.5 (w n)
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    assert max_diff(run(root, graph, ids), want) < TOL


def test_the_pow_form_of_gemma_4_is_an_rms_norm_too():
    toy = _one_layer(functools.partial(RMSNorm, pow_form=True))
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert before["aten.rsqrt.default"] == 0
    assert run_pass("hook_norms", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 3
    assert delta(before, op_counts(graph)) == {"aten.mul.Tensor": -3, "aten.pow.Tensor_Scalar": -3}
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0


def test_layer_norms_become_cores_and_the_hooks_see_centred_values():
    toy = captured("gpt2")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_norms", graph, root, GPT2_SPEC, toy_dims(toy.model.config)) == 5
    assert delta(before, op_counts(graph)) == {"aten.layer_norm.default": -5}
    assert module_calls(graph) == SITES
    assert all(isinstance(root.get_submodule(s), LayerNormCore) for s in SITES)
    ids = tokens()
    want = eager(toy.model, ids)
    assert max_diff(run(root, graph, ids), want) == 0.0
    seen = watch(root, ["blocks.1.ln2.hook_scale", "blocks.1.ln2.hook_normalized"])
    assert max_diff(run(root, graph, ids), want) < TOL
    x = module_io(toy.model, ids, [PATHS[3]])[PATHS[3]][0]
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert max_diff(seen["blocks.1.ln2.hook_scale"], scale) < TOL
    assert max_diff(seen["blocks.1.ln2.hook_normalized"], centred / scale) < TOL


def test_a_norm_whose_rsqrt_is_not_of_the_variance_of_x_matches_nothing():
    toy = _one_layer(WeightRsqrt)
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("hook_norms", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    assert missed(err, 3, 0)
    assert module_calls(graph) == [] and op_counts(graph) == before


class HandLayerNorm(nn.Module):
    """Cohere's LayerNorm as HF writes it: mean, variance of x - mean, (x - mean) * rsqrt(var + eps), weight."""

    def __init__(self, d: int = D, eps: float = 1e-5, centred_var: bool = True):
        super().__init__()
        self.weight, self.eps, self.centred_var = nn.Parameter(torch.ones(d)), eps, centred_var

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) if self.centred_var else x).pow(2).mean(-1, keepdim=True)
        return self.weight * ((x - mean) * torch.rsqrt(var + self.eps))


def test_a_hand_written_layer_norm_becomes_a_core_with_layer_norm_hooks():
    toy = _one_layer(HandLayerNorm)
    root, graph = toy.fresh()
    assert run_pass("hook_norms", graph, root, GPT2_SPEC, toy_dims(toy.model.config)) == 3
    assert module_calls(graph) == ["blocks.0.ln1", "blocks.0.ln2", "ln_final"]
    ids = tokens()
    want = eager(toy.model, ids)
    assert max_diff(run(root, graph, ids), want) == 0.0  # unhooked: HF's own expression
    seen = watch(root, ["blocks.0.ln2.hook_scale", "blocks.0.ln2.hook_normalized"])
    assert max_diff(run(root, graph, ids), want) < TOL
    x = module_io(toy.model, ids, ["model.layers.0.post_attention_layernorm"])[
        "model.layers.0.post_attention_layernorm"][0]
    centred = x - x.mean(-1, keepdim=True)
    scale = torch.sqrt(centred.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert max_diff(seen["blocks.0.ln2.hook_scale"], scale) < TOL
    assert max_diff(seen["blocks.0.ln2.hook_normalized"], centred / scale) < TOL


def test_a_hand_written_norm_whose_variance_is_not_of_the_centred_x_is_no_layer_norm():
    toy = _one_layer(functools.partial(HandLayerNorm, centred_var=False))
    root, graph = toy.fresh()
    err = no_match("hook_norms", graph, root, GPT2_SPEC, toy_dims(toy.model.config))
    assert missed(err, 3, 0)
