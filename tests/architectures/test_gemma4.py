"""Gemma 4 text: every Gemma-4-only convention checked against HF eager (hooks see what HF computes, edits
equal the same edit made by hand on HF).

The tiny config (tiny.py ``gemma4_text``): layers [sliding, sliding, full, sliding, full]; layers 3 and 4 reuse
the keys/values of layers 1 and 2; full layers have head size 32, one KV head and k = v; PLE width 8; a
4-expert top-2 MoE; layer_scalar != 1. Reference edits go through HF's own extension points: forward hooks
on HF modules and an attention function registered in HF's ``AttentionInterface`` (on the reference copy).
"""
import copy
from dataclasses import replace

import pytest
import torch
import transformers as tf
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

import fxbridge as bridge
from conftest import traced
from tiny import GEMMA4, build, eager_reference, left_padded, missing_config_class, tokens

if missing_config_class("gemma4_text"):
    pytest.skip(f"the installed transformers {tf.__version__} has no Gemma 4 (Gemma4TextConfig)",
                allow_module_level=True)
from transformers.models.gemma4.modeling_gemma4 import eager_attention_forward  # noqa: E402

TOL = 1e-5
ARCH = "gemma4_text"
SHARED = {3: 1, 4: 2}  # KV-shared layer -> the layer whose keys/values it reads
SLIDING, FULL = 0, 2


class _Attention:
    """HF eager attention that records q/k/v/mask per layer and applies optional per-layer edits."""

    def __init__(self):
        self.seen, self.kv_edit, self.scores_edit, self.pattern_edit = {}, {}, {}, {}

    def __call__(self, module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        layer = module.layer_idx
        if layer in self.kv_edit:
            key, value = self.kv_edit[layer](key, value)
        self.seen[layer] = dict(q=query, k=key, v=value, mask=attention_mask)
        if layer not in self.scores_edit and layer not in self.pattern_edit:
            return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, **kwargs)
        n_rep = query.shape[1] // key.shape[1]  # by hand, as HF's eager_attention_forward
        k, v = key.repeat_interleave(n_rep, 1), value.repeat_interleave(n_rep, 1)
        scores = query @ k.transpose(2, 3) * scaling + attention_mask
        scores = self.scores_edit.get(layer, lambda s: s)(scores)
        pattern = self.pattern_edit.get(layer, lambda p: p)(torch.softmax(scores, -1, dtype=torch.float32))
        return (pattern @ v).transpose(1, 2).contiguous(), pattern

    def reset(self):
        for table in (self.seen, self.kv_edit, self.scores_edit, self.pattern_edit):
            table.clear()


RECORD = _Attention()
AttentionInterface.register("fxbridge_test_gemma4", RECORD)
AttentionMaskInterface.register("fxbridge_test_gemma4", eager_mask)


@pytest.fixture(scope="module")
def g4():
    model, ref, gm = traced(ARCH)
    rec = copy.deepcopy(ref)
    rec.set_attn_implementation("fxbridge_test_gemma4")
    return model, rec, gm


@pytest.fixture(autouse=True)
def _clean(g4):
    g4[2].reset_hooks(including_permanent=True)
    RECORD.reset()
    yield
    g4[2].reset_hooks(including_permanent=True)
    RECORD.reset()


def _hf(rec, ids, module_hooks=()):
    """HF logits with forward hooks ``(module path, fn(module, args, out) -> out | None)`` attached meanwhile."""
    handles = [rec.get_submodule(path).register_forward_hook(fn) for path, fn in module_hooks]
    try:
        with torch.no_grad():
            return rec(ids).logits
    finally:
        for h in handles:
            h.remove()


