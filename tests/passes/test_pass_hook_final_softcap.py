"""hook_final_softcap on toy graphs: ``cap * tanh(logits / cap)`` after hook_unembed gets ``hook_logits``."""
import functools
from types import SimpleNamespace

import pytest
import torch
from torch import fx

from fxbridge.runtime.hook_point import HookPoint
from fxbridge.passes import NoMatch
from toy import (missed, capture_toy, captured, delta, eager, hook_nodes, max_diff, module_io, no_match, op_counts, run,
                 run_pass, tokens, toy_config, toy_dims, toy_lm, toy_spec, watch)

aten = torch.ops.aten
CAP = 0.5  # small enough that the toy's logits are bent
SPEC = toy_spec(final_softcap_config="final_logit_softcapping")


@functools.cache
def _softcapped():
    return capture_toy(toy_lm(1, final_softcap=CAP, config=toy_config(1, final_logit_softcapping=CAP)))


def _unembedded(toy, spec=SPEC):
    root, graph = toy.fresh()
    run_pass("hook_unembed", graph, root, spec, toy_dims(toy.model.config))
    return root, graph


def test_hooks_the_capped_logits_and_keeps_hook_unembed_before_the_cap():
    toy = _softcapped()
    root, graph = _unembedded(toy)
    before = op_counts(graph)
    assert before["aten.tanh.default"] == 1
    assert run_pass("hook_final_softcap", graph, root, SPEC, toy_dims(toy.model.config), toy.model.config) == 1
    assert delta(before, op_counts(graph)) == {}
    assert hook_nodes(graph) == ["hook_unembed", "hook_logits"]
    assert graph.output_node().args[0].target == "hook_logits"
    seen = watch(root, ["hook_unembed", "hook_logits"])
    ids = tokens()
    want = eager(toy.model, ids)
    assert max_diff(run(root, graph, ids), want) == 0.0
    logits = module_io(toy.model, ids, ["lm_head"])["lm_head"][1]
    assert logits.abs().max() > 2 * CAP  # the cap really bends these logits
    assert torch.equal(seen["hook_unembed"], logits)
    assert torch.equal(seen["hook_logits"], want)


def test_editing_hook_unembed_goes_through_the_cap():
    toy = _softcapped()
    root, graph = _unembedded(toy)
    run_pass("hook_final_softcap", graph, root, SPEC, toy_dims(toy.model.config), toy.model.config)
    root.get_submodule("hook_unembed").add_hook(lambda t, hook: t * 0 + 100.0)
    out = run(root, graph, tokens())
    assert torch.allclose(out, torch.full_like(out, CAP * torch.tanh(torch.tensor(100.0 / CAP)).item()))


def _hand_graph(inner, c_in, c_out):
    """x -> hook_unembed -> inner(u, c_in) -> tanh -> mul(., c_out), as a hand-built fx graph."""
    root = torch.nn.Module()
    root.add_module("hook_unembed", HookPoint(name="hook_unembed"))
    graph = fx.Graph()
    u = graph.call_module("hook_unembed", (graph.placeholder("x"),))
    t = graph.call_function(aten.tanh.default, (graph.call_function(inner, (u, c_in)),))
    graph.output(graph.call_function(aten.mul.Tensor, (t, c_out)))
    return root, graph


def test_the_cap_written_as_a_multiplication_by_its_inverse_matches():
    root, graph = _hand_graph(aten.mul.Tensor, 1 / 3.0, 3.0)
    config = SimpleNamespace(final_logit_softcapping=3.0)
    assert run_pass("hook_final_softcap", graph, root, SPEC, {"n_layers": 1}, config) == 1
    x = torch.randn(2, 3, 7) * 10
    assert max_diff(fx.GraphModule(root, graph)(x), 3.0 * torch.tanh(x / 3.0)) < 1e-6


@pytest.mark.parametrize("inner,c_in,c_out", [(aten.div.Tensor, 3.0, 2.0), (aten.add.Tensor, 3.0, 3.0)])
def test_other_expressions_after_hook_unembed_match_nothing(inner, c_in, c_out):
    root, graph = _hand_graph(inner, c_in, c_out)
    config = SimpleNamespace(final_logit_softcapping=3.0)
    err = no_match("hook_final_softcap", graph, root, SPEC, {"n_layers": 1}, config)
    assert missed(err, 1, 0)
    assert hook_nodes(graph) == []


def test_a_graph_without_a_softcap_matches_nothing():
    toy = captured("llama")
    root, graph = _unembedded(toy)
    config = toy_config(2, final_logit_softcapping=CAP)
    err = no_match("hook_final_softcap", graph, root, SPEC, toy_dims(config), config)
    assert missed(err, 1, 0)
    assert hook_nodes(graph) == ["hook_unembed"]


def test_a_cap_unlike_the_config_is_refused():
    toy = _softcapped()
    root, graph = _unembedded(toy)
    config = toy_config(1, final_logit_softcapping=30.0)
    err = no_match("hook_final_softcap", graph, root, SPEC, toy_dims(config), config)
    assert isinstance(err.__cause__, NoMatch) and "final_logit_softcapping=30.0" in str(err)


def test_hook_unembed_must_run_first():
    toy = _softcapped()
    root, graph = toy.fresh()
    err = no_match("hook_final_softcap", graph, root, SPEC, toy_dims(toy.model.config), toy.model.config)
    assert isinstance(err.__cause__, NoMatch) and "hook_unembed pass runs first" in err.expected
