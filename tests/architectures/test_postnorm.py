"""Post-norm-only blocks (OLMo 2/3, EXAONE 4), VaultGemma, Granite's multipliers and BitNet's sub-norms: each hook
checked against what HF's own modules compute (forward hooks on the eager reference) or a hand computation.

The generic parity / hook / intervention tests run on these tiny configs too (tests/tiny_resid.py); this file checks
where each hook sits.
"""
import pytest
import torch
from torch import fx
from types import SimpleNamespace

import fxbridge as bridge
from conftest import traced
from fxbridge.architectures import get_spec
from fxbridge.errors import PatternNotFound
from fxbridge.passes import PassContext, run_passes
from fxbridge.passes.hook_logit_scale import hook_logit_scale
from fxbridge.runtime.hook_point import HookPoint
from tiny import CONFIGS, build_from_config, eager_reference, tokens

TOL = 1e-5
aten = torch.ops.aten
POST_NORM = ["olmo2", "olmo3", "exaone4"]


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _run_recording(ref, gm, ids, paths):
    """HF eager forward with forward hooks on ``paths``: {path: (first input, output)}; then gm's full cache."""
    seen, handles = {}, []
    for path in paths:
        def keep(mod, args, kwargs, out, path=path):
            x = args[0] if args else next(iter(kwargs.values()))
            seen[path] = (x, out[0] if isinstance(out, tuple) else out)
        handles.append(ref.get_submodule(path).register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            expected = ref(ids).logits
            out, cache = gm.run_with_cache(ids)
    finally:
        for h in handles:
            h.remove()
    return seen, expected, out, cache


def _close(a, b):
    """Equal up to fp32 rounding at the tensor's scale: 1e-5 absolute for values up to 1, relative beyond (Granite's
    x3 embedding, VaultGemma's residual of ~15 where resid_pre + attn_out cancels to small values)."""
    torch.testing.assert_close(a, b, atol=1e-5 * max(1.0, b.abs().max().item()), rtol=1e-5)


def _rms(x, eps, dims=1):
    """RMSNorm by hand over the last ``dims`` axes (no weight)."""
    axes = tuple(range(-dims, 0))
    return x * torch.rsqrt(x.pow(2).mean(axes, keepdim=True) + eps)


def _rope(x, theta: float):
    """Rotary embedding by hand (HF's rotate_half layout) on x [B,S,H,dh], positions 0..S-1."""
    dh = x.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, dh, 2, dtype=torch.float32) / dh)
    angles = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * inv_freq
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    rotated = torch.cat([-x[..., dh // 2:], x[..., :dh // 2]], -1)
    return x * cos[None, :, None] + rotated * sin[None, :, None]


def _scores(q, k, scale):
    """[B,S,H,dh] query, [B,S,Hkv,dh] key -> [B,H,S,S] q.k^T x scale (keys repeated to the query heads)."""
    k = k.repeat_interleave(q.shape[2] // k.shape[2], dim=2)
    return q.transpose(1, 2) @ k.permute(0, 2, 3, 1) * scale


def _visible(seq: int, window: int | None):
    rows, cols = torch.meshgrid(torch.arange(seq), torch.arange(seq), indexing="ij")
    return (cols <= rows) & ((rows - cols < window) if window else True)


# ------------------------------------------------------------------------------------ post-norm-only blocks
@pytest.mark.parametrize("arch", POST_NORM)
def test_post_norm_blocks_hook_the_normed_branches_and_the_layer_input(arch):
    """resid_pre is the layer input (no pre-norm), attn_out / mlp_out the post-norm outputs (what is added),
    resid_mid = resid_pre + attn_out is the MLP's input, and ln1_post / ln2_post are those norms."""
    _, ref, gm = traced(arch)
    ids = tokens(2, 7)
    n = gm.dims["n_layers"]
    paths = [f"model.layers.{i}{p}" for i in range(n) for p in ("", ".mlp", ".post_attention_layernorm",
                                                                ".post_feedforward_layernorm")]
    seen, _, _, cache = _run_recording(ref, gm, ids, paths)
    assert not [h for h in gm.hook_dict if ".ln1." in h or ".ln2." in h]
    for i in range(n):
        layer = ref.model.layers[i]
        x, y = seen[f"model.layers.{i}"]
        assert _diff(cache["resid_pre", i], x) < TOL
        assert _diff(cache["resid_post", i], y) < TOL
        assert _diff(cache["resid_mid", i], seen[f"model.layers.{i}.mlp"][0]) < TOL
        assert _diff(cache["resid_mid", i], cache["resid_pre", i] + cache["attn_out", i]) < TOL
        assert _diff(cache["resid_post", i], cache["resid_mid", i] + cache["mlp_out", i]) < TOL
        for short, path, hook, norm in (("ln1_post", "post_attention_layernorm", "attn_out",
                                         layer.post_attention_layernorm),
                                        ("ln2_post", "post_feedforward_layernorm", "mlp_out",
                                         layer.post_feedforward_layernorm)):
            branch, normed = seen[f"model.layers.{i}.{path}"]
            assert _diff(cache[hook, i], normed) < TOL
            assert _diff(cache[hook, i], branch) > 1e-2  # the norm really changes the branch
            scale = torch.sqrt(branch.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            assert _diff(cache[f"blocks.{i}.{short}.hook_scale"], scale) < TOL
            assert _diff(cache[f"blocks.{i}.{short}.hook_normalized"] * norm.weight, normed) < TOL


@pytest.mark.parametrize("arch", POST_NORM)
def test_qk_norm_sits_between_hook_q_and_rot_q(arch):
    """hook_q/k are the projection outputs; rot_q/k = RoPE(norm(q)) -- OLMo's norm spans the whole projection,
    EXAONE 4's one head -- and on EXAONE 4's full (NoPE) layer the scores use the normed, unrotated q/k."""
    model, ref, gm = traced(arch)
    cfg = model.config
    ids = tokens(2, 7)
    n = gm.dims["n_layers"]
    paths = [f"model.layers.{i}.self_attn.{p}" for i in range(n) for p in ("q_proj", "k_proj")]
    seen, _, _, cache = _run_recording(ref, gm, ids, paths)
    per_head = arch == "exaone4"
    # HF's EXAONE 4 rotates only on its sliding layers when a sliding window is set (the config is the oracle)
    nope = tuple(i for i, t in enumerate(cfg.layer_types) if t != "sliding_attention") \
        if arch == "exaone4" and cfg.sliding_window else ()
    assert nope == ((1,) if arch == "exaone4" else ())
    for i in range(n):
        attn = model.model.layers[i].self_attn
        normed = {}
        for which, norm in (("q", attn.q_norm), ("k", attn.k_norm)):
            x = cache[which, i]
            assert _diff(x.flatten(-2), seen[f"model.layers.{i}.self_attn.{which}_proj"][1]) < TOL
            normed[which] = (_rms(x, norm.variance_epsilon, dims=1 if per_head else 2).flatten(-2)
                             * norm.weight.repeat(1 if not per_head else x.shape[2])).unflatten(-1, x.shape[-2:])
        if i in nope:
            assert f"blocks.{i}.attn.hook_rot_q" not in gm.hook_dict
            q, k = normed["q"], normed["k"]
        else:
            rope = cfg.rope_parameters
            kind = cfg.layer_types[i] if "rope_theta" not in rope else None  # OLMo 3: a base per layer type
            theta = (rope[kind] if kind else rope)["rope_theta"]
            assert _diff(cache["rot_q", i], _rope(normed["q"], theta)) < TOL
            assert _diff(cache["rot_k", i], _rope(normed["k"], theta)) < TOL
            q, k = cache["rot_q", i], cache["rot_k", i]
        scores = cache["attn_scores", i]
        visible = scores > -1e30
        sliding = arch != "olmo2" and cfg.layer_types[i] == "sliding_attention"  # OLMo 2: no sliding layers
        window = cfg.sliding_window if sliding else None
        assert torch.equal(visible[0, 0], _visible(7, window)), i
        assert _diff(scores[visible], _scores(q, k, attn.scaling)[visible]) < TOL


def test_exaone4_without_sliding_window_rotates_every_layer():
    """HF applies rotary on every layer when no sliding window is configured: rot hooks on all, logits equal."""
    config = CONFIGS["exaone4"]()
    config.sliding_window = None
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    model = build_from_config(config)
    gm = bridge.trace(model)
    assert all(f"blocks.{i}.attn.hook_rot_q" in gm.hook_dict for i in range(config.num_hidden_layers))
    ids = tokens(2, 7)
    with torch.no_grad():
        assert _diff(gm(ids), eager_reference(model)(ids).logits) < TOL


# ---------------------------------------------------------------------------------------------------- VaultGemma
def test_vaultgemma_has_gemma2_pre_norms_only_and_its_softcaps():
    model, ref, gm = traced("vaultgemma")
    cfg = model.config
    ids = tokens(2, 7)
    paths = [f"model.layers.{i}.{p}" for i in range(gm.dims["n_layers"])
             for p in ("self_attn.o_proj", "mlp", "pre_feedforward_layernorm")]
    seen, expected, out, cache = _run_recording(ref, gm, ids, paths)
    assert not [h for h in gm.hook_dict if "_post." in h]
    _close(cache["hook_embed"] / cfg.hidden_size ** 0.5, model.model.embed_tokens.weight[ids])
    for i in range(gm.dims["n_layers"]):
        layer = model.model.layers[i]
        # values up to ~15 (initializer_range 0.2): fp32 rounding between HF and the trace reaches 1e-5 absolute
        _close(cache["attn_out", i], seen[f"model.layers.{i}.self_attn.o_proj"][1])
        _close(cache["mlp_out", i], seen[f"model.layers.{i}.mlp"][1])
        mid, normed = seen[f"model.layers.{i}.pre_feedforward_layernorm"]
        _close(cache["resid_mid", i], mid)
        _close(cache[f"blocks.{i}.ln2.hook_normalized"] * (1.0 + layer.pre_feedforward_layernorm.weight), normed)
        pre_cap = _scores(cache["rot_q", i], cache["rot_k", i], cfg.query_pre_attn_scalar ** -0.5)
        _close(cache[f"blocks.{i}.attn.hook_attn_scores_pre_cap"], pre_cap)
        scores, cap = cache["attn_scores", i], cfg.attn_logit_softcapping
        visible = scores > -1e30
        window = cfg.sliding_window if cfg.layer_types[i] == "sliding_attention" else None
        assert torch.equal(visible[0, 0], _visible(7, window)), i
        _close(scores[visible], (cap * torch.tanh(pre_cap / cap))[visible])
    cap = cfg.final_logit_softcapping
    _close(cache["hook_logits"], cap * torch.tanh(cache["hook_unembed"] / cap))
    assert torch.equal(out, cache["hook_logits"]) and _diff(out, expected) < TOL


# ------------------------------------------------------------------------------------------------------- Granite
@pytest.mark.parametrize("arch", ["granite", "granite_unit"])
def test_granite_multipliers_sit_where_hf_applies_them(arch):
    """hook_embed before embedding_multiplier, attn_out / mlp_out after residual_multiplier, the attention scale
    attention_multiplier, hook_unembed the lm_head output and hook_logits = hook_unembed / logits_scaling."""
    model, ref, gm = traced(arch)
    cfg = model.config
    ids = tokens(2, 7)
    n = gm.dims["n_layers"]
    per_layer = ("", ".self_attn.o_proj", ".mlp", ".post_attention_layernorm")
    paths = ["model.embed_tokens", "lm_head"] + [f"model.layers.{i}{p}" for i in range(n) for p in per_layer]
    seen, expected, out, cache = _run_recording(ref, gm, ids, paths)
    assert _diff(cache["hook_embed"], seen["model.embed_tokens"][1]) < TOL
    _close(cache["resid_pre", 0], cache["hook_embed"] * cfg.embedding_multiplier)
    assert _diff(cache["resid_pre", 0], seen["model.layers.0"][0]) < TOL
    r = cfg.residual_multiplier
    for i in range(n):
        o_in, o_out = seen[f"model.layers.{i}.self_attn.o_proj"]
        assert _diff(cache["z", i].flatten(-2), o_in) < TOL  # hook_z feeds o_proj directly
        assert _diff(cache["attn_out", i], o_out * r) < TOL
        assert _diff(cache["mlp_out", i], seen[f"model.layers.{i}.mlp"][1] * r) < TOL
        assert _diff(cache["resid_mid", i], seen[f"model.layers.{i}.post_attention_layernorm"][0]) < TOL
        assert _diff(cache["resid_mid", i], cache["resid_pre", i] + cache["attn_out", i]) < TOL
        scores = cache["attn_scores", i]
        visible = scores > -1e30
        assert _diff(scores[visible], _scores(cache["rot_q", i], cache["rot_k", i],
                                              cfg.attention_multiplier)[visible]) < TOL
    assert _diff(cache["hook_unembed"], seen["lm_head"][1]) < TOL
    assert _diff(cache["hook_logits"], cache["hook_unembed"] / cfg.logits_scaling) < TOL
    assert torch.equal(out, cache["hook_logits"]) and _diff(out, expected) < TOL
    with torch.no_grad():
        shifted = gm.run_with_hooks(ids, fwd_hooks=[("hook_logits", lambda t, hook: t + 1.0)])
    assert _diff(shifted, out + 1.0) < TOL


def test_granite_tiny_multipliers_are_not_one():
    """The tiny granite's constants change HF's output, so a hook on the wrong side of one would be caught."""
    model, _, gm = traced("granite")
    cfg = model.config
    assert cfg.attention_multiplier != gm.dims["d_head"] ** -0.5
    assert min(abs(v - 1.0) for v in (cfg.embedding_multiplier, cfg.residual_multiplier, cfg.logits_scaling)) > 0.4


def _toy_logits(inner, c):
    root = torch.nn.Module()
    root.add_module("hook_unembed", HookPoint(name="hook_unembed"))
    graph = fx.Graph()
    u = graph.call_module("hook_unembed", (graph.placeholder("x"),))
    graph.output(graph.call_function(inner, (u, c)))
    return root, graph


@pytest.mark.parametrize("inner,c", [(aten.div.Tensor, 4.0), (aten.mul.Tensor, 0.25)])
def test_logit_scaling_pass_hooks_the_divided_logits(inner, c):
    root, graph = _toy_logits(inner, c)
    spec = get_spec(CONFIGS["granite"]())
    ctx = PassContext(graph, root, spec, {"n_layers": 1}, SimpleNamespace(logits_scaling=4.0))
    assert hook_logit_scale(config_attr="logits_scaling", divide=True).run(ctx) == 1
    gm = fx.GraphModule(root, graph)
    assert graph.output_node().args[0].target == "hook_logits"
    x = torch.randn(2, 3, 5)
    torch.testing.assert_close(gm(x), x / 4.0)


def test_logit_scaling_pass_checks_the_constant_against_the_config():
    root, graph = _toy_logits(aten.div.Tensor, 2.0)
    spec = get_spec(CONFIGS["granite"]())
    ctx = PassContext(graph, root, spec, {"n_layers": 1}, SimpleNamespace(logits_scaling=4.0))
    with pytest.raises(PatternNotFound, match=r"one division by config.logits_scaling=4.0, found division by \[2.0\]"):
        run_passes(ctx, [hook_logit_scale(config_attr="logits_scaling", divide=True)], already_run=["hook_unembed"])


# -------------------------------------------------------------------------------------------------------- BitNet
def test_bitnet_sub_norms_sit_between_the_activations_and_the_output_projections():
    """hook_z (heads) and hook_post (act(gate) * up) are the sub-norms' inputs; attn.ln_sub / mlp.ln_sub are the
    norms (normalized x weight = what o_proj / down_proj read)."""
    model, ref, gm = traced("bitnet")
    ids = tokens(2, 7)
    n = gm.dims["n_layers"]
    paths = [f"model.layers.{i}.{p}" for i in range(n) for p in ("self_attn.attn_sub_norm", "self_attn.o_proj",
                                                                "mlp.ffn_sub_norm", "mlp.down_proj", "mlp")]
    seen, _, _, cache = _run_recording(ref, gm, ids, paths)
    for i in range(n):
        layer = model.model.layers[i]
        for short, z, sub, proj in (("attn", cache["z", i].flatten(-2), "self_attn.attn_sub_norm", "self_attn.o_proj"),
                                    ("mlp", cache["post", i], "mlp.ffn_sub_norm", "mlp.down_proj")):
            norm = layer.get_submodule(sub)
            sub_in, sub_out = seen[f"model.layers.{i}.{sub}"]
            assert _diff(z, sub_in) < TOL, (i, short)
            scale = torch.sqrt(z.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            assert _diff(cache[f"blocks.{i}.{short}.ln_sub.hook_scale"], scale) < TOL
            normalized = cache[f"blocks.{i}.{short}.ln_sub.hook_normalized"]
            assert normalized.shape == z.shape
            _close(normalized * norm.weight, seen[f"model.layers.{i}.{proj}"][0])
            _close(normalized * norm.weight, sub_out)
        gate, up = cache[f"blocks.{i}.mlp.hook_pre"], cache[f"blocks.{i}.mlp.hook_pre_linear"]
        assert _diff(cache["post", i], torch.relu(gate).pow(2) * up) < TOL  # ReLU^2 gated, before the sub-norm
        assert _diff(cache["mlp_out", i], seen[f"model.layers.{i}.mlp"][1]) < TOL


def test_bitnet_zeroing_hook_z_is_not_zeroing_o_proj_input():
    """Because of the sub-norm, zeroing a head in hook_z differs from zeroing its o_proj input columns (the
    generic head-zeroing test edits the sub-norm's input instead: tiny_resid FAMILY z_feeds)."""
    _, ref, gm = traced("bitnet")
    ids, head, dh = tokens(2, 7), 2, gm.dims["d_head"]

    def zero_cols(module, args):
        x = args[0].clone()
        x[..., head * dh:(head + 1) * dh] = 0.0
        return (x,)

    handle = ref.model.layers[1].self_attn.o_proj.register_forward_pre_hook(zero_cols)
    try:
        with torch.no_grad():
            at_o_proj = ref(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z",
                                                 lambda z, hook: z.index_fill_(2, torch.tensor([head]), 0.0))])
    assert _diff(got, at_o_proj) > 1e-4
