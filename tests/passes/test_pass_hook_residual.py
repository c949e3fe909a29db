"""hook_residual on toy graphs: resid_pre, attn_out, resid_mid, mlp_out, resid_post; parallel and sandwich blocks."""
import functools

import torch

from fxbridge.passes import NoMatch
from fxbridge.runtime.names import aliases_for
from toy import (missed, LLAMA_SPEC, DecoderLayer, RMSNorm, capture_toy, captured, delta, eager, hook_nodes, max_diff,
                 module_io, no_match, op_counts, run, run_pass, tokens, toy_dims, toy_lm, toy_spec, watch, hook_points)

SEQUENTIAL = ["hook_resid_pre", "hook_attn_out", "hook_resid_mid", "hook_mlp_out", "hook_resid_post"]
PARALLEL_SPEC = toy_spec(parallel=True, ln2=None)
SANDWICH_SPEC = toy_spec(ln1_post="post_attention_layernorm", ln2="pre_feedforward_layernorm",
                         ln2_post="post_feedforward_layernorm")


class SandwichLayer(DecoderLayer):
    """Gemma 2's block: the attention and MLP outputs are normed again before they join the residual."""

    def __init__(self, config, i, **kw):
        super().__init__(config, i, **kw)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = RMSNorm(), RMSNorm()

    def forward(self, x, mask, state):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, state))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


@functools.cache
def _toy(kind):
    if kind == "parallel":
        return capture_toy(toy_lm(2, parallel=True))
    return capture_toy(toy_lm(2, layer=SandwichLayer))


def _names(hooks, layers=2):
    return [f"blocks.{i}.{h}" for i in range(layers) for h in hooks]


def _oracle(model, ids, attn_out, mlp_out):
    """Per layer (input, attention output, MLP output, layer output) from the toy's own modules."""
    paths = [p for i in range(2) for p in (f"model.layers.{i}", f"model.layers.{i}.{attn_out}",
                                           f"model.layers.{i}.{mlp_out}")]
    io = module_io(model, ids, paths)
    return [(io[f"model.layers.{i}"][0], io[f"model.layers.{i}.{attn_out}"][1], io[f"model.layers.{i}.{mlp_out}"][1],
             io[f"model.layers.{i}"][1]) for i in range(2)]


def test_sequential_blocks_get_five_hooks_a_layer_with_the_toy_values():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_residual", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 10
    assert delta(before, op_counts(graph)) == {}
    assert hook_nodes(graph) == _names(SEQUENTIAL)
    aliases = aliases_for(hook_points(root))  # the contract's aliases of the points the pass made
    assert aliases["blocks.1.hook_in"] == "blocks.1.hook_resid_pre"
    assert aliases["blocks.1.hook_out"] == "blocks.1.hook_resid_post"
    assert aliases["blocks.0.attn.hook_out"] == "blocks.0.hook_attn_out"
    assert aliases["blocks.0.mlp.hook_out"] == "blocks.0.hook_mlp_out"
    seen = watch(root, _names(SEQUENTIAL))
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    for i, (x, attn, mlp, out) in enumerate(_oracle(toy.model, ids, "self_attn", "mlp")):
        assert torch.equal(seen[f"blocks.{i}.hook_resid_pre"], x)
        assert torch.equal(seen[f"blocks.{i}.hook_attn_out"], attn)
        assert torch.equal(seen[f"blocks.{i}.hook_resid_mid"], x + attn)
        assert torch.equal(seen[f"blocks.{i}.hook_mlp_out"], mlp)
        assert torch.equal(seen[f"blocks.{i}.hook_resid_post"], out)


def test_editing_resid_pre_changes_only_what_the_layer_reads():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_residual", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    root.get_submodule("blocks.1.hook_resid_pre").add_hook(lambda t, hook: t * 2)
    ids = tokens()
    handle = toy.model.model.layers[1].register_forward_pre_hook(lambda mod, args: (args[0] * 2, *args[1:]))
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    assert max_diff(run(root, graph, ids), want) == 0.0


def test_parallel_blocks_have_no_resid_mid():
    toy = _toy("parallel")
    root, graph = toy.fresh()
    hooks = ["hook_resid_pre", "hook_attn_out", "hook_mlp_out", "hook_resid_post"]
    assert run_pass("hook_residual", graph, root, PARALLEL_SPEC, toy_dims(toy.model.config)) == 8
    assert hook_nodes(graph) == _names(hooks)
    seen = watch(root, _names(hooks))
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    for i, (x, attn, mlp, out) in enumerate(_oracle(toy.model, ids, "self_attn", "mlp")):
        assert torch.equal(seen[f"blocks.{i}.hook_resid_pre"], x)
        assert torch.equal(seen[f"blocks.{i}.hook_attn_out"], attn)
        assert torch.equal(seen[f"blocks.{i}.hook_mlp_out"], mlp)
        assert torch.equal(seen[f"blocks.{i}.hook_resid_post"], out)


def test_sandwich_blocks_hook_the_post_norm_outputs():
    toy = _toy("sandwich")
    root, graph = toy.fresh()
    assert run_pass("hook_residual", graph, root, SANDWICH_SPEC, toy_dims(toy.model.config)) == 10
    assert hook_nodes(graph) == _names(SEQUENTIAL)
    seen = watch(root, _names(SEQUENTIAL))
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    oracle = _oracle(toy.model, ids, "post_attention_layernorm", "post_feedforward_layernorm")
    for i, (x, attn, mlp, out) in enumerate(oracle):
        assert torch.equal(seen[f"blocks.{i}.hook_attn_out"], attn)
        assert torch.equal(seen[f"blocks.{i}.hook_resid_mid"], x + attn)
        assert torch.equal(seen[f"blocks.{i}.hook_mlp_out"], mlp)
        assert torch.equal(seen[f"blocks.{i}.hook_resid_post"], out)


def test_a_spec_naming_another_input_norm_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("hook_residual", graph, root, toy_spec(ln1="ln_attn"), toy_dims(toy.model.config))
    assert missed(err, 10, 0)
    assert isinstance(err.__cause__, NoMatch) and err.where.startswith("model.layers.0") and "residual stream" in err.expected
    assert hook_nodes(graph) == [] and op_counts(graph) == before
