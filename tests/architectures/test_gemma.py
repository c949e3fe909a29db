"""Gemma 1/2/3 text: scaled embedding, (1 + w) RMSNorm, sandwich norms, attention scale, sliding/global layers,
two rotary bases, q/k norms and the softcaps -- each checked against HF eager or a hand computation.

The generic parity/hook/intervention tests also run on the tiny gemma configs (tests/tiny.py); this file checks
what is particular to Gemma.
"""
import math
from types import SimpleNamespace

import pytest
import torch
import transformers as tf
from torch import fx

import fxbridge as bridge
from conftest import traced
from fxbridge.architectures import get_spec
from fxbridge.errors import PatternNotFound
from fxbridge.passes import PassContext, run_passes
from fxbridge.passes.hook_final_softcap import hook_final_softcap, match_softcap
from fxbridge.runtime.hook_point import HookPoint
from tiny import CONFIGS, build, build_from_config, eager_reference, tokens

TOL = 1e-5
aten = torch.ops.aten
SANDWICH = ["gemma2", "gemma3_text"]


def _record_modules(ref, paths):
    """Forward hooks on ``ref`` submodules: {path: (first input, output)} after the next forward."""
    seen, handles = {}, []
    for path in paths:
        handles.append(ref.get_submodule(path).register_forward_hook(
            lambda mod, args, out, path=path: seen.__setitem__(path, (args[0], out))))
    return seen, handles


# ------------------------------------------------------------------------------------------- HF facts we follow
def test_hf_default_attention_and_softcap_facts():
    """Gemma 2 defaults to eager attention (HF's sdpa path refuses a softcap; transformers 5.17 still defaulted to
    sdpa, which silently dropped it: fxbridge applies the cap, as eager HF does); Gemma 3 defaults to sdpa and never
    passes ``attn_logit_softcapping`` to its attention function, so HF ignores that setting."""
    gemma2 = build("gemma2")
    if gemma2.config._attn_implementation == "sdpa":  # transformers 5.17: the sdpa kernel drops the softcap
        with torch.no_grad():
            dropped = (gemma2(tokens(2, 7)).logits - eager_reference(gemma2)(tokens(2, 7)).logits).abs().max()
        assert dropped.item() > 1e-3
    else:
        assert gemma2.config._attn_implementation == "eager"
    assert build("gemma3_text").config._attn_implementation == "sdpa"
    ids = tokens(2, 7)
    capped = CONFIGS["gemma3_text"]()
    capped.attn_logit_softcapping = 0.5
    torch.manual_seed(0)
    a = tf.Gemma3ForCausalLM(capped).eval()
    torch.manual_seed(0)
    b = tf.Gemma3ForCausalLM(CONFIGS["gemma3_text"]()).eval()
    for m in (a, b):
        m.set_attn_implementation("eager")
    with torch.no_grad():
        assert torch.equal(a(ids).logits, b(ids).logits)


@pytest.mark.parametrize("cap", ["attn_logit_softcapping", "final_logit_softcapping"])
def test_tiny_gemma2_softcaps_really_change_the_output(cap):
    _, ref, _ = traced("gemma2")
    ids = tokens(2, 9)
    config = CONFIGS["gemma2"]()
    setattr(config, cap, None)
    uncapped = eager_reference(build_from_config(config))
    with torch.no_grad():
        assert (uncapped(ids).logits - ref(ids).logits).abs().max().item() > 0.1