def _keep(store, key):
    def save(module, args, out):
        store[key] = out
    return save


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def test_tiny_config_has_the_features(g4):
    model, _, gm = g4
    attn = [layer.self_attn for layer in model.model.layers]
    assert [a.is_kv_shared_layer for a in attn] == [False, False, False, True, True]
    assert attn[FULL].v_proj is None and attn[FULL].head_dim == 32 and attn[SLIDING].head_dim == 16
    assert attn[SLIDING].scaling == 1.0 and model.config.layer_types[SLIDING] == "sliding_attention"
    assert gm.dims["n_kv_shared_layers"] == 2 and gm.dims["n_experts"] == 4 and gm.dims["d_per_layer_input"] == 8
    assert {r.name: r.matches for r in gm.report.passes}["route_shared_kv"] == 2


def test_q_k_v_hooks_are_projection_outputs_before_the_norms(g4):
    model, rec, gm = g4
    ids, proj = tokens(2, 6), {}
    hooks = [(f"model.layers.{i}.self_attn.{name}", _keep(proj, (i, name[0]))) for i in range(5)
             for name in ("q_proj", "k_proj", "v_proj")
             if getattr(rec.model.layers[i].self_attn, name, None) is not None]  # shared: no k/v; k = v: no v
    _hf(rec, ids, hooks)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.split(".")[-1] in ("hook_q", "hook_k", "hook_v"))
    for i in range(5):
        dh = model.model.layers[i].self_attn.head_dim
        assert _diff(cache["q", i], proj[i, "q"].unflatten(-1, (-1, dh))) < TOL
        if i in SHARED:
            assert f"blocks.{i}.attn.hook_k" not in gm.hook_dict and f"blocks.{i}.attn.hook_v" not in gm.hook_dict
            continue
        assert _diff(cache["k", i], proj[i, "k"].unflatten(-1, (-1, dh))) < TOL
        v_source = proj[i, "k"] if i == FULL else proj[i, "v"]  # k = v on full layers
        assert _diff(cache["v", i], v_source.unflatten(-1, (-1, dh))) < TOL


def test_rot_q_k_are_what_hf_attention_reads_shared_layers_included(g4):
    _, rec, gm = g4
    ids = tokens(2, 7)
    _hf(rec, ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: "hook_rot_" in n)
    for i in range(5):
        assert _diff(cache["rot_q", i], RECORD.seen[i]["q"].transpose(1, 2)) < TOL
        assert _diff(cache["rot_k", i], RECORD.seen[i]["k"].transpose(1, 2)) < TOL
    for layer, owner in SHARED.items():  # HF hands the shared layer the owner's key tensor itself
        assert RECORD.seen[layer]["k"] is RECORD.seen[owner]["k"]
        assert torch.equal(cache["rot_k", layer], cache["rot_k", owner])


def test_scores_are_pre_softmax_with_mask_and_pattern_is_hfs(g4):
    _, rec, gm = g4
    ids = tokens(2, 7)  # longer than the sliding window of 4
    with torch.no_grad():
        hf_patterns = rec(ids, output_attentions=True).attentions
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: "hook_attn_scores" in n or "hook_pattern" in n)
    for i in range(5):
        seen = RECORD.seen[i]
        n_rep = seen["q"].shape[1] // seen["k"].shape[1]
        by_hand = seen["q"] @ seen["k"].repeat_interleave(n_rep, 1).transpose(2, 3) * 1.0 + seen["mask"]
        scores = cache["attn_scores", i]
        assert _diff(scores, by_hand) < 1e-4 * by_hand[by_hand > -1e30].abs().max().item()
        assert _diff(cache["pattern", i], hf_patterns[i]) < TOL
        assert _diff(torch.softmax(scores, -1), cache["pattern", i]) < TOL
        assert _diff(scores.clamp(min=-1e4), cache["pattern", i]) > 0.5  # really the scores, not the pattern
    masked = torch.finfo(torch.float32).min
    assert (cache["attn_scores", SLIDING][..., 6, :3] == masked).all()  # outside the window of 4
    assert (cache["attn_scores", FULL][..., 6, :] > masked).all()  # full layer: the whole causal prefix


