"""gpt_oss attention sinks (architectures/sinks.py): each hook checked against what HF's own modules compute (forward
hooks on the eager reference, HF's sinks parameter, HF's own eager attention function) or a hand computation.

The generic parity / hook / intervention tests run on this tiny config too (tests/tiny_sinks.py); this file checks
where the sink-specific hooks sit and that their edits act as the same edit made in HF.
"""
import copy

import pytest
import torch
from transformers.models.gpt_oss import modeling_gpt_oss as hf_gpt_oss

import fxbridge as bridge
from conftest import arch_params, traced
from fxbridge.runtime.attention import eager_attention
from fxbridge.tracer.attention_op import AttentionCall
from tiny import CONFIGS, FEATURE_GUARDS, build_from_config, eager_reference, forward_hooks, left_padded, tokens

TOL = 1e-5
ARCH = arch_params(["gpt_oss"])


@pytest.fixture(params=ARCH)
def oss(request):
    model, ref, gm = traced(request.param)
    gm.reset_hooks(including_permanent=True)
    yield model, ref, gm
    gm.reset_hooks(including_permanent=True)


IDS = tokens(2, 6)
_RECORDED: dict = {}


def _recorded(ref, gm):
    """(HF's router / experts / MLP values per layer, HF's logits, gm's full cache) for IDS, computed once."""
    key = (id(ref), id(gm))
    if key not in _RECORDED:
        seen, logits = _hf_moe(ref, IDS, range(len(ref.model.layers)))
        _RECORDED[key] = (seen, logits, gm.run_with_cache(IDS)[1])
    return _RECORDED[key]


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _hf_patterns(ref, ids, mask=None):
    """HF eager's attention weights per layer (the second output of each GptOssAttention: probs[..., :-1])."""
    seen = {}
    pairs = [(layer.self_attn, lambda mod, args, out, i=i: seen.__setitem__(i, out[1]))
             for i, layer in enumerate(ref.model.layers)]
    with torch.no_grad(), forward_hooks(*pairs):
        logits = ref(ids, attention_mask=mask).logits
    return seen, logits


def test_tiny_config_has_the_features(oss):
    model, _, gm = oss
    assert FEATURE_GUARDS["gpt_oss"](model)
    assert all(hasattr(gm.get_submodule(f"blocks.{i}.attn"), "hook_sink_logits") for i in range(gm.dims["n_layers"]))


def test_sink_hook_holds_hf_sinks_parameter(oss):
    model, ref, gm = oss
    cache = _recorded(ref, gm)[2]
    for i, layer in enumerate(model.model.layers):
        got = cache[f"blocks.{i}.attn.hook_sink_logits"]
        assert got.shape == (model.config.num_attention_heads,)
        assert torch.equal(got, layer.self_attn.sinks.detach())


def test_each_layer_reads_its_own_sinks(oss):
    """The sinks reaching each layer's attention core are that layer's parameter (a get_attr in the graph)."""
    _, _, gm = oss
    cores = [AttentionCall.of(n) for n in gm.graph.nodes if AttentionCall.is_core(n)]
    assert [c.layer_idx for c in cores] == list(range(gm.dims["n_layers"]))
    for call in cores:
        assert call.sinks.op == "get_attr" and call.sinks.target.endswith(f"layers.{call.layer_idx}.self_attn.sinks")


