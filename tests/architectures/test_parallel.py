"""Parallel-block families (architectures/parallel.py) against HF eager and hand computation: fused-QKV splits
(NeoX per head, CodeGen's 4 blocks of [q | v | k]), partial / interleaved rotary in hook_rot_q/k, the parallel and
sequential residual sums, the hand-written Cohere LayerNorm, Cohere's logit_scale (hook_unembed / hook_logits)
and Cohere 2's NoPE layers."""
import pytest
import torch
from einops import rearrange

from conftest import traced
from fxbridge.passes.qkv_layouts import split_eager
from tiny import left_padded, tokens

TOL = 1e-5
PARALLEL = ["gpt_neox", "gptj", "codegen", "phi", "phi_qk_norm", "cohere", "cohere_qk_norm", "cohere2"]


def _capture(ref, paths, fn):
    """Run ``fn()`` with forward hooks recording the outputs of the HF modules at ``paths``."""
    out, handles = {}, []
    for key, path in paths.items():
        handles.append(ref.get_submodule(path).register_forward_hook(
            lambda mod, args, o, key=key: out.__setitem__(key, o[0] if isinstance(o, tuple) else o)))
    try:
        with torch.no_grad():
            fn()
    finally:
        for h in handles:
            h.remove()
    return out


# -- fused QKV, split by hand from HF's documented code -------------------------------------------------------------
def _split_by_hand(arch, fused, H, d):
    if arch == "codegen":  # HF: view(B, S, mp_num=4, 3 * local_dim).split(local_dim) -> query, value, key
        q, v, k = rearrange(fused, "b s (m three r d) -> three b s (m r) d", m=4, three=3, d=d)
        return q, k, v
    return tuple(rearrange(fused, "b s (h three d) -> three b s h d", three=3, d=d))  # NeoX: view(B,S,H,3*dh).chunk


@pytest.mark.parametrize("arch,qkv", [("gpt_neox", "attention.query_key_value"), ("codegen", "attn.qkv_proj")])
def test_fused_qkv_hooks_equal_the_hand_split(arch, qkv):
    _, ref, gm = traced(arch)
    H, d, n = gm.dims["n_heads"], gm.dims["d_head"], gm.dims["n_layers"]
    ids = tokens(2, 7)
    names = ("hook_q", "hook_k", "hook_v")
    cache = {}
    fused = _capture(ref, {i: gm.spec.layer(i, qkv) for i in range(n)}, lambda: (
        ref(ids), cache.update(gm.run_with_cache(ids, names_filter=lambda x: x.split(".")[-1] in names)[1])))
    for i in range(n):
        for name, want in zip(names, _split_by_hand(arch, fused[i], H, d)):
            got = cache[f"blocks.{i}.attn.{name}"]
            assert got.shape == want.shape == (2, 7, H, d)
            assert (got - want).abs().max().item() < TOL, (arch, i, name)


def test_blocks_layout_is_codegen_order():
    H, d = 8, 3
    x = torch.arange(2 * 3 * H * d, dtype=torch.float64).reshape(1, 2, -1)
    parts = split_eager(x, "blocks:4:qvk", H, H, d)
    want_q, want_v, want_k = rearrange(x, "b s (m three r d) -> three b s (m r) d", m=4, three=3, d=d)
    for role, want in zip("qkv", (want_q, want_k, want_v)):
        assert torch.equal(parts[role], want), role
    for bad in ("blocks:3:qvk", "blocks:4:qqk", "blocks:4"):  # 8 heads in 3 blocks; not q, k, v; no order
        with pytest.raises(ValueError):
            split_eager(x, bad, H, H, d)


def test_codegen_left_padded_layers_match_hf():
    """TransformerBridge fails outright on CodeGen with a left-padded batch; every layer output here is HF's."""
    _, ref, gm = traced("codegen")
    ids, mask = left_padded(3, 9, pads=[0, 2, 5])
    with torch.no_grad():
        hf = ref(ids, attention_mask=mask, output_hidden_states=True)
        logits, cache = gm.run_with_cache(ids, attention_mask=mask, names_filter=lambda n: "resid_post" in n)
    keep = mask.bool()
    assert (logits - hf.logits)[keep].abs().max().item() < TOL
    for i in range(gm.dims["n_layers"] - 1):  # HF's last hidden state is after ln_f
        assert (cache["resid_post", i] - hf.hidden_states[i + 1])[keep].abs().max().item() < TOL