@pytest.mark.parametrize("layer", [FULL, 3])  # a k = v full layer, a KV-shared layer
def test_editing_scores_and_pattern_equals_the_same_edit_on_hf(g4, layer):
    _, rec, gm = g4
    ids = tokens(2, 6)

    def boost_token_0(scores):
        scores = scores.clone()
        scores[:, 1, :, 0] += 3.0
        return scores

    def halve_head_0(pattern):
        pattern = pattern.clone()
        pattern[:, 0] *= 0.5
        return pattern

    with torch.no_grad():
        clean = gm(ids)
        for hook, edit, table in (("hook_attn_scores", boost_token_0, "scores_edit"),
                                  ("hook_pattern", halve_head_0, "pattern_edit")):
            got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.{hook}", lambda t, hook: edit(t))])
            RECORD.reset()
            getattr(RECORD, table)[layer] = edit
            expected = _hf(rec, ids)
            RECORD.reset()
            assert _diff(got, expected) < TOL, hook
            assert _diff(got, clean) > 1e-4, hook


def test_kv_sharing_owner_key_edit_reaches_sharers_own_edit_stays_local(g4):
    _, rec, gm = g4
    ids = tokens(2, 6)

    def scale(t, hook=None):
        return t * 1.5

    with torch.no_grad():
        clean = gm(ids)
        # the owner's keys (after k_norm and RoPE; RoPE is linear) are what the sharer reads: HF's k_norm edit
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_rot_k", scale)])
        expected = _hf(rec, ids, [("model.layers.1.self_attn.k_norm", lambda m, a, out: scale(out))])
        assert _diff(got, expected) < TOL and _diff(got, clean) > 1e-4
        with gm.hooks(fwd_hooks=[("blocks.1.attn.hook_rot_k", scale)]):
            _, patterns = gm.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
        # the sharer's own hook_rot_k edits layer 3 alone: HF's attention call of layer 3 with edited keys
        RECORD.kv_edit[3] = lambda k, v: (scale(k), v)
        expected = _hf(rec, ids)
        RECORD.reset()
        with gm.hooks(fwd_hooks=[("blocks.3.attn.hook_rot_k", scale)]):
            got, edited = gm.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    assert _diff(got, expected) < TOL and _diff(got, clean) > 1e-4
    _, clean_patterns = gm.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_pattern"))
    assert torch.equal(edited["pattern", 1], clean_patterns["pattern", 1])
    assert _diff(edited["pattern", 3], clean_patterns["pattern", 3]) > 1e-4
    assert _diff(patterns["pattern", 3], clean_patterns["pattern", 3]) > 1e-4  # the owner edit reached layer 3


def test_k_eq_v_hook_k_edits_keys_and_values_hook_v_values_only(g4):
    _, rec, gm = g4
    ids = tokens(2, 6)

    def zero_front(t, hook=None):
        t = t.clone()
        t[..., :8] = 0.0
        return t

    with torch.no_grad():
        _, clean = gm.run_with_cache(ids, names_filter=[f"blocks.{FULL}.attn.hook_k", f"blocks.{FULL}.attn.hook_v",
                                                        f"blocks.{FULL}.attn.hook_pattern"])
        assert torch.equal(clean["k", FULL], clean["v", FULL])  # one projection
        # hook_v: the value path only (HF: the input of v_norm)
        with gm.hooks(fwd_hooks=[(f"blocks.{FULL}.attn.hook_v", zero_front)]):
            got, edited = gm.run_with_cache(ids, names_filter=f"blocks.{FULL}.attn.hook_pattern")
        v_norm = f"model.layers.{FULL}.self_attn.v_norm"
        handle = rec.get_submodule(v_norm).register_forward_pre_hook(lambda m, args: (zero_front(args[0]),))
        try:
            expected = _hf(rec, ids)
        finally:
            handle.remove()
        assert _diff(got, expected) < TOL
        assert torch.equal(edited["pattern", FULL], clean["pattern", FULL])  # keys untouched
        # hook_k: keys and values (HF: the k_proj output, which is both)
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{FULL}.attn.hook_k", zero_front)])
        expected = _hf(rec, ids, [(f"model.layers.{FULL}.self_attn.k_proj",
                                   lambda m, a, out: zero_front(out.unflatten(-1, (-1, 32))).flatten(-2))])
        assert _diff(got, expected) < TOL


