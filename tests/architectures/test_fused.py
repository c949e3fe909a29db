"""Phi-3, GLM, GLM-4 (fused gate_up MLP), StarCoder 2, StableLM, Persimmon (LayerNorm with bias): what is
particular to each, checked against HF eager modules and hand computations (never fxbridge's own values).

The generic parity / hook / intervention tests run on their tiny configs too (tests/tiny_fused.py).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf

import fxbridge as bridge
from conftest import traced
from fxbridge.errors import PatternNotFound
from tiny import CONFIGS, build, build_from_config, eager_reference, left_padded, tokens

TOL = 1e-5
GATE_UP = ["phi3", "glm", "glm4"]
ROTARY = ["phi3", "glm", "glm4", "starcoder2", "stablelm", "stablelm_parallel", "persimmon"]


def _record(ref, paths, ids, **kw):
    """{path: (first input, output)} of ``ref`` submodules in one forward."""
    seen = {}
    handles = [ref.get_submodule(p).register_forward_hook(
        lambda mod, args, out, p=p: seen.__setitem__(p, (args[0], out))) for p in paths]
    try:
        with torch.no_grad():
            ref(ids, **kw)
    finally:
        for h in handles:
            h.remove()
    return seen


def _close(a, b, tol=TOL):
    assert a.shape == b.shape and (a - b).abs().max().item() < tol


# ------------------------------------------------------------------------------------------------ fused gate_up
@pytest.mark.parametrize("arch", GATE_UP)
def test_fused_gate_up_hooks_are_the_gate_and_up_halves(arch):
    _, ref, gm = traced(arch)
    ids = tokens(2, 7)
    n = gm.dims["n_layers"]
    seen = _record(ref, [f"model.layers.{i}.mlp{s}" for i in range(n) for s in ("", ".down_proj")], ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    for i in range(n):
        mlp = ref.model.layers[i].mlp
        x = seen[f"model.layers.{i}.mlp"][0]
        f = mlp.down_proj.in_features
        w = mlp.gate_up_proj.weight
        gate, up = x @ w[:f].T, x @ w[f:].T
        _close(cache["pre", i], gate)
        _close(cache["pre_linear", i], up)
        _close(cache["post", i], F.silu(gate) * up)
        _close(cache["post", i], seen[f"model.layers.{i}.mlp.down_proj"][0])


@pytest.mark.parametrize("arch", ["phi3", "glm4"])
def test_editing_the_gate_or_up_half_equals_the_same_hf_weight_edit(arch):
    """hook_pre x 0 in layer 1 and hook_pre_linear x 2 in layer 0 == HF with those rows of gate_up_proj edited; a
    swap of the halves would not agree (silu(2g) != 2 silu(g))."""
    _, ref, gm = traced(arch)
    ids = tokens(2, 6)
    edited = copy.deepcopy(ref)
    f = edited.model.layers[0].mlp.down_proj.in_features
    with torch.no_grad():
        edited.model.layers[1].mlp.gate_up_proj.weight[:f] *= 0.0
        edited.model.layers[0].mlp.gate_up_proj.weight[f:] *= 2.0
        want = edited(ids).logits
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.mlp.hook_pre", lambda t, hook: t * 0.0),
                                                ("blocks.0.mlp.hook_pre_linear", lambda t, hook: t * 2.0)])
        assert (want - ref(ids).logits).abs().max().item() > 1e-3
    _close(got, want)


def test_an_up_gate_layout_is_refused(monkeypatch):
    """hook_mlp checks HF's own use of the halves: an MLP computing act(second half) * first half does not pass
    for [gate | up]."""
    import transformers.models.phi3.modeling_phi3 as phi3

    def swapped(self, x):
        up, gate = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * self.activation_fn(gate))

    monkeypatch.setattr(phi3.Phi3MLP, "forward", swapped)
    with pytest.raises(PatternNotFound, match=r"\[gate \| up\]"):
        bridge.trace(build("phi3"))


# -------------------------------------------------------------------------------------------- fused qkv layouts
def test_phi3_qkv_proj_is_split_contiguous_and_a_kv_head_edit_equals_hf():
    _, ref, gm = traced("phi3")
    ids = tokens(2, 6)
    h, g, d = gm.dims["n_heads"], gm.dims["n_kv_heads"], gm.dims["d_head"]
    seen = _record(ref, ["model.layers.0.self_attn.qkv_proj"], ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    qkv = seen["model.layers.0.self_attn.qkv_proj"][1]
    _close(cache["q", 0], qkv[..., :h * d].unflatten(-1, (h, d)))
    _close(cache["k", 0], qkv[..., h * d:(h + g) * d].unflatten(-1, (g, d)))
    _close(cache["v", 0], qkv[..., (h + g) * d:].unflatten(-1, (g, d)))
    edited = copy.deepcopy(ref)  # value head 1 of layer 0 zeroed: its rows of qkv_proj
    with torch.no_grad():
        edited.model.layers[0].self_attn.qkv_proj.weight[(h + g + 1) * d:(h + g + 2) * d] = 0.0
        want = edited(ids).logits

        def zero_v1(t, hook):
            t[:, :, 1] = 0.0
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_v", zero_v1)])
    _close(got, want)


def test_persimmon_query_key_value_is_split_per_head():
    _, ref, gm = traced("persimmon")
    ids = tokens(2, 6)
    h, d = gm.dims["n_heads"], gm.dims["d_head"]
    seen = _record(ref, ["model.layers.1.self_attn.query_key_value"], ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    grid = seen["model.layers.1.self_attn.query_key_value"][1].unflatten(-1, (h, 3, d))
    for i, role in enumerate("qkv"):
        _close(cache[role, 1], grid[..., i, :])


# --------------------------------------------------------------------------------------------- partial rotary
def _rotary(x, rot_dim: int, base: float, interleaved: bool):
    """RoPE by hand on the first ``rot_dim`` lanes of x [B,S,h,d] (positions 0..S-1): pairs (2j, 2j+1) when
    ``interleaved`` (GLM), else (j, j + rot_dim/2) (NeoX style); the other lanes pass through."""
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float) / rot_dim)
    ang = torch.arange(x.shape[1], dtype=torch.float)[:, None] * inv
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    r, rest = x[..., :rot_dim], x[..., rot_dim:]
    a, b = (r[..., 0::2], r[..., 1::2]) if interleaved else (r[..., :rot_dim // 2], r[..., rot_dim // 2:])
    a, b = a * cos - b * sin, b * cos + a * sin
    out = torch.stack((a, b), -1).flatten(-2) if interleaved else torch.cat((a, b), -1)
    return torch.cat((out, rest), -1)


def _qk_norm(attn, which: str, x):
    """StableLM's per-head LayerNorms (one per head) / Persimmon's one LayerNorm over each head vector."""
    norm = getattr(attn, f"{which}_layernorm", None)
    if norm is None:
        return x
    if hasattr(norm, "norms"):
        return torch.stack([F.layer_norm(x[:, :, j], (x.shape[-1],), n.weight, n.bias, n.eps)
                            for j, n in enumerate(norm.norms)], dim=2)
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


@pytest.mark.parametrize("arch", ROTARY)
def test_rot_hooks_are_the_full_head_vectors_after_norm_and_partial_rotary(arch):
    """hook_rot_q/k = rotary (by hand) of the normed hook_q/k on the rotary lanes, the rest passing through; the
    scores are rot_q . rot_k x dh^-0.5 on the causal (and sliding-window) entries, HF's minimum elsewhere."""
    model, _, gm = traced(arch)
    ids = tokens(2, 9)
    cfg = model.config
    d, rep = gm.dims["d_head"], gm.dims["n_heads"] // gm.dims["n_kv_heads"]
    rot_dim = int(d * cfg.rope_parameters.get("partial_rotary_factor", 1.0))
    interleaved = arch.startswith("glm")
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    window = getattr(cfg, "sliding_window", None) or 10 ** 9
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    allowed = (j <= i) & (j > i - window)
    for layer in range(gm.dims["n_layers"]):
        attn = model.model.layers[layer].self_attn
        for role in "qk":
            normed = _qk_norm(attn, role, cache[role, layer])
            want = _rotary(normed, rot_dim, cfg.rope_parameters["rope_theta"], interleaved)
            _close(cache[f"rot_{role}", layer], want)  # rotary lanes and the pass-through lanes
        q = cache["rot_q", layer].transpose(1, 2)
        k = cache["rot_k", layer].transpose(1, 2).repeat_interleave(rep, dim=1)
        scores = q @ k.transpose(-1, -2) * d ** -0.5
        got = cache["attn_scores", layer]
        _close(got[..., allowed], scores[..., allowed])
        assert (got[..., ~allowed] < -1e30).all()


