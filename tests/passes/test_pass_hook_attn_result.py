"""hook_attn_result on toy graphs: the output projection computed per head, ``hook_result`` [B,S,H,D] on it."""
import functools

import torch
from transformers.pytorch_utils import Conv1D

from fxbridge.passes import NoMatch
from toy import (missed, DH, LLAMA_SPEC, TOL, H, capture_toy, captured, delta, eager, hook_nodes, max_diff, module_io,
                 no_match, op_counts, run, run_pass, tokens, toy_dims, toy_lm, toy_spec, watch)

RESULTS = ["blocks.0.attn.hook_result", "blocks.1.attn.hook_result"]


@functools.cache
def _conv1d_toy():
    """The GPT-2 family's output projection: transformers' Conv1D, weight [H*dh, D] (transposed vs nn.Linear)."""
    lm = toy_lm(2)
    torch.manual_seed(1)
    for layer in lm.model.layers:
        layer.self_attn.o_proj = Conv1D(32, H * DH)
        torch.nn.init.normal_(layer.self_attn.o_proj.bias, std=0.1)
    return capture_toy(lm.eval())


def _per_head_by_hand(z_flat, weight, conv1d):
    """[B,S,H*dh] -> [B,S,H,D]: head h's z_h @ W_O[h] (no bias)."""
    w = weight if conv1d else weight.T  # [H*dh, D]
    return torch.stack([z_flat[..., h * DH:(h + 1) * DH] @ w[h * DH:(h + 1) * DH] for h in range(H)], dim=-2)


def _check_values(toy, root, graph, conv1d):
    seen = watch(root, RESULTS)
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) < TOL
    paths = [f"model.layers.{i}.self_attn.o_proj" for i in range(2)]
    io = module_io(toy.model, ids, paths)
    for name, path in zip(RESULTS, paths):
        z, out = io[path]
        module = toy.model.get_submodule(path)
        assert seen[name].shape == (2, 5, H, 32)
        assert max_diff(seen[name], _per_head_by_hand(z, module.weight.detach(), conv1d)) < TOL
        assert max_diff(seen[name].sum(-2) + module.bias.detach(), out) < TOL


def test_a_linear_output_projection_is_split_per_head():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_attn_result", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 2
    assert delta(before, op_counts(graph)) == {"aten.linear.default": -2, "per_head_result": 2, "sum_heads": 2}
    assert hook_nodes(graph) == RESULTS
    _check_values(toy, root, graph, conv1d=False)


def test_a_conv1d_output_projection_is_split_per_head():
    toy = _conv1d_toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert before["aten.addmm.default"] == 2
    assert run_pass("hook_attn_result", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 2
    # Conv1D is view(x, [-1, H*dh]) -> addmm(b, x, W) -> view(out, [B, S, D]): all three go
    assert delta(before, op_counts(graph)) == {"aten.addmm.default": -2, "aten.view.default": -4,
                                               "per_head_result": 2, "sum_heads": 2}
    assert hook_nodes(graph) == RESULTS
    _check_values(toy, root, graph, conv1d=True)


def test_removing_one_heads_result_removes_its_contribution():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_attn_result", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))

    def drop_head_2(t, hook):
        t[:, :, 2] = 0
    root.get_submodule("blocks.0.attn.hook_result").add_hook(drop_head_2)
    o_proj = toy.model.model.layers[0].self_attn.o_proj

    def zero_head_2_input(mod, args):
        z = args[0].clone()
        z[..., 2 * DH:3 * DH] = 0
        return (z,)
    ids = tokens()
    handle = o_proj.register_forward_pre_hook(zero_head_2_input)
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    assert max_diff(run(root, graph, ids), want) < TOL


def test_a_spec_naming_another_output_projection_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("hook_attn_result", graph, root, toy_spec(o_proj="dense"), toy_dims(toy.model.config))
    assert missed(err, 2, 0) and isinstance(err.__cause__, NoMatch)
    assert hook_nodes(graph) == [] and op_counts(graph) == before