def test_per_layer_embedding_hooks_equal_hf_and_edits_match(g4):
    model, rec, gm = g4
    ids, seen = tokens(2, 6), {}
    layer = 1
    hooks = [(f"model.layers.{layer}.per_layer_input_gate", _keep(seen, "gate")),
             (f"model.layers.{layer}.post_per_layer_input_norm", _keep(seen, "out"))]
    _hf(rec, ids, hooks)
    with torch.no_grad():
        embeds = rec.model.embed_tokens(ids)
        per_layer = rec.model.project_per_layer_inputs(embeds, rec.model.get_per_layer_inputs(ids, embeds))
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: ".ple." in n or "hook_ple_out" in n)
    assert _diff(cache[f"blocks.{layer}.ple.hook_per_layer_input"], per_layer[:, :, layer]) < TOL
    assert _diff(cache[f"blocks.{layer}.ple.hook_gate"], seen["gate"]) < TOL
    gated = rec.model.layers[layer].act_fn(seen["gate"]) * per_layer[:, :, layer]
    assert _diff(cache[f"blocks.{layer}.ple.hook_gated"], gated) < TOL
    assert _diff(cache[f"blocks.{layer}.hook_ple_out"], seen["out"]) < TOL
    assert cache[f"blocks.{layer}.ple.hook_gate"].shape == (2, 6, 8)

    def zero(t, hook=None):
        return torch.zeros_like(t)

    with torch.no_grad():
        clean = gm(ids)
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.ple.hook_per_layer_input", zero)])
    handle = rec.get_submodule(f"model.layers.{layer}").register_forward_pre_hook(
        lambda m, args, kwargs: ((args[0], zero(args[1]), *args[2:]), kwargs), with_kwargs=True)
    try:
        expected = _hf(rec, ids)
    finally:
        handle.remove()
    assert _diff(got, expected) < TOL and _diff(got, clean) > 1e-4


def test_moe_hooks_equal_hf_router_and_experts(g4):
    _, rec, gm = g4
    ids, seen, layer = tokens(2, 6), {}, 2
    base = f"model.layers.{layer}"
    _hf(rec, ids, [(f"{base}.router.proj", _keep(seen, "logits")), (f"{base}.router", _keep(seen, "router")),
                   (f"{base}.experts", _keep(seen, "experts")),
                   (f"{base}.post_feedforward_layernorm_2", _keep(seen, "out"))])
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: f"blocks.{layer}.mlp.hook_" in n or "hook_moe_out" in n)
    moe = f"blocks.{layer}.mlp"
    probs, weights, index = seen["router"]
    assert _diff(cache[f"{moe}.hook_router_logits"], seen["logits"].view(2, 6, 4)) < TOL
    assert _diff(cache[f"{moe}.hook_router_probs"], probs.view(2, 6, 4)) < TOL
    assert torch.equal(cache[f"{moe}.hook_expert_indices"], index.view(2, 6, 2))
    assert _diff(cache[f"{moe}.hook_routing_weights"], weights.view(2, 6, 2)) < TOL
    assert cache[f"{moe}.hook_expert_out"].shape == (2, 6, 2, 64)
    assert _diff(cache[f"{moe}.hook_expert_out"].sum(2), seen["experts"].view(2, 6, 64)) < TOL
    assert _diff(cache[f"blocks.{layer}.hook_moe_out"], seen["out"]) < TOL


def test_moe_edits_equal_the_same_edit_on_hf(g4):
    _, rec, gm = g4
    ids, layer = tokens(2, 6), 2
    base, moe = f"model.layers.{layer}", f"blocks.{layer}.mlp"

    def favour_expert_3(logits, hook=None):
        logits = logits.clone()
        logits[..., 3] += 4.0
        return logits

    def top1_only(weights, hook=None):
        weights = weights.clone()
        weights[..., 1] = 0.0
        return weights

    with torch.no_grad():
        clean = gm(ids)
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"{moe}.hook_router_logits", favour_expert_3)])
        expected = _hf(rec, ids, [(f"{base}.router.proj", lambda m, a, out: favour_expert_3(out))])
        assert _diff(got, expected) < TOL and _diff(got, clean) > 1e-4
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"{moe}.hook_routing_weights", top1_only)])
        expected = _hf(rec, ids, [(f"{base}.router", lambda m, a, out: (out[0], top1_only(out[1]), out[2]))])
        assert _diff(got, expected) < TOL and _diff(got, clean) > 1e-4


