"""DeepSeek V2 / V3 (multi-head latent attention + MoE): each MLA hook checked against HF's own modules (forward hooks
on the eager reference) or against what HF's attention function receives (a recording attention implementation).

The generic parity / hook / intervention tests run on these tiny configs too (tests/tiny_mla.py); this file checks
where each hook sits and that edits reach HF's computation.
"""
import contextlib
import copy

import pytest
import torch
from transformers.masking_utils import AttentionMaskInterface, eager_mask
from transformers.modeling_utils import AttentionInterface

import fxbridge as bridge
from conftest import arch_params, traced
from tiny import CONFIGS, build_from_config, eager_reference, forward_hooks, left_padded, tokens

TOL = 1e-5
MLA = ["deepseek_v2", "deepseek_v3"]
_RECORD = "fxbridge_test_record"
_SEEN: dict = {}


def _record_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """HF's eager attention, keeping what it receives; ``_SEEN["edit"]`` (if set) edits (q, k, v) first."""
    edit = _SEEN.get("edit")
    if edit is not None:
        query, key, value = edit(module.layer_idx, query.clone(), key.clone(), value.clone())
    _SEEN.setdefault("calls", {})[module.layer_idx] = (query, key, value)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    z = torch.matmul(pattern, value).transpose(1, 2).contiguous()
    _SEEN["calls"][module.layer_idx] += (z,)
    return z, pattern


AttentionInterface.register(_RECORD, _record_attention)
AttentionMaskInterface.register(_RECORD, eager_mask)  # the additive mask HF's eager attention gets


@contextlib.contextmanager
def recording(ref, edit=None):
    """Run ``ref`` through the recording attention (HF's eager computation); yields the {layer: (q, k, v, z)} seen."""
    configs = {id(m.config): m.config for m in ref.modules() if getattr(m, "config", None) is not None}
    saved = {k: c._attn_implementation for k, c in configs.items()}
    _SEEN.clear()
    _SEEN["edit"] = edit
    try:
        for c in configs.values():
            c._attn_implementation = _RECORD
        yield _SEEN.setdefault("calls", {})
    finally:
        for k, c in configs.items():
            c._attn_implementation = saved[k]
        _SEEN["edit"] = None


def _module_outputs(ref, ids, paths, mask=None):
    seen = {}
    pairs = [(ref.get_submodule(path), lambda mod, args, out, path=path: seen.__setitem__(path, out.detach().clone()))
             for path in paths]
    with torch.no_grad(), forward_hooks(*pairs):
        logits = ref(ids, attention_mask=mask).logits
    return seen, logits


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


@pytest.fixture(params=arch_params(MLA))
def mla(request):
    model, ref, gm = traced(request.param)
    gm.reset_hooks(including_permanent=True)
    yield model, ref, gm
    gm.reset_hooks(including_permanent=True)


def test_sizes_and_guard(mla):
    model, _, gm = mla
    cfg = model.config
    assert gm.dims["d_head"] == cfg.qk_nope_head_dim + cfg.qk_rope_head_dim == 16
    assert (gm.dims["d_head_v"], gm.dims["d_rope"], gm.dims["kv_lora_rank"], gm.dims["q_lora_rank"]) == (12, 8, 16, 24)


def test_latents_are_the_norm_outputs(mla):
    """hook_q_latent / hook_kv_latent equal HF's q_a_layernorm / kv_a_layernorm outputs, every layer, padded batch."""
    _, ref, gm = mla
    ids, mask = left_padded(3, 7, [0, 2, 4])
    n = gm.dims["n_layers"]
    paths = [f"model.layers.{i}.self_attn.{m}" for i in range(n) for m in ("q_a_layernorm", "kv_a_layernorm")]
    seen, logits = _module_outputs(ref, ids, paths, mask)
    with torch.no_grad():
        out, cache = gm.run_with_cache(ids, attention_mask=mask)
    assert _diff(out, logits) < TOL
    for i in range(n):
        assert _diff(cache[f"blocks.{i}.attn.hook_q_latent"], seen[f"model.layers.{i}.self_attn.q_a_layernorm"]) < TOL
        assert _diff(cache[f"blocks.{i}.attn.hook_kv_latent"], seen[f"model.layers.{i}.self_attn.kv_a_layernorm"]) < TOL