# -- rotary, by hand -----------------------------------------------------------------------------------------------
def _rotate(x, rot_dim, base, interleaved):
    """RoPE on the first ``rot_dim`` dims of each head of x [B,S,H,dh] at positions 0..S-1, the rest passed."""
    S = x.shape[1]
    inv = 1.0 / (base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim))
    ang = torch.arange(S, dtype=torch.float64)[:, None] * inv  # [S, rot_dim/2]
    cos, sin = (f(ang)[None, :, None, :] for f in (torch.cos, torch.sin))
    r, rest = x[..., :rot_dim].double(), x[..., rot_dim:]
    if interleaved:  # pairs (2j, 2j+1) rotated by angle j (GPT-J rotate_every_two, Cohere)
        a, b = r[..., 0::2], r[..., 1::2]
        out = torch.stack((a * cos - b * sin, b * cos + a * sin), dim=-1).flatten(-2)
    else:  # halves (j, j + rot_dim/2) rotated by angle j (NeoX, Phi rotate_half)
        a, b = r[..., : rot_dim // 2], r[..., rot_dim // 2:]
        out = torch.cat((a * cos - b * sin, b * cos + a * sin), dim=-1)
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def _rope_facts(arch, config, d_head):
    if arch in ("gptj", "codegen"):
        return config.rotary_dim, 10000.0, True
    rope = config.rope_parameters
    rot = int(d_head * rope.get("partial_rotary_factor", 1.0))
    return rot, rope["rope_theta"], arch.startswith("cohere")


@pytest.mark.parametrize("arch", ["gpt_neox", "gpt_neox_seq", "gptj", "codegen", "phi", "cohere", "cohere2"])
def test_rot_hooks_are_the_full_head_after_partial_or_interleaved_rotary(arch):
    model, _, gm = traced(arch)
    rot, base, interleaved = _rope_facts(arch, model.config, gm.dims["d_head"])
    ids = tokens(2, 7)
    _, cache = gm.run_with_cache(ids)
    for i in range(gm.dims["n_layers"]):
        if f"blocks.{i}.attn.hook_rot_q" not in gm.hook_dict:  # Cohere 2's full layers (checked below)
            assert arch == "cohere2" and model.config.layer_types[i] == "full_attention"
            continue
        for x in ("q", "k"):
            pre, got = cache[f"blocks.{i}.attn.hook_{x}"], cache[f"blocks.{i}.attn.hook_rot_{x}"]
            assert got.shape == pre.shape  # the whole head, not only its rotated part
            assert (got - _rotate(pre, rot, base, interleaved)).abs().max().item() < TOL, (arch, i, x)
            if rot < pre.shape[-1]:
                assert torch.equal(got[..., rot:], pre[..., rot:])
            assert (got[:, 1:, :, :rot] - pre[:, 1:, :, :rot]).abs().max().item() > 1e-3  # really rotated


def test_cohere2_full_layers_have_no_positions():
    model, _, gm = traced("cohere2")
    nope = tuple(i for i, t in enumerate(model.config.layer_types) if t == "full_attention")
    assert nope == (1,)
    assert "blocks.1.attn.hook_rot_q" not in gm.hook_dict and "blocks.0.attn.hook_rot_q" in gm.hook_dict
    # a NoPE layer's keys are hook_k unchanged: editing hook_k of layer 1 equals editing what HF's attention reads
    ids = tokens(1, 6)
    _, ref, _ = traced("cohere2")
    k_proj = ref.get_submodule(gm.spec.layer(1, "self_attn.k_proj"))
    handle = k_proj.register_forward_hook(lambda m, a, o: o * 2.0)
    try:
        with torch.no_grad():
            expected = ref(ids).logits
    finally:
        handle.remove()
    got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_k", lambda t, hook: t * 2.0)])
    assert (got - expected).abs().max().item() < TOL


# -- residual sums -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", PARALLEL)
def test_parallel_block_resid_post_is_pre_plus_attn_plus_mlp(arch):
    _, _, gm = traced(arch)
    assert gm.spec.parallel
    _, cache = gm.run_with_cache(tokens(2, 5))
    for i in range(gm.dims["n_layers"]):
        assert f"blocks.{i}.hook_resid_mid" not in cache
        total = cache["resid_pre", i] + cache["attn_out", i] + cache["mlp_out", i]
        assert (cache["resid_post", i] - total).abs().max().item() < TOL


def test_neox_sequential_residual():
    _, _, gm = traced("gpt_neox_seq")
    assert not gm.spec.parallel
    _, cache = gm.run_with_cache(tokens(2, 5))
    for i in range(gm.dims["n_layers"]):
        assert (cache["resid_mid", i] - cache["resid_pre", i] - cache["attn_out", i]).abs().max().item() < TOL
        assert (cache["resid_post", i] - cache["resid_mid", i] - cache["mlp_out", i]).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["gptj", "phi", "cohere"])