def test_layer_scalar_scales_the_whole_layer_output(g4):
    model, _, gm = g4
    ids = tokens(2, 6)
    names = ("hook_resid_mid", "hook_mlp_out", "hook_ple_out", "hook_resid_post")
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.split(".")[-1] in names)
    for i in range(5):
        scalar = float(model.model.layers[i].layer_scalar)
        assert scalar != 1.0
        parts = sum(cache[f"blocks.{i}.{name}"] for name in names[:3])
        assert _diff(cache["resid_post", i], scalar * parts) < 1e-6


def test_norm_hooks_before_the_weight_and_softcapped_logits(g4):
    model, rec, gm = g4
    ids, seen = tokens(2, 6), {}
    _hf(rec, ids, [("model.layers.0.input_layernorm", _keep(seen, "ln1"))])
    with torch.no_grad():
        out, cache = gm.run_with_cache(ids, names_filter=["blocks.0.ln1.hook_normalized", "hook_unembed",
                                                          "hook_logits"])
    weight = rec.model.layers[0].input_layernorm.weight  # Gemma 4 multiplies by w, not 1 + w
    assert _diff(cache["blocks.0.ln1.hook_normalized"] * weight, seen["ln1"]) < TOL
    cap = model.config.final_logit_softcapping
    assert _diff(cache["hook_logits"], cap * torch.tanh(cache["hook_unembed"] / cap)) < 1e-6
    assert torch.equal(out, cache["hook_logits"])


def test_eager_and_fused_attention_paths_agree(g4):
    _, rec, gm = g4
    ids = tokens(3, 12)
    expected = _hf(rec, ids)
    with torch.no_grad():
        fused = gm(ids)
        for i in range(5):
            gm.get_submodule(f"blocks.{i}.attn").force_eager = True
        try:
            eager = gm(ids)
        finally:
            for i in range(5):
                gm.get_submodule(f"blocks.{i}.attn").force_eager = False
    assert _diff(eager, expected) < TOL and _diff(fused, expected) < TOL