def test_scores_real_keys_and_pattern_softmax_with_sink(oss):
    """hook_attn_scores [B,H,S,S] has no sink column; hook_pattern == softmax([scores, sink])[..., :-1] by hand
    from hook_attn_scores and HF's sinks, == HF's attention weights, and its rows sum to < 1 (the sink's share;
    0 for padded queries, which see no key)."""
    model, ref, gm = oss
    ids, mask = left_padded(2, 8, pads=[0, 3])
    expected, _ = _hf_patterns(ref, ids, mask)
    _, cache = gm.run_with_cache(ids, attention_mask=mask)
    heads = model.config.num_attention_heads
    for i, layer in enumerate(model.model.layers):
        scores, pattern = cache["attn_scores", i], cache["pattern", i]
        assert scores.shape == pattern.shape == (2, heads, 8, 8)
        sinks = layer.self_attn.sinks.detach().reshape(1, -1, 1, 1).expand(2, -1, 8, 1)
        by_hand = torch.softmax(torch.cat([scores, sinks], dim=-1), dim=-1)
        torch.testing.assert_close(pattern, by_hand[..., :-1], atol=1e-6, rtol=0)
        torch.testing.assert_close(pattern, expected[i], atol=1e-6, rtol=0)
        rows = pattern.sum(-1)
        assert (rows < 1).all() and (rows[0] > 0).all() and (rows[1, :, 3:] > 0).all()
        assert (rows[1, :, :3] < 1e-30).all()  # padded queries see no key: all their mass is on the sink
        torch.testing.assert_close(rows + by_hand[..., -1], torch.ones_like(rows))
    # the mask is in the scores, per layer type: layer 0 slides (window 4), layer 1 is full
    lo = torch.finfo(cache["attn_scores", 0].dtype).min
    assert (cache["attn_scores", 0][0, :, 7, 3] == lo).all() and (cache["attn_scores", 0][0, :, 7, 4] > lo).all()
    assert (cache["attn_scores", 1][0, :, 7, 0] > lo).all()


def test_sink_edit_equals_hf_with_changed_sinks(oss):
    model, ref, gm = oss
    ids = IDS
    edited = copy.deepcopy(ref)
    with torch.no_grad():
        edited.model.layers[1].self_attn.sinks[1] += 3.0
        edited.model.layers[1].self_attn.sinks[3] = -4.0
        expected = edited(ids).logits
        before = model.model.layers[1].self_attn.sinks.detach().clone()

    def edit(t, hook):  # in place, as TransformerLens hooks often are
        t[1] += 3.0
        t[3] = -4.0

    with torch.no_grad():
        out = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_sink_logits", edit)])
    assert _diff(out, expected) < TOL and _diff(out, _recorded(ref, gm)[1]) > 1e-3
    assert torch.equal(model.model.layers[1].self_attn.sinks.detach(), before)  # the edit never reaches the weights