def test_one_norm_feeds_attention_and_mlp(arch):
    """Scaling ln1's output scales what both branches read: equal to HF with the norm weight (and bias) scaled."""
    _, ref, gm = traced(arch)
    ids = tokens(1, 6)
    ln = ref.get_submodule(gm.spec.layer(0, gm.spec.ln1))
    handle = ln.register_forward_hook(lambda m, a, o: o * 1.5)
    try:
        with torch.no_grad():
            expected = ref(ids).logits
    finally:
        handle.remove()
    w = ln.weight.detach()  # ln1.hook_normalized is before the weight: x1.5 there is x1.5 of (y - bias)
    b = getattr(ln, "bias", None)
    extra = 0.0 if b is None else 0.5 * b.detach()

    def edit(t, hook):
        return t * 1.5 + (extra / w if b is not None else 0.0)
    got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.ln1.hook_normalized", edit)])
    assert (got - expected).abs().max().item() < 1e-4


# -- the hand-written Cohere LayerNorm -----------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["cohere", "cohere2"])
def test_cohere_layernorm_hooks_equal_hand_computation(arch):
    model, ref, gm = traced(arch)
    eps = model.config.layer_norm_eps
    ids = tokens(2, 6)
    hf = _capture(ref, {i: gm.spec.layer(i, "input_layernorm") for i in range(gm.dims["n_layers"])},
                  lambda: ref(ids))
    _, cache = gm.run_with_cache(ids)
    for i in range(gm.dims["n_layers"]):
        x = cache["resid_pre", i].double()
        centred = x - x.mean(-1, keepdim=True)
        scale = (centred.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        assert (cache[f"blocks.{i}.ln1.hook_scale"] - scale).abs().max().item() < TOL
        normalized = cache[f"blocks.{i}.ln1.hook_normalized"]
        assert (normalized - centred / scale).abs().max().item() < TOL
        weight = ref.get_submodule(gm.spec.layer(i, "input_layernorm")).weight
        assert (normalized * weight - hf[i]).abs().max().item() < TOL


@pytest.mark.parametrize("arch", ["cohere", "phi", "gpt_neox"])
def test_editing_the_final_norm_scale_takes_effect(arch):
    """Doubling ln_final.hook_scale halves the normalized value: HF with the final norm's weight halved."""
    _, ref, gm = traced(arch)
    ids = tokens(1, 6)
    norm = ref.get_submodule(gm.spec.final_norm)
    with torch.no_grad():
        norm.weight.mul_(0.5)
        try:
            expected = ref(ids).logits
        finally:
            norm.weight.mul_(2.0)
    got = gm.run_with_hooks(ids, fwd_hooks=[("ln_final.hook_scale", lambda t, hook: t * 2.0)])
    assert (got - expected).abs().max().item() < TOL


# -- Cohere logit_scale --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["cohere", "cohere2"])
def test_cohere_logit_scale_hooks(arch):
    model, ref, gm = traced(arch)
    scale = model.config.logit_scale
    assert scale == 0.25
    ids = tokens(2, 5)
    cache = {}
    hf = _capture(ref, {"head": "lm_head"}, lambda: cache.update(
        logits=ref(ids).logits, gm=gm.run_with_cache(ids, names_filter=["hook_unembed", "hook_logits"])))
    out, c = cache["gm"]
    assert (c["hook_unembed"] - hf["head"]).abs().max().item() < TOL  # the lm_head output, unscaled
    assert (c["hook_logits"] - hf["head"] * scale).abs().max().item() < TOL
    assert torch.equal(out, c["hook_logits"]) and (out - cache["logits"]).abs().max().item() < TOL
    # an edit of hook_unembed reaches the output through the scale; one of hook_logits is the output
    bumped = gm.run_with_hooks(ids, fwd_hooks=[("hook_unembed", lambda t, hook: t + 1.0)])
    assert (bumped - (out + scale)).abs().max().item() < TOL
    zeroed = gm.run_with_hooks(ids, fwd_hooks=[("hook_logits", lambda t, hook: torch.zeros_like(t))])
    assert torch.equal(zeroed, torch.zeros_like(out))


def test_a_logit_scale_unlike_the_config_is_refused(monkeypatch):
    import fxbridge as bridge
    from fxbridge.errors import PatternNotFound
    from tiny import build
    # a full capture: the depth-flat one rebuilds the model from its config (see the report on stitch.shallow_model)
    monkeypatch.setenv("FXBRIDGE_STITCH", "0")
    model = build("cohere")
    model.config.logit_scale = 0.5  # the module still multiplies by 0.25
    with pytest.raises(PatternNotFound, match="logit_scale"):
        bridge.trace(model)
