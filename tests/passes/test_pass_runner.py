"""The pass runner: order checked before anything runs, missing patterns named, bugs kept as bugs; specs list
configured passes (a bad name or parameter fails when the spec is built)."""
import pytest
import torch
from torch import fx

from fxbridge.architectures import REGISTRY, ArchSpec, dims_from_config
from fxbridge.errors import PassOrderError, PatternNotFound
from fxbridge.passes import (PassContext, alias_shared_kv, hook_attention, hook_attn_result, hook_final_softcap,
                             hook_moe, hook_unembed, remove_eval_dropout, run_passes)
from fxbridge.passes.base import graph_pass
from fxbridge.passes.graph_utils import add_hook_point
from conftest import arch_params
from tiny import CONFIGS

aten = torch.ops.aten
SPEC = ArchSpec(model_types=("toy",), family="toy")


def _ctx(module: str = "lm_head") -> PassContext:
    """x -> mul (computed in HF module ``module``) -> output."""
    graph = fx.Graph()
    x = graph.placeholder("x")
    y = graph.call_function(aten.mul.Tensor, (x, 2.0))
    y.meta["nn_module_stack"] = {"L__m": (module, torch.nn.Linear)}
    graph.output(y)
    return PassContext(graph, torch.nn.Module(), SPEC, {"n_layers": 1}, None)


def test_a_missing_pattern_names_the_pass_the_module_and_what_was_expected_and_found():
    with pytest.raises(PatternNotFound) as info:
        run_passes(_ctx(module="model.norm"), [hook_unembed])
    err = info.value
    assert (err.pass_name, err.where) == ("hook_unembed", "lm_head")
    assert str(err).startswith("pass 'hook_unembed' in lm_head: expected the unembedding's output (the logits), "
                               "found no node computed in that module (passes run before it: none)")
    assert "probably changed" not in str(err) and "report" not in str(err)


def test_the_same_pass_matches_where_the_module_is():
    ctx = _ctx()
    assert [(r.name, r.matches) for r in run_passes(ctx, [hook_unembed])] == [("hook_unembed", 1)]
    assert [n.target for n in ctx.graph.nodes if n.op == "call_module"] == ["hook_unembed"]


@pytest.mark.parametrize("error", [TypeError("bad argument"), KeyError("n_heads")])
def test_a_bug_inside_a_pass_propagates_with_its_own_type_and_a_note(error):
    @graph_pass(expects=lambda spec, dims: 1)
    def buggy(ctx):
        raise error

    with pytest.raises(type(error)) as info:
        run_passes(_ctx(), [hook_unembed, buggy])
    assert not isinstance(info.value, PatternNotFound)  # KeyError is a LookupError, but not a missing pattern
    assert "raised in fxbridge pass 'buggy' (passes run before it: hook_unembed)" in info.value.__notes__


def test_a_hook_point_records_the_running_pass_and_takes_its_shape_from_the_hook_table():
    ctx = _ctx()
    run_passes(ctx, [hook_unembed])
    point = ctx.root.get_submodule("hook_unembed")
    assert (point.made_by, point.shape) == ("hook_unembed", ("B", "S", "V"))
    assert [n.meta["fxbridge_pass"] for n in ctx.graph.nodes if n.op == "call_module"] == ["hook_unembed"]
    assert ctx.current_pass == ""  # only while a pass runs


def test_a_hook_name_the_table_lacks_needs_its_shape_and_a_table_name_keeps_the_table_shape():
    root = torch.nn.Module()
    with pytest.raises(ValueError, match="'blocks.0.attn.hook_made_up' is not in the hook table .* shape="):
        add_hook_point(root, "blocks.0.attn.hook_made_up", "toy", "")
    assert add_hook_point(root, "blocks.0.attn.hook_made_up", "toy", "", shape=("B", "S")).shape == ("B", "S")
    with pytest.raises(ValueError, match=r"'hook_embed' has shape \('B', 'S', 'D'\) in the hook table"):
        add_hook_point(root, "hook_embed", "toy", "", shape=("B", "D"))
    assert add_hook_point(root, "hook_embed", "toy", "").shape == ("B", "S", "D")


def test_a_wrong_match_count_is_pattern_not_found():
    @graph_pass(expects=lambda spec, dims: 2 * dims["n_layers"])
    def half(ctx):
        return 1

    with pytest.raises(PatternNotFound, match="pass 'half' in the graph of toy: expected 2 match"):
        run_passes(_ctx(), [half])


def test_the_order_is_checked_before_any_pass_runs():
    ran = []

    @graph_pass(expects=lambda spec, dims: 0)
    def spy(ctx):
        ran.append("spy")
        return 0

    for passes, problem in (
            ([spy, hook_final_softcap], "hook_final_softcap requires hook_unembed, which is not in the list"),
            ([spy, hook_final_softcap, hook_unembed],
             "hook_final_softcap requires hook_unembed to run before it, but hook_unembed runs after it"),
            ([spy, hook_attention, alias_shared_kv], "alias_shared_kv must run before hook_attention, but "
                                                     "hook_attention runs first")):
        with pytest.raises(PassOrderError, match=problem):
            run_passes(_ctx(), passes)
    assert ran == []


def test_pass_parameters_are_checked_when_the_spec_is_built():
    with pytest.raises(TypeError, match="'remove_eval_dropout' has no parameter per_layr; its parameters: per_layer"):
        remove_eval_dropout(per_layr=2)
    with pytest.raises(TypeError, match=r"'hook_moe' needs the parameters router, experts"):
        ArchSpec(model_types=("toy",), family="toy", passes=(hook_moe,))
    with pytest.raises(PassOrderError, match="hook_final_softcap requires hook_unembed to run before it"):
        ArchSpec(model_types=("toy",), family="toy", passes=(hook_final_softcap, hook_unembed))
    with pytest.raises(TypeError, match="lists pass objects .from fxbridge.passes import hook_unembed., not str"):
        ArchSpec(model_types=("toy",), family="toy", passes=("hook_unembed",))
    with pytest.raises(TypeError, match="needs the parameters per_layer"):
        remove_eval_dropout.run(_ctx())
    configured = remove_eval_dropout(per_layer=2)
    assert configured.options == {"per_layer": 2} and remove_eval_dropout.options == {}
    assert configured.expected(SPEC, {"n_layers": 3}) == 6


@pytest.mark.parametrize("arch", arch_params())
def test_every_spec_resolves_its_passes_and_dims_without_tracing(arch):
    config = CONFIGS[arch]()
    spec = REGISTRY[config.model_type].for_config(config)
    dims = dims_from_config(config, spec)
    assert spec.pipeline()[-1].name != "hook_attn_result"
    assert spec.pipeline(use_attn_result=True) == (*spec.passes, hook_attn_result)
    assert all(p.expected(spec, dims) >= 0 for p in spec.pipeline(use_attn_result=True))