def test_q_k_v_per_head_are_hand_splits_of_the_projections(mla):
    """hook_q = q_b_proj's output per head (before RoPE); hook_k / hook_v = kv_b_proj's output per head split into
    [qk_nope, v_head]."""
    model, ref, gm = mla
    cfg = model.config
    dn, dqk, dv, H = cfg.qk_nope_head_dim, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.v_head_dim, 4
    ids = tokens(2, 6)
    b, s = ids.shape
    n = gm.dims["n_layers"]
    paths = [f"model.layers.{i}.self_attn.{m}" for i in range(n) for m in ("q_b_proj", "kv_b_proj")]
    seen, _ = _module_outputs(ref, ids, paths)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    for i in range(n):
        q = seen[f"model.layers.{i}.self_attn.q_b_proj"].reshape(b, s, H, dqk)
        kv = seen[f"model.layers.{i}.self_attn.kv_b_proj"].reshape(b, s, H, dn + dv)
        assert cache[f"blocks.{i}.attn.hook_q"].shape == (b, s, H, dqk)
        assert _diff(cache[f"blocks.{i}.attn.hook_q"], q) < TOL
        assert _diff(cache[f"blocks.{i}.attn.hook_k"], kv[..., :dn]) < TOL
        assert _diff(cache[f"blocks.{i}.attn.hook_v"], kv[..., dn:]) < TOL


def test_rotary_hooks_are_what_hf_attention_receives(mla):
    """hook_rot_q / hook_rot_k / hook_v / hook_z equal the query, key, value HF's attention function receives and
    what it returns; hook_k_rope [B,S,1,dr] is the shared rotary key part (after RoPE) of every head's key."""
    model, ref, gm = mla
    dn = model.config.qk_nope_head_dim
    ids, mask = left_padded(2, 7, [0, 3])
    with recording(ref) as calls, torch.no_grad():
        logits = ref(ids, attention_mask=mask).logits
    with torch.no_grad():
        out, cache = gm.run_with_cache(ids, attention_mask=mask)
    assert _diff(out, logits) < TOL
    for i, (q, k, v, z) in calls.items():
        assert _diff(cache[f"blocks.{i}.attn.hook_rot_q"], q.transpose(1, 2)) < TOL
        assert _diff(cache[f"blocks.{i}.attn.hook_rot_k"], k.transpose(1, 2)) < TOL
        assert _diff(cache[f"blocks.{i}.attn.hook_v"], v.transpose(1, 2)) < TOL
        assert _diff(cache[f"blocks.{i}.attn.hook_z"], z) < TOL
        assert cache[f"blocks.{i}.attn.hook_k_rope"].shape == (2, 7, 1, model.config.qk_rope_head_dim)
        for h in range(k.shape[1]):
            assert _diff(cache[f"blocks.{i}.attn.hook_k_rope"][:, :, 0], k[:, h, :, dn:]) < TOL
        # RoPE changed the rope part: hook_q's rope part differs from hook_rot_q's (position > 0)
        assert _diff(cache[f"blocks.{i}.attn.hook_q"][:, 1:, :, dn:], q.transpose(1, 2)[:, 1:, :, dn:]) > 1e-4
    assert len(calls) == gm.dims["n_layers"]


def test_an_edit_of_the_kv_latent_equals_the_same_edit_on_hf(mla):
    _, ref, gm = mla
    ids = tokens(2, 7)
    layer = 1

    def edit(t):
        t = t.clone()
        t[..., 3] = 0.0
        t[..., 5] *= 3.0
        return t

    latent_norm = ref.get_submodule(f"model.layers.{layer}.self_attn.kv_a_layernorm")
    with torch.no_grad(), forward_hooks((latent_norm, lambda mod, args, out: edit(out))):
        want = ref(ids).logits
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_kv_latent", lambda t, hook: edit(t))])
        clean = gm(ids)
    assert _diff(got, want) < TOL and _diff(got, clean) > 1e-4


def test_edits_of_the_shared_rope_key_and_of_one_heads_key(mla):
    """hook_k_rope reaches every head's key; an edit of one head's slice of hook_rot_k only that head's (the key
    HF writes by slice copies is one cat in the graph)."""
    model, ref, gm = mla
    dn = model.config.qk_nope_head_dim
    ids, layer, head = tokens(2, 7), 1, 2

    def rope_half(i, q, k, v):
        if i == layer:
            k[..., dn:] *= 0.5
        return q, k, v

    def one_head(i, q, k, v):
        if i == layer:
            k[:, head, :, dn:] = 0.0
        return q, k, v

    def zero_head_key(t, hook):
        t[:, :, head, dn:] = 0.0  # in place

    with torch.no_grad():
        clean = gm(ids)
        for edit, hooks in ((rope_half, [(f"blocks.{layer}.attn.hook_k_rope", lambda t, hook: t * 0.5)]),
                            (one_head, [(f"blocks.{layer}.attn.hook_rot_k", zero_head_key)])):
            with recording(ref, edit):
                want = ref(ids).logits
            got = gm.run_with_hooks(ids, fwd_hooks=hooks)
            assert _diff(got, want) < TOL and _diff(got, clean) > 1e-4, edit.__name__