# ------------------------------------------------------------------------------------------------- block shapes
def test_glm4_sandwich_norms_are_attn_out_and_mlp_out():
    _, ref, gm = traced("glm4")
    ids = tokens(2, 7)
    names = ["post_self_attn_layernorm", "post_attention_layernorm", "post_mlp_layernorm"]
    n = gm.dims["n_layers"]
    seen = _record(ref, [f"model.layers.{i}.{m}" for i in range(n) for m in names], ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    for i in range(n):
        layer = ref.model.layers[i]
        attn_in, attn_out = seen[f"model.layers.{i}.post_self_attn_layernorm"]
        mid, _ = seen[f"model.layers.{i}.post_attention_layernorm"]
        mlp_in, mlp_out = seen[f"model.layers.{i}.post_mlp_layernorm"]
        _close(cache["attn_out", i], attn_out)
        _close(cache["mlp_out", i], mlp_out)
        _close(cache["resid_mid", i], mid)
        _close(cache["resid_mid", i], cache["resid_pre", i] + cache["attn_out", i])
        _close(cache["resid_post", i], cache["resid_mid", i] + cache["mlp_out", i])
        for short, x, norm in (("ln1_post", attn_in, layer.post_self_attn_layernorm),
                               ("ln2_post", mlp_in, layer.post_mlp_layernorm)):
            scale = torch.sqrt(x.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
            _close(cache[f"blocks.{i}.{short}.hook_scale"], scale)
            _close(cache[f"blocks.{i}.{short}.hook_normalized"], x / scale)


@pytest.mark.parametrize("arch", ["stablelm", "stablelm_parallel"])
def test_stablelm_sequential_and_parallel_residual(arch):
    """Both configs: the spec follows use_parallel_residual; parallel blocks feed ln1's output to the MLP and sum
    resid_pre + attn_out + mlp_out."""
    model, ref, gm = traced(arch)
    parallel = model.config.use_parallel_residual
    assert gm.spec.parallel == parallel and (gm.spec.ln2 is None) == parallel
    ids = tokens(2, 7)
    n = gm.dims["n_layers"]
    seen = _record(ref, [f"model.layers.{i}{s}" for i in range(n) for s in (".input_layernorm", ".mlp")], ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    for i in range(n):
        x, ln1_out = seen[f"model.layers.{i}.input_layernorm"]
        norm = ref.model.layers[i].input_layernorm
        mean = x.mean(-1, keepdim=True)
        scale = torch.sqrt((x - mean).pow(2).mean(-1, keepdim=True) + norm.eps)
        _close(cache[f"blocks.{i}.ln1.hook_scale"], scale)
        _close(cache[f"blocks.{i}.ln1.hook_normalized"] * norm.weight + norm.bias, ln1_out)
        if parallel:
            _close(seen[f"model.layers.{i}.mlp"][0], ln1_out)
            _close(cache["resid_post", i], cache["resid_pre", i] + cache["attn_out", i] + cache["mlp_out", i])
        else:
            _close(cache["resid_post", i], cache["resid_mid", i] + cache["mlp_out", i])
            _close(cache["resid_mid", i], cache["resid_pre", i] + cache["attn_out", i])


@pytest.mark.parametrize("arch, act", [
    ("persimmon", lambda x: torch.relu(x) ** 2),
    ("starcoder2", lambda x: F.gelu(x, approximate="tanh")),
])
def test_non_gated_mlp_activation(arch, act):
    _, ref, gm = traced(arch)
    ids = tokens(2, 6)
    out = gm.spec.layer(1, f"{gm.spec.mlp}.{gm.spec.mlp_out}")
    seen = _record(ref, [out], ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    _close(cache["post", 1], act(cache["pre", 1]))
    _close(cache["post", 1], seen[out][0])


# ------------------------------------------------------------------------------------- other configs, meta device
VARIANTS = {  # each family's other settings: the spec must follow the config, not the tiny one
    "phi3_full_rotary_mha": ("phi3", dict(num_key_value_heads=4,
                                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0})),
    "glm_no_bias_mqa": ("glm", dict(attention_bias=False, num_key_value_heads=1)),
    "glm4_full_rotary_tied": ("glm4", dict(tie_word_embeddings=True,
                                           rope_parameters={"rope_type": "default", "rope_theta": 500.0})),
    "starcoder2_no_bias_untied": ("starcoder2", dict(use_bias=False, tie_word_embeddings=False,
                                                     sliding_window=None)),
    "stablelm_parallel_qk_norm": ("stablelm", dict(use_parallel_residual=True, use_qkv_bias=False)),
    "persimmon_no_qk_norm": ("persimmon", dict(qk_layernorm=False)),
}


@pytest.mark.slow  # more configs of the same families: pytest -m slow
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_other_configs_of_each_family_match_hf(variant):
    arch, changes = VARIANTS[variant]
    config = CONFIGS[arch]()
    for key, value in changes.items():
        setattr(config, key, value)
    model = build_from_config(config)
    ref = eager_reference(model)
    gm = bridge.trace(model)
    ids, mask = left_padded(3, 8, pads=[0, 2, 5])
    with torch.no_grad():
        _close(gm(ids), ref(ids).logits)
        got, want = gm(ids, attention_mask=mask), ref(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got - want)[keep].abs().max().item() < TOL
    _, _, tiny_gm = traced(arch if arch != "stablelm" else "stablelm_parallel")  # both parallel: no resid_mid, ln2
    assert set(gm.hook_dict) == set(tiny_gm.hook_dict)


@pytest.mark.slow  # more configs of the same families: pytest -m slow
@pytest.mark.parametrize("arch", ["phi3", "glm4", "persimmon"])
def test_meta_device_trace_has_the_real_device_hooks(arch):
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(CONFIGS[arch]())
    gm = bridge.trace(model.eval())
    _, _, real = traced(arch)
    assert list(gm.hook_dict) == list(real.hook_dict)
    assert str(gm.hook_table()) == str(real.hook_table())