# Variants of the tiny config with Gemma-4-only features switched off or laid out as in the small checkpoints:
# the passes must then expect (and find) nothing, or v projections on full layers next to KV sharing.
VARIANTS = {
    "plain": dict(num_hidden_layers=3, layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                  num_kv_shared_layers=0, attention_k_eq_v=False, hidden_size_per_layer_input=0,
                  enable_moe_block=False, final_logit_softcapping=None, use_double_wide_mlp=False),
    "shared_kv_with_v_proj": dict(num_hidden_layers=6, attention_k_eq_v=False, enable_moe_block=False,
                                  num_global_key_value_heads=None, layer_types=["sliding_attention", "full_attention",
                                  "sliding_attention", "sliding_attention", "sliding_attention", "full_attention"]),
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_variants_trace_exactly_with_the_hooks_they_have(variant):
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(tf.Gemma4TextConfig(**dict(GEMMA4, **VARIANTS[variant]))).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    ref = eager_reference(model)
    gm = bridge.trace(model)
    ids, mask = left_padded(3, 9, pads=[0, 2, 5])
    with torch.no_grad():
        assert _diff(gm(ids, attention_mask=mask)[mask.bool()], ref(ids, attention_mask=mask).logits[mask.bool()]) < TOL
    n = model.config.num_hidden_layers
    shared = [i for i in range(n) if model.model.layers[i].self_attn.is_kv_shared_layer]
    has_k = {i for i in range(n) if f"blocks.{i}.attn.hook_k" in gm.hook_dict}
    has_v = {i for i in range(n) if f"blocks.{i}.attn.hook_v" in gm.hook_dict}
    assert has_k == has_v == set(range(n)) - set(shared)
    assert all(f"blocks.{i}.attn.hook_rot_k" in gm.hook_dict for i in range(n))
    ple = any(".ple." in name for name in gm.hook_dict)
    moe = any(".mlp.hook_router_logits" in name for name in gm.hook_dict)
    assert (ple, moe) == (bool(model.config.hidden_size_per_layer_input), model.config.enable_moe_block)
    assert ("hook_logits" in gm.hook_dict) == (model.config.final_logit_softcapping is not None)
    if variant == "shared_kv_with_v_proj":
        assert shared == [4, 5] and model.model.layers[1].self_attn.v_proj is not None


def test_gemma4_passes_match_nothing_elsewhere_and_fail_loudly_when_they_should_match():
    from fxbridge.architectures import dims_from_config, get_spec
    from fxbridge.architectures.gemma4 import GEMMA4_TEXT
    from fxbridge.passes import PassContext, run_passes
    from fxbridge.tracer import capture
    model = build("llama")
    spec = get_spec(model)
    captured = capture(model, layers=spec.layers)
    dims = dims_from_config(model.config, spec)
    ctx = PassContext(captured.graph, captured.root, spec, dims, model.config)
    gemma4_passes = {p.name: p for p in GEMMA4_TEXT.passes}  # configured with Gemma 4's module names
    for name, key, where in (
            ("alias_shared_kv", "n_kv_shared_layers", r"the attention calls of model\.layers\.\*: expected 2 layer"),
            ("hook_per_layer_embeddings", "d_per_layer_input",
             r"model\.layers\.0\.per_layer_input_gate: expected the per-layer input gate's output, found no node"),
            ("hook_moe", "n_experts", r"model\.layers\.0\.router: expected the router projection to 2 experts")):
        assert gemma4_passes[name].run(ctx) == 0  # a Llama graph has none of it: nothing matches, nothing changes
        ctx.dims = dict(dims, **{key: 2})  # a config that claims the feature: the missing match is an error
        ctx.spec = replace(spec, moe_layers=(0,)) if name == "hook_moe" else spec  # MoE layers come from the config
        with pytest.raises(bridge.PatternNotFound, match=f"pass '{name}' in {where}"):
            run_passes(ctx, [gemma4_passes[name]])
        ctx.dims, ctx.spec = dims, spec
    captured.graph.lint()


def test_per_layer_head_sizes_come_from_hfs_per_layer_config(g4):
    from fxbridge.passes.hook_shared_qkv import layer_heads
    model, _, gm = g4
    assert [layer_heads(model.config, i) for i in range(5)] == [(4, 2, 16), (4, 2, 16), (4, 1, 32), (4, 2, 16),
                                                                 (4, 1, 32)]
    assert (gm.dims["n_kv_heads"], gm.dims["d_head"]) == (2, 16)  # model-wide dims: layer 0's values


def test_bfloat16_graph_shape_is_handled_too():
    """In bf16 HF's ``.float()`` in the norms copies, so v_norm reads the k projection directly (fp32: via k_norm)."""
    model = build(ARCH).to(torch.bfloat16)
    ref = eager_reference(model)
    gm = bridge.trace(model)
    ids = tokens(2, 9)
    with torch.no_grad():
        expected = ref(ids).logits
        for i in range(5):
            gm.get_submodule(f"blocks.{i}.attn").force_eager = True
        got, cache = gm.run_with_cache(ids, names_filter=[f"blocks.{FULL}.attn.hook_k", f"blocks.{FULL}.attn.hook_v",
                                                          f"blocks.{FULL}.moe.hook_routing_weights"])  # the old name: an alias
    assert torch.equal(got, expected)  # HF's eager computation, op for op
    assert torch.equal(cache["k", FULL], cache["v", FULL]) and cache["v", FULL].dtype == torch.bfloat16
    assert cache[f"blocks.{FULL}.moe.hook_routing_weights"].shape == (2, 9, 2)