@pytest.mark.slow
def test_v2_lite_without_a_query_lora():
    """q_lora_rank=None (DeepSeek-V2-Lite): q_proj, no hook_q_latent; hook_q is q_proj's output per head."""
    config = CONFIGS["deepseek_v2"]()
    config.q_lora_rank = None
    model = build_from_config(config)
    ref = eager_reference(model)
    gm = bridge.trace(model)
    assert not any(name.endswith("hook_q_latent") for name in gm.hook_dict)
    ids, mask = left_padded(3, 7, [0, 2, 4])
    seen, logits = _module_outputs(ref, ids, ["model.layers.1.self_attn.q_proj"], mask)
    with torch.no_grad():
        out, cache = gm.run_with_cache(ids, attention_mask=mask)
    assert _diff(out, logits) < TOL
    assert _diff(cache["blocks.1.attn.hook_q"], seen["model.layers.1.self_attn.q_proj"].reshape(3, 7, 4, 16)) < TOL


@pytest.mark.slow
def test_v3_rotate_half_rope_and_per_head_results():
    """rope_interleave=False (rotate-half RoPE) and use_attn_result=True: hook_result splits o_proj per value head
    (v_head_dim columns each, not the q/k head)."""
    config = CONFIGS["deepseek_v3"]()
    config.rope_interleave = False
    model = build_from_config(config)
    ref = eager_reference(model)
    gm = bridge.trace(model, use_attn_result=True)
    ids, mask = left_padded(3, 7, [0, 2, 4])
    with torch.no_grad():
        out, cache = gm.run_with_cache(ids, attention_mask=mask)
        assert _diff(out, ref(ids, attention_mask=mask).logits) < TOL
    W = model.model.layers[1].self_attn.o_proj.weight.view(64, 4, 12)  # [D, H, dv]
    by_hand = torch.einsum("bshd,Dhd->bshD", cache["blocks.1.attn.hook_z"], W)
    assert _diff(cache["blocks.1.attn.hook_result"], by_hand) < TOL
    assert _diff(cache["blocks.1.attn.hook_result"].sum(2), cache["blocks.1.hook_attn_out"]) < TOL


@pytest.mark.slow
@pytest.mark.parametrize("arch, n_layers, dense, sampled", [("deepseek_v3", 4, 1, 3), ("deepseek_v2", 7, 3, 5)])
def test_stitched_dense_then_moe_equals_full_capture(monkeypatch, arch, n_layers, dense, sampled):
    """Dense first layers then MoE layers: the stitched capture (two layer kinds; a prefix where
    first_k_dense_replace > 1) gives the full capture's graph and values."""
    from fxbridge.tracer import capture
    config = CONFIGS[arch]()
    config.num_hidden_layers, config.first_k_dense_replace = n_layers, dense
    model = build_from_config(config)
    ref = eager_reference(model)
    captured = capture(model, layers="model.layers")
    assert captured.notes[0].startswith(f"stitched: captured {sampled} of {n_layers} layers (2 layer kinds)")
    stitched = bridge.trace(model)
    monkeypatch.setenv("FXBRIDGE_STITCH", "0")
    full = bridge.trace(model)
    assert list(stitched.hook_dict) == list(full.hook_dict)
    ids, mask = left_padded(3, 9, [0, 2, 5])
    with torch.no_grad():
        a, b = stitched(ids, attention_mask=mask), full(ids, attention_mask=mask)
        expected = ref(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert _diff(a[mask.bool()], expected[mask.bool()]) < TOL


# ------------------------------------------------------------------------------------------------ MoE layers
def _moe_layers(model):
    return [i for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "experts")]