def test_pattern_edit_takes_effect_as_in_hf(oss):
    """Zeroing head 2's pattern in layer 0 equals HF with that head's o_proj input columns zeroed (z_h = 0)."""
    model, ref, gm = oss
    ids = IDS
    dh = model.config.head_dim
    edited = copy.deepcopy(ref)
    with torch.no_grad():
        edited.model.layers[0].self_attn.o_proj.weight[:, 2 * dh:3 * dh] = 0
        expected = edited(ids).logits

    def zero_head(t, hook):
        t[:, 2] = 0

    with torch.no_grad():
        out = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", zero_head)])
    assert _diff(out, expected) < TOL and _diff(out, _recorded(ref, gm)[1]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_math_is_hf_gpt_oss_eager_attention(dtype):
    """runtime.attention.eager_attention with sinks is bit-for-bit HF's gpt_oss eager_attention_forward (GQA, an
    additive mask with fully masked rows, the softmax in the scores' dtype)."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, h, 6, 16, generator=gen).to(dtype) for h in (4, 2, 2))
    mask = torch.zeros(2, 1, 6, 6, dtype=dtype)
    mask.masked_fill_(torch.ones(6, 6, dtype=torch.bool).triu(1), torch.finfo(dtype).min)
    mask[1, :, :, :3] = torch.finfo(dtype).min  # left padding: rows 0-2 of batch 1 see nothing
    module = torch.nn.Module()
    module.num_key_value_groups, module.training = 2, False
    module.sinks = torch.nn.Parameter(torch.linspace(-1, 2, 4).to(dtype))
    expected, weights = hf_gpt_oss.eager_attention_forward(module, q, k, v, mask, scaling=0.25)
    seen = {}
    got = eager_attention(q, k, v, mask, 0.25, None, sinks=module.sinks.detach(),
                          pattern_hook=lambda p: seen.setdefault("p", p))
    assert torch.equal(got, expected) and torch.equal(seen["p"], weights)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCH)
def test_stitched_trace_of_deeper_model(arch):
    """Five layers (sliding / full alternating) stitched from four captured: equal to HF, each layer its own sinks."""
    cfg = CONFIGS[arch]()
    cfg.num_hidden_layers, cfg.layer_types = 5, ["sliding_attention", "full_attention"] * 2 + ["sliding_attention"]
    model = build_from_config(cfg)
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            layer.self_attn.sinks.copy_(torch.linspace(-1.0, 1.5, cfg.num_attention_heads) * (i + 1))
    ref = eager_reference(model)
    gm = bridge.trace(model)
    assert gm.report.capture_notes[0].startswith("stitched: captured 4 of 5 layers")
    pids, mask = left_padded(2, 9, pads=[0, 4])
    with torch.no_grad():
        out, expected = gm(pids, attention_mask=mask), ref(pids, attention_mask=mask).logits
    assert _diff(out[mask.bool()], expected[mask.bool()]) < TOL
    _, cache = gm.run_with_cache(pids, attention_mask=mask, names_filter=lambda n: n.endswith("hook_sink_logits"))
    for i, layer in enumerate(model.model.layers):
        assert torch.equal(cache[f"blocks.{i}.attn.hook_sink_logits"], layer.self_attn.sinks.detach())


# ---- MoE block (hook_moe): routing and per-slot expert outputs against HF's router / experts modules ----

def _hf_moe(ref, ids, layers, router_edit=None, experts_edit=None):
    """HF eager logits, with forward hooks on the routers and experts of ``layers``: {layer: {name: value}} of what
    they saw and returned; ``router_edit(out) -> out`` / ``experts_edit(x, out) -> out`` replace their outputs."""
    seen, handles = {}, []
    for i in layers:
        mlp, rec = ref.model.layers[i].mlp, seen.setdefault(i, {})

        def on_router(mod, args, out, rec=rec):
            out = router_edit(out) if router_edit else out
            rec["logits"], rec["weights"], rec["indices"] = out
            return out

        def on_experts(mod, args, out, rec=rec):
            rec["x"] = args[0]
            out = experts_edit(args[0], out) if experts_edit else out
            rec["routed"] = out
            return out

        def on_mlp(mod, args, out, rec=rec):
            rec["mlp_out"] = out[0]

        handles += [mlp.router.register_forward_hook(on_router), mlp.experts.register_forward_hook(on_experts),
                    mlp.register_forward_hook(on_mlp)]
    try:
        with torch.no_grad():
            logits = ref(ids).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def _slot_by_hand(experts, x, expert: int, weight):
    """One routing slot's weighted output for token rows x [N,D] sent to ``expert``, from HF's expert weights:
    biased gate/up projection, the clamped SwiGLU written out (not HF's _apply_gate), biased down projection."""
    gate_up = x @ experts.gate_up_proj[expert] + experts.gate_up_proj_bias[expert]
    gate, up = gate_up[..., ::2], gate_up[..., 1::2]
    gate, up = gate.clamp(max=experts.limit), up.clamp(-experts.limit, experts.limit)
    act = (up + 1) * gate * torch.sigmoid(gate * experts.alpha)
    return (act @ experts.down_proj[expert] + experts.down_proj_bias[expert]) * weight


def test_routing_hooks_equal_hf_router(oss):
    model, ref, gm = oss
    seen, _, cache = _recorded(ref, gm)
    E, K = model.config.num_local_experts, model.config.num_experts_per_tok
    for i in range(gm.dims["n_layers"]):
        hf = seen[i]
        assert cache[f"blocks.{i}.mlp.hook_router_logits"].shape == (2, 6, E)
        torch.testing.assert_close(cache[f"blocks.{i}.mlp.hook_router_logits"], hf["logits"].view(2, 6, E),
                                   atol=1e-5, rtol=1e-5)  # a full cache runs the norms' explicit form: rounding
        indices = cache[f"blocks.{i}.mlp.hook_expert_indices"]
        assert indices.dtype == torch.int64 and torch.equal(indices, hf["indices"].view(2, 6, K))
        weights = cache[f"blocks.{i}.mlp.hook_routing_weights"]  # softmax over the top-k logits
        torch.testing.assert_close(weights, hf["weights"].view(2, 6, K), atol=1e-6, rtol=0)
        torch.testing.assert_close(weights.sum(-1), torch.ones(2, 6))
        torch.testing.assert_close(cache[f"blocks.{i}.hook_mlp_out"], hf["mlp_out"], atol=1e-5, rtol=0)
    assert len(set(cache["blocks.0.mlp.hook_expert_indices"].flatten().tolist())) == E  # every expert is used


def test_expert_slots_are_hand_computed_expert_outputs(oss):
    """hook_expert_out [B,S,K,D]: slot k of a token is expert idx[k]'s biased, clamped-SwiGLU output times its
    routing weight (by hand from HF's weights), and the slots sum to HF's experts output."""
    model, ref, gm = oss
    seen, _, cache = _recorded(ref, gm)
    D, K = model.config.hidden_size, model.config.num_experts_per_tok
    for i, layer in enumerate(model.model.layers):
        hf = seen[i]
        slots = cache[f"blocks.{i}.mlp.hook_expert_out"]
        assert slots.shape == (2, 6, K, D)
        torch.testing.assert_close(slots.sum(2), hf["routed"].view(2, 6, D), atol=1e-5, rtol=0)
        x, idx, w = hf["x"].view(2, 6, D), hf["indices"].view(2, 6, K), hf["weights"].view(2, 6, K)
        with torch.no_grad():
            for b, s, k in [(0, 0, 0), (0, 3, 1), (1, 5, 0), (1, 2, 1)]:
                want = _slot_by_hand(layer.mlp.experts, x[b, s], int(idx[b, s, k]), w[b, s, k])
                torch.testing.assert_close(slots[b, s, k], want, atol=1e-5, rtol=0)


def test_zeroing_a_slot_removes_that_expert_at_that_token(oss):
    model, ref, gm = oss
    ids = IDS
    K = model.config.num_experts_per_tok
    experts = model.model.layers[1].mlp.experts
    hf = _recorded(ref, gm)[0][1]
    b, s, k = 1, 4, 1
    expert, weight = int(hf["indices"].view(2, 6, K)[b, s, k]), hf["weights"].view(2, 6, K)[b, s, k]

    def remove(x, out):  # HF's experts output minus that expert's contribution at token (b, s), by hand
        out = out.clone()
        out[b * 6 + s] -= _slot_by_hand(experts, x[b * 6 + s], expert, weight)
        return out

    _, expected = _hf_moe(ref, ids, [1], experts_edit=remove)

    def zero(t, hook):
        t[b, s, k] = 0

    with torch.no_grad():
        out = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.mlp.hook_expert_out", zero)])
    assert _diff(out, expected) < TOL and _diff(out, _recorded(ref, gm)[1]) > 1e-4


def test_routing_weight_edit_equals_hf_with_edited_router_scores(oss):
    _, ref, gm = oss
    ids = IDS
    scale = torch.tensor([0.25, 1.75])

    def hf_edit(out):
        logits, weights, indices = out
        return logits, weights * scale, indices

    _, expected = _hf_moe(ref, ids, [0], router_edit=hf_edit)
    with torch.no_grad():
        out = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.mlp.hook_routing_weights", lambda t, hook: t * scale)])
    assert _diff(out, expected) < TOL and _diff(out, _recorded(ref, gm)[1]) > 1e-4
