"""hook_mlp on toy graphs: hook_pre (gate or input projection), hook_pre_linear (gated: up), hook_post."""
import torch
import torch.nn.functional as F

from fxbridge.passes import NoMatch
from fxbridge.runtime.names import aliases_for
from toy import (D, FF, GPT2_SPEC, LLAMA_SPEC, capture_toy, captured, delta, eager, hook_nodes, hook_points, max_diff,
                 missed, module_io, no_match, op_counts, run, run_pass, tokens, toy_dims, toy_lm, toy_spec, watch)


def _gated(i):
    return [f"blocks.{i}.mlp.hook_pre", f"blocks.{i}.mlp.hook_pre_linear", f"blocks.{i}.mlp.hook_post"]


def test_gated_mlp_gets_three_hooks_per_layer_with_the_toy_values():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_mlp", graph, root, LLAMA_SPEC, toy_dims(toy.model.config)) == 6
    assert delta(before, op_counts(graph)) == {}
    assert hook_nodes(graph) == _gated(0) + _gated(1)
    aliases = aliases_for(hook_points(root))  # the contract's aliases of the points the pass made
    assert aliases["blocks.1.mlp.gate.hook_out"] == "blocks.1.mlp.hook_pre"
    assert aliases["blocks.1.mlp.in.hook_out"] == "blocks.1.mlp.hook_pre_linear"
    assert aliases["blocks.1.mlp.out.hook_in"] == "blocks.1.mlp.hook_post"
    seen = watch(root, _gated(0) + _gated(1))
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    for i in range(2):
        mlp = f"model.layers.{i}.mlp"
        io = module_io(toy.model, ids, [f"{mlp}.gate_proj", f"{mlp}.up_proj"])
        gate, up = io[f"{mlp}.gate_proj"][1], io[f"{mlp}.up_proj"][1]
        assert torch.equal(seen[f"blocks.{i}.mlp.hook_pre"], gate)
        assert torch.equal(seen[f"blocks.{i}.mlp.hook_pre_linear"], up)
        assert max_diff(seen[f"blocks.{i}.mlp.hook_post"], F.silu(gate) * up) == 0.0


def test_plain_mlp_gets_pre_and_post():
    toy = captured("gpt2")
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_mlp", graph, root, GPT2_SPEC, toy_dims(toy.model.config)) == 4
    assert delta(before, op_counts(graph)) == {}
    names = [f"blocks.{i}.mlp.hook_{h}" for i in range(2) for h in ("pre", "post")]
    assert hook_nodes(graph) == names
    seen = watch(root, names)
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    pre = module_io(toy.model, ids, ["model.layers.1.mlp.c_fc"])["model.layers.1.mlp.c_fc"][1]
    assert torch.equal(seen["blocks.1.mlp.hook_pre"], pre)
    assert max_diff(seen["blocks.1.mlp.hook_post"], F.gelu(pre, approximate="tanh")) == 0.0


def test_editing_hook_post_changes_only_the_down_projection_input():
    toy = captured("llama")
    root, graph = toy.fresh()
    run_pass("hook_mlp", graph, root, LLAMA_SPEC, toy_dims(toy.model.config))
    root.get_submodule("blocks.1.mlp.hook_post").add_hook(lambda t, hook: t * 0)
    ids = tokens()
    handle = toy.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    assert max_diff(run(root, graph, ids), want) == 0.0


def test_a_spec_naming_another_mlp_matches_nothing():
    toy = captured("llama")
    root, graph = toy.fresh()
    before = op_counts(graph)
    err = no_match("hook_mlp", graph, root, toy_spec(mlp="ffn"), toy_dims(toy.model.config))
    assert missed(err, 6, 0)
    assert isinstance(err.__cause__, NoMatch) and err.where.startswith("model.layers.0.ffn")
    assert hook_nodes(graph) == [] and op_counts(graph) == before


class FusedGateUpMLP(torch.nn.Module):
    """Phi-3 / GLM: one gate_up_proj computing [gate | up], chunked in halves (``up_first``: the other order)."""

    def __init__(self, up_first: bool = False):
        super().__init__()
        self.up_first = up_first
        self.gate_up_proj, self.down_proj = torch.nn.Linear(D, 2 * FF), torch.nn.Linear(FF, D)

    def forward(self, x):
        a, b = self.gate_up_proj(x).chunk(2, dim=-1)
        gate, up = (b, a) if self.up_first else (a, b)
        return self.down_proj(F.silu(gate) * up)


FUSED_SPEC = toy_spec(mlp_gate="gate_up_proj", mlp_in="gate_up_proj")


def test_fused_gate_up_hooks_its_halves_and_edits_take_effect():
    toy = capture_toy(toy_lm(2, mlp=FusedGateUpMLP))
    root, graph = toy.fresh()
    before = op_counts(graph)
    assert run_pass("hook_mlp", graph, root, FUSED_SPEC, toy_dims(toy.model.config)) == 6
    assert delta(before, op_counts(graph)) == {}  # the halves are HF's own split (views), nothing recomputed
    assert hook_nodes(graph) == _gated(0) + _gated(1)
    seen = watch(root, _gated(1))
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0
    mlp = "model.layers.1.mlp"
    fused = module_io(toy.model, ids, [f"{mlp}.gate_up_proj"])[f"{mlp}.gate_up_proj"][1]
    assert torch.equal(seen["blocks.1.mlp.hook_pre"], fused[..., :FF])
    assert torch.equal(seen["blocks.1.mlp.hook_pre_linear"], fused[..., FF:])
    root.get_submodule("blocks.1.mlp.hook_pre").add_hook(lambda t, hook: t * 0)  # silu(0) = 0: no MLP output
    handle = toy.model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda mod, args: (args[0] * 0,))
    try:
        want = eager(toy.model, ids)
    finally:
        handle.remove()
    assert max_diff(run(root, graph, ids), want) == 0.0


def test_fused_up_gate_order_is_an_error_naming_the_layout():
    toy = capture_toy(toy_lm(1, mlp=lambda: FusedGateUpMLP(up_first=True)))
    root, graph = toy.fresh()
    err = no_match("hook_mlp", graph, root, FUSED_SPEC, toy_dims(toy.model.config))
    assert "[gate | up]" in str(err) and err.where == "model.layers.0.mlp.gate_up_proj"