def test_dense_first_layer_and_moe_layers_get_their_own_hooks(mla):
    model, _, gm = mla
    moe = _moe_layers(model)
    assert moe == [1, 2] and model.config.first_k_dense_replace == 1
    names = set(gm.hook_dict)
    routing = ["mlp.hook_router_logits", "mlp.hook_expert_indices", "mlp.hook_routing_weights",
               "mlp.hook_expert_out", "mlp.hook_shared_out"]
    dense = ["mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"]
    for i in range(gm.dims["n_layers"]):
        want, absent = (routing, dense) if i in moe else (dense, routing)
        assert all(f"blocks.{i}.{h}" in names for h in want), i
        assert not any(f"blocks.{i}.{h}" in names for h in absent), i


def test_routing_hooks_equal_hf_router_and_experts(mla):
    """Router logits, chosen experts and routing weights (after the family's normalisation and
    routed_scaling_factor) equal what HF's router returns; the shared experts' and the block's outputs equal HF's."""
    model, ref, gm = mla
    ids, mask = left_padded(2, 6, [0, 2])
    b, s = ids.shape
    seen, handles = {}, []
    for i in _moe_layers(ref):
        mlp = ref.model.layers[i].mlp
        handles.append(mlp.gate.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("gate", i), out)))
        handles.append(mlp.shared_experts.register_forward_hook(
            lambda m, a, out, i=i: seen.__setitem__(("shared", i), out)))
        handles.append(mlp.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(("mlp", i), out)))
    try:
        with torch.no_grad():
            logits = ref(ids, attention_mask=mask).logits
            out, cache = gm.run_with_cache(ids, attention_mask=mask)
    finally:
        for h in handles:
            h.remove()
    assert _diff(out, logits) < TOL
    for i in _moe_layers(ref):
        router_logits, weights, indices = seen[("gate", i)]
        assert _diff(cache[f"blocks.{i}.mlp.hook_router_logits"], router_logits.view(b, s, -1)) < TOL
        assert torch.equal(cache[f"blocks.{i}.mlp.hook_expert_indices"], indices.view(b, s, -1))
        assert _diff(cache[f"blocks.{i}.mlp.hook_routing_weights"], weights.view(b, s, -1)) < TOL
        assert _diff(cache[f"blocks.{i}.mlp.hook_shared_out"], seen[("shared", i)]) < TOL
        assert _diff(cache[f"blocks.{i}.hook_mlp_out"], seen[("mlp", i)]) < TOL
        slots = cache[f"blocks.{i}.mlp.hook_expert_out"]
        assert slots.shape == (b, s, 2, 64)
        assert _diff(slots.sum(2) + cache[f"blocks.{i}.mlp.hook_shared_out"], seen[("mlp", i)]) < TOL


def _expert(experts, e: int, x):
    """Expert ``e`` of HF's fused experts module on token rows x, from its weights."""
    gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
    return torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e])


def test_zeroing_one_slot_removes_that_experts_contribution_at_that_token(mla):
    model, ref, gm = mla
    ids, layer, (bi, si), slot = tokens(2, 6), 2, (1, 3), 1
    b, s = ids.shape
    experts = ref.model.layers[layer].mlp.experts
    routed = {}

    def remove(mod, args, out):
        x, idx, w = args
        t = bi * s + si
        e = int(idx[t, slot])
        routed["expert"] = e
        out = out.clone()
        out[t] -= w[t, slot] * _expert(experts, e, x[t])
        return out

    handle = experts.register_forward_hook(remove)
    try:
        with torch.no_grad():
            want = ref(ids).logits
    finally:
        handle.remove()

    def zero_slot(t, hook):
        t[bi, si, slot] = 0.0

    with torch.no_grad():
        got, cache = gm.run_with_cache(ids, names_filter=[f"blocks.{layer}.mlp.hook_expert_indices"])
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.mlp.hook_expert_out", zero_slot)])
        clean = gm(ids)
    assert _diff(got, want) < TOL and _diff(got, clean) > 1e-5
    assert int(cache[f"blocks.{layer}.mlp.hook_expert_indices"][bi, si, slot]) == routed["expert"]


def test_an_edit_of_the_routing_weights_takes_effect(mla):
    model, ref, gm = mla
    ids, layer = tokens(2, 6), 1
    router = ref.model.layers[layer].mlp.gate
    boost_first = (router, lambda m, a, out: (out[0], out[1] * torch.tensor([2.0, 0.0]), out[2]))
    with torch.no_grad(), forward_hooks(boost_first):
        want = ref(ids).logits
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.mlp.hook_routing_weights",
                                                 lambda t, hook: t * torch.tensor([2.0, 0.0]))])
        clean = gm(ids)
    assert _diff(got, want) < TOL and _diff(got, clean) > 1e-4