# ---------------------------------------------------------------------------------------------- embedding, norms
@pytest.mark.parametrize("arch", ["gemma", "gemma2", "gemma3_text"])
def test_hook_embed_is_scaled_by_sqrt_d(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 5)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter="hook_embed")
        hf = ref.model.embed_tokens(ids)
    by_hand = model.model.embed_tokens.weight[ids] * math.sqrt(gm.dims["d_model"])
    assert torch.equal(cache["hook_embed"], hf)
    torch.testing.assert_close(cache["hook_embed"], by_hand, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("arch", SANDWICH)
def test_sandwich_norms_attn_out_mlp_out_resid_mid(arch):
    """attn_out / mlp_out are the post-norm outputs; resid_mid = resid_pre + attn_out; the post norms' hooks are
    RMSNorm's scale and normalized (before Gemma's 1 + w)."""
    _, ref, gm = traced(arch)
    ids = tokens(2, 7)
    names = ["post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"]
    paths = [f"model.layers.{i}.{n}" for i in range(gm.dims["n_layers"]) for n in names]
    seen, handles = _record_modules(ref, paths)
    try:
        with torch.no_grad():
            ref(ids)
            _, cache = gm.run_with_cache(ids)
    finally:
        for h in handles:
            h.remove()
    for i in range(gm.dims["n_layers"]):
        layer = ref.model.layers[i]
        attn_in, attn_out = seen[f"model.layers.{i}.post_attention_layernorm"]
        mid, _ = seen[f"model.layers.{i}.pre_feedforward_layernorm"]
        mlp_in, mlp_out = seen[f"model.layers.{i}.post_feedforward_layernorm"]
        assert (cache[f"blocks.{i}.hook_attn_out"] - attn_out).abs().max().item() < TOL
        assert (cache[f"blocks.{i}.hook_mlp_out"] - mlp_out).abs().max().item() < TOL
        assert (cache[f"blocks.{i}.hook_resid_mid"] - mid).abs().max().item() < TOL
        resid_mid = cache[f"blocks.{i}.hook_resid_pre"] + cache[f"blocks.{i}.hook_attn_out"]
        assert (cache[f"blocks.{i}.hook_resid_mid"] - resid_mid).abs().max().item() < TOL
        for short, x, out, norm in (("ln1_post", attn_in, attn_out, layer.post_attention_layernorm),
                                    ("ln2_post", mlp_in, mlp_out, layer.post_feedforward_layernorm)):
            scale = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps)
            normalized = cache[f"blocks.{i}.{short}.hook_normalized"]
            torch.testing.assert_close(cache[f"blocks.{i}.{short}.hook_scale"], scale, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(normalized, x / scale, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(normalized * (1.0 + norm.weight), out, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------------- attention
def test_gemma2_scores_use_query_pre_attn_scalar_softcap_and_sliding_window():
    model, _, gm = traced("gemma2")
    cfg = model.config
    ids = tokens(1, 8)  # longer than the sliding window of 4
    n_rep = gm.dims["n_heads"] // gm.dims["n_kv_heads"]
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    for i, layer_type in enumerate(cfg.layer_types):
        q = cache["rot_q", i].transpose(1, 2)
        k = cache["rot_k", i].transpose(1, 2).repeat_interleave(n_rep, dim=1)
        pre_cap = q @ k.transpose(-1, -2) * cfg.query_pre_attn_scalar ** -0.5
        assert (cache[f"blocks.{i}.attn.hook_attn_scores_pre_cap"] - pre_cap).abs().max().item() < TOL
        scores = cache["attn_scores", i]
        visible = scores > -1e30
        cap = cfg.attn_logit_softcapping
        capped = cap * torch.tanh(pre_cap / cap)
        assert (scores[visible] - capped[visible]).abs().max().item() < TOL
        assert pre_cap.abs().max().item() > cap  # the cap bends the scores of this tiny model
        window = cfg.sliding_window if layer_type == "sliding_attention" else 8
        rows, cols = torch.meshgrid(torch.arange(8), torch.arange(8), indexing="ij")
        want = (cols <= rows) & (rows - cols < window)
        assert torch.equal(visible[0, 0], want), layer_type


def test_editing_pre_cap_scores_changes_the_output():
    _, _, gm = traced("gemma2")
    ids = tokens(1, 6)

    def zero(scores, hook):
        return torch.zeros_like(scores)

    with torch.no_grad():
        clean = gm(ids)
        with gm.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores_pre_cap", zero)]):
            edited, cache = gm.run_with_cache(ids, names_filter="blocks.1.attn.hook_pattern")
    assert (edited - clean).abs().max().item() > 1e-3
    # zero scores before the cap: the global layer attends uniformly to every visible position
    rows = torch.arange(1, 7, dtype=torch.float32)
    uniform = torch.tril(torch.ones(6, 6)) / rows[:, None]
    torch.testing.assert_close(cache["pattern", 1][0], uniform.expand(gm.dims["n_heads"], 6, 6))


def _rope(x, theta: float):
    """Rotary embedding by hand (HF's rotate_half layout) on x [B,S,H,dh], positions 0..S-1."""
    dh = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated = torch.cat([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def test_gemma3_qk_norm_and_a_rotary_base_per_layer_type():
    model, _, gm = traced("gemma3_text")
    cfg = model.config
    ids = tokens(2, 7)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    for i, layer_type in enumerate(cfg.layer_types):
        attn = model.model.layers[i].self_attn
        theta = cfg.rope_parameters[layer_type]["rope_theta"]
        for which, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
            x = cache[which, i]
            normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + norm.eps) * (1.0 + norm.weight)
            got = cache[f"blocks.{i}.attn.hook_rot_{which}"]
            assert (got - _rope(normed, theta)).abs().max().item() < TOL, (i, which)
            other = cfg.rope_parameters["full_attention" if layer_type == "sliding_attention" else
                                        "sliding_attention"]["rope_theta"]
            assert (got - _rope(normed, other)).abs().max().item() > 1e-2  # the base really differs


# ---------------------------------------------------------------------------------------------- final softcap
@pytest.mark.parametrize("arch", SANDWICH)
def test_hook_logits_is_capped_hook_unembed_and_the_output(arch):
    model, _, gm = traced(arch)
    cap = model.config.final_logit_softcapping
    ids = tokens(2, 6)
    with torch.no_grad():
        out, cache = gm.run_with_cache(ids, names_filter=["hook_unembed", "hook_logits"])
    unembed, logits = cache["hook_unembed"], cache["hook_logits"]
    assert torch.equal(out, logits)
    assert (logits - cap * torch.tanh(unembed / cap)).abs().max().item() < TOL
    assert unembed.abs().max().item() > cap  # pre-cap logits exceed the cap: the two hooks differ
    with torch.no_grad():
        zeroed = gm.run_with_hooks(ids, fwd_hooks=[("hook_unembed", lambda t, hook: torch.zeros_like(t))])
        shifted = gm.run_with_hooks(ids, fwd_hooks=[("hook_logits", lambda t, hook: t + 1.0)])
    assert torch.equal(zeroed, torch.zeros_like(zeroed))  # the cap runs on the edited pre-cap logits
    assert (shifted - (out + 1.0)).abs().max().item() < TOL


def test_uncapped_gemma2_has_no_softcap_hooks_and_matches_hf():
    config = CONFIGS["gemma2"]()
    config.attn_logit_softcapping = None
    config.final_logit_softcapping = None
    model = build_from_config(config)
    ref = eager_reference(model)
    gm = bridge.trace(model)
    assert gm.spec.final_softcap_config is None
    assert not [n for n in gm.hook_dict if "pre_cap" in n or n == "hook_logits"]
    ids = tokens(2, 9)
    with torch.no_grad():
        assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL


def test_spec_for_config_keeps_the_final_softcap_only_when_set():
    assert get_spec(CONFIGS["gemma2"]()).final_softcap_config == "final_logit_softcapping"
    config = CONFIGS["gemma2"]()
    config.final_logit_softcapping = None
    assert get_spec(config).final_softcap_config is None
    assert get_spec(CONFIGS["gemma"]()).final_softcap_config is None


# ------------------------------------------------------------------------------- softcap pass on toy graphs
def _toy(inner, c_in: float, c_out: float, cast: bool = False):
    """A toy graph ``x -> hook_unembed -> [cast] -> inner(u, c_in) -> tanh -> mul(., c_out) -> output``."""
    root = torch.nn.Module()
    root.add_module("hook_unembed", HookPoint(name="hook_unembed"))
    graph = fx.Graph()
    x = graph.placeholder("x")
    u = graph.call_module("hook_unembed", (x,))
    if cast:
        u = graph.call_function(aten.to.dtype, (u, torch.float32))
    scaled = graph.call_function(inner, (u, c_in))
    t = graph.call_function(aten.tanh.default, (scaled,))
    graph.output(graph.call_function(aten.mul.Tensor, (t, c_out)))
    return root, graph


def _ctx(root, graph, cap_in_config=3.0):
    spec = get_spec(CONFIGS["gemma2"]())
    return PassContext(graph, root, spec, {"n_layers": 1}, SimpleNamespace(final_logit_softcapping=cap_in_config))


@pytest.mark.parametrize("inner,c_in,cast", [(aten.div.Tensor, 3.0, False), (aten.mul.Tensor, 1 / 3.0, False),
                                             (aten.div.Tensor, 3.0, True)])
def test_softcap_pass_matches_cap_tanh_x_over_cap(inner, c_in, cast):
    root, graph = _toy(inner, c_in, 3.0, cast)
    ctx = _ctx(root, graph)
    assert hook_final_softcap.run(ctx) == 1
    graph.lint()
    gm = fx.GraphModule(root, graph)
    assert graph.output_node().args[0].target == "hook_logits"
    seen = {}
    gm.hook_logits.add_hook(lambda t, hook: seen.setdefault("logits", t.clone()))
    x = torch.randn(2, 3, 11) * 10
    out = gm(x)
    torch.testing.assert_close(out, 3.0 * torch.tanh(x / 3.0))
    assert torch.equal(seen["logits"], out)


@pytest.mark.parametrize("inner,c_in,c_out", [(aten.div.Tensor, 3.0, 2.0), (aten.mul.Tensor, 3.0, 3.0),
                                              (aten.add.Tensor, 3.0, 3.0)])
def test_softcap_pass_does_not_match_other_expressions(inner, c_in, c_out):
    root, graph = _toy(inner, c_in, c_out)
    u = next(n for n in graph.nodes if n.target == "hook_unembed")
    assert match_softcap(u) is None
    with pytest.raises(PatternNotFound, match=r"'hook_final_softcap' in the logits after hook_unembed \(lm_head\): "
                       r"expected cap \* tanh\(x / cap\), cap = config.final_logit_softcapping, found no such"):
        run_passes(_ctx(root, graph), [hook_final_softcap], already_run=["hook_unembed"])


def test_softcap_pass_checks_the_cap_against_the_config():
    root, graph = _toy(aten.div.Tensor, 2.0, 2.0)
    with pytest.raises(PatternNotFound, match="expected the cap config.final_logit_softcapping=3.0, found cap 2.0"):
        run_passes(_ctx(root, graph, cap_in_config=3.0), [hook_final_softcap], already_run=["hook_unembed"])


# ---------------------------------------------------------------------------------------------------- bfloat16
@pytest.mark.parametrize("arch", ["gemma", "gemma3_text"])
def test_bf16_fused_and_eager_paths_are_bit_identical_to_hf(arch):
    """Gemma's norms compute in float32 and cast back; the rewritten norms keep that exactly."""
    model = build(arch).to(torch.bfloat16)
    ref = eager_reference(model)
    gm = bridge.trace(model)
    ids = tokens(2, 9)
    with torch.no_grad():
        assert torch.equal(gm(ids), model(ids).logits)  # no hooks: fused attention, as HF's default sdpa
        hooked, cache = gm.run_with_cache(ids)  # every hook: explicit norms and eager attention
        assert torch.equal(hooked, ref(ids).logits)
    assert cache["blocks.0.ln1.hook_normalized"].dtype == torch.float32  # Gemma normalises in float32
    assert cache["blocks.0.hook_resid_pre"].dtype == torch.bfloat16
