"""DiffLlama (differential attention) and JetMoE (mixture of attention heads, MoE MLP): each hook of these families
checked against HF eager -- its modules' inputs / outputs (forward hooks on the reference) or values computed by
hand from HF's weights -- and edits through the hooks against the same edit made on HF.

The generic parity (plain and left-padded), hook-contract and head-ablation tests run on these tiny configs too
(tests/tiny_diffattn.py); this file checks where each family-specific hook sits and that its edits take effect.
"""
import pytest
import torch
import torch.nn.functional as F
import transformers.models.diffllama.modeling_diffllama as hf_diff

from conftest import traced
from tiny import tokens

TOL = 1e-5


def _diff(a, b) -> float:
    return (a - b).abs().max().item()


def _record(ref, paths, ids, *, pre=False, **kw):
    """HF eager forward with hooks on ``paths``: {path: first input (pre) or output}; and HF's output."""
    seen, handles = {}, []
    for path in paths:
        module = ref.get_submodule(path)
        if pre:
            handles.append(module.register_forward_pre_hook(lambda m, a, path=path: seen.__setitem__(path, a[0])))
        else:
            handles.append(module.register_forward_hook(lambda m, a, o, path=path: seen.__setitem__(path, o)))
    try:
        with torch.no_grad():
            out = ref(ids, **kw)
    finally:
        for h in handles:
            h.remove()
    return seen, out


# ---------------------------------------------------------------- DiffLlama


@pytest.fixture(scope="module")
def diff():
    return traced("diffllama")


def _lambda(attn) -> torch.Tensor:
    """HF's lambda_full by hand from the layer's parameters."""
    with torch.no_grad():
        return (torch.exp((attn.lambda_q1 * attn.lambda_k1).sum()) - torch.exp((attn.lambda_q2 * attn.lambda_k2).sum())
                + attn.lambda_init)


def test_diffllama_maps_lambda_difference_and_z_where_hf_computes_them(diff):
    _, ref, gm = diff
    ids = tokens(2, 7)
    layers = range(gm.dims["n_layers"])
    paths = [f"model.layers.{i}.self_attn.{m}" for i in layers for m in ("groupnorm", "o_proj")]
    seen, out = _record(ref, paths, ids, pre=True, output_attentions=True)
    with torch.no_grad():
        logits, cache = gm.run_with_cache(ids)
    assert _diff(logits, out.logits) < TOL
    H, dh = gm.dims["n_heads"], gm.dims["d_head"]
    for i in layers:
        attn = ref.model.layers[i].self_attn
        pattern = out.attentions[i]  # HF returns the first call's softmax maps, all H heads [B,H,S,S]
        assert _diff(cache["pattern", i], pattern) < TOL
        lam = _lambda(attn)
        assert _diff(cache[f"blocks.{i}.attn.hook_lambda"], lam.reshape(1)) < TOL
        assert abs(lam.item() - attn.lambda_init) > 1e-3  # lambda's learned part matters in this config
        expected = pattern[:, : H // 2] - lam * pattern[:, H // 2:]
        assert _diff(cache[f"blocks.{i}.attn.hook_diff_pattern"], expected) < TOL
        d = seen[f"model.layers.{i}.self_attn.groupnorm"]  # z1 - lambda * z2, [B,S,H/2,2dh]
        assert d.shape == (2, 7, H // 2, 2 * dh)
        assert _diff(cache[f"blocks.{i}.attn.hook_diff"], d) < TOL
        z_in = seen[f"model.layers.{i}.self_attn.o_proj"]
        assert _diff(cache["z", i], z_in.unflatten(-1, (H, dh))) < TOL


def _hf_with_attention_edit(ref, ids, edit_weights=None, edit_groupnorm_input=None):
    """HF eager logits with the softmax maps edited in both attention calls (``edit_weights(layer, w)``) and / or
    the group norm's input replaced (``edit_groupnorm_input(layer, d, z)``, z = cat of the two calls' outputs)."""
    calls: dict[int, list] = {}
    original = hf_diff.eager_attention_forward

    def eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        k = hf_diff.repeat_kv(key, module.num_key_value_groups)
        v = hf_diff.repeat_kv(value, module.num_key_value_groups)
        w = torch.matmul(query, k.transpose(2, 3)) * scaling
        if attention_mask is not None:
            w = w + attention_mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(query.dtype)
        if edit_weights is not None:
            w = edit_weights(module.layer_idx, w)
        o = torch.matmul(w, v).transpose(1, 2).contiguous()
        calls.setdefault(module.layer_idx, []).append(o)
        return o, w

    handles = []
    if edit_groupnorm_input is not None:
        for i, layer in enumerate(ref.model.layers):
            def pre(m, args, i=i):
                return (edit_groupnorm_input(i, args[0], torch.cat(calls[i][-2:], dim=-1)),)
            handles.append(layer.self_attn.groupnorm.register_forward_pre_hook(pre))
    hf_diff.eager_attention_forward = eager
    try:
        with torch.no_grad():
            return ref(ids).logits
    finally:
        hf_diff.eager_attention_forward = original
        for h in handles:
            h.remove()


def test_diffllama_editing_one_map_equals_the_edit_in_hf(diff):
    """Zero the second map of differential head 0 in layer 1 (query head H/2): the same edit of HF's softmax
    weights in both of its attention calls."""
    _, ref, gm = diff
    ids, H = tokens(2, 7), gm.dims["n_heads"]

    def edit(w):
        w = w.clone()
        w[:, H // 2] = 0.0
        return w

    expected = _hf_with_attention_edit(ref, ids, edit_weights=lambda i, w: edit(w) if i == 1 else w)
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_pattern", lambda p, hook: edit(p))])
        clean = gm(ids)
    assert _diff(got, expected) < TOL
    assert _diff(got, clean) > 1e-4


def test_diffllama_editing_the_difference_equals_the_edit_in_hf(diff):
    """Set differential head 0's difference map to its first map alone (drop lambda * A_2): HF's group norm then
    reads z1 (the first map times the values) for that head."""
    _, ref, gm = diff
    ids, H = tokens(2, 7), gm.dims["n_heads"]
    cache = {}

    def keep_pattern(p, hook):
        cache["p"] = p

    def first_map_only(d, hook):
        d = d.clone()
        d[:, 0] = cache["p"][:, 0]
        return d

    def hf_edit(i, d, z):
        if i != 0:
            return d
        d = d.clone()
        d[:, :, 0] = z[:, :, 0]
        return d

    expected = _hf_with_attention_edit(ref, ids, edit_groupnorm_input=hf_edit)
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", keep_pattern),
                                                ("blocks.0.attn.hook_diff_pattern", first_map_only)])
        clean = gm(ids)
    assert _diff(got, expected) < TOL
    assert _diff(got, clean) > 1e-4


def test_diffllama_editing_lambda_takes_effect(diff):
    """lambda = 0 in layer 0: every differential head reads only its first map (HF: group norm input = z1)."""
    _, ref, gm = diff
    ids, H = tokens(2, 7), gm.dims["n_heads"]
    expected = _hf_with_attention_edit(ref, ids, edit_groupnorm_input=lambda i, d, z: z[:, :, : H // 2] if i == 0
                                       else d)
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_lambda", lambda t, hook: torch.zeros_like(t))])
    assert _diff(got, expected) < TOL
    assert _diff(got, gm(ids)) > 1e-4


# ---------------------------------------------------------------- JetMoE


@pytest.fixture(scope="module")
def jet():
    return traced("jetmoe")


def _gating(router, x):
    """HF's JetMoeTopKGating by hand: logits [N,E], chosen experts [N,K], gates (softmax of the top-K logits)."""
    logits = F.linear(x, router.layer.weight)
    top, idx = logits.topk(router.top_k, dim=-1)
    return logits, idx, torch.softmax(top, dim=-1)


def _mlp_slots(mlp, x, idx, gates):
    """Each slot's weighted expert output by hand from the experts' weights: [N,K,D]."""
    slots = torch.zeros(*idx.shape, x.shape[-1])
    for t in range(idx.shape[0]):
        for k in range(idx.shape[1]):
            e = idx[t, k]
            gate, up = F.linear(x[t], mlp.input_linear.weight[e]).chunk(2, dim=-1)
            slots[t, k] = gates[t, k] * F.linear(mlp.activation(gate) * up, mlp.output_linear.weight[e])
    return slots


def test_jetmoe_mlp_routing_and_slots_by_hand(jet):
    _, ref, gm = jet
    B, S = 2, 7
    ids = tokens(B, S)
    n = gm.dims["n_layers"]
    paths = [f"model.layers.{i}.{m}" for i in range(n) for m in ("post_attention_layernorm", "mlp")]
    seen, out = _record(ref, paths, ids)
    with torch.no_grad():
        logits, cache = gm.run_with_cache(ids)
    assert _diff(logits, out.logits) < TOL
    for i in range(n):
        mlp = ref.model.layers[i].mlp
        x = seen[f"model.layers.{i}.post_attention_layernorm"].reshape(B * S, -1)
        with torch.no_grad():
            l, idx, g = _gating(mlp.router, x)
            slots = _mlp_slots(mlp, x, idx, g)
        assert _diff(cache[f"blocks.{i}.mlp.hook_router_logits"], l.view(B, S, -1)) < TOL
        assert torch.equal(cache[f"blocks.{i}.mlp.hook_expert_indices"], idx.view(B, S, -1))
        assert cache[f"blocks.{i}.mlp.hook_expert_indices"].dtype == torch.int64
        assert _diff(cache[f"blocks.{i}.mlp.hook_routing_weights"], g.view(B, S, -1)) < TOL
        assert _diff(cache[f"blocks.{i}.mlp.hook_expert_out"], slots.view(B, S, 2, -1)) < TOL
        assert _diff(cache["mlp_out", i], seen[f"model.layers.{i}.mlp"]) < TOL
        assert _diff(cache["mlp_out", i], slots.sum(1).view(B, S, -1) + mlp.bias) < TOL


def _hf_minus_mlp_slot(ref, ids, layer, slot):
    """HF logits with slot ``slot``'s expert contribution removed from layer ``layer``'s MLP (computed by hand)."""
    mlp = ref.model.layers[layer].mlp

    def remove(m, args, out):
        x = args[0].reshape(-1, args[0].shape[-1])
        _, idx, g = _gating(mlp.router, x)
        return out - _mlp_slots(mlp, x, idx, g)[:, slot].view(out.shape)

    handle = mlp.register_forward_hook(remove)
    try:
        with torch.no_grad():
            return ref(ids).logits
    finally:
        handle.remove()


@pytest.mark.parametrize("hook", ["hook_routing_weights", "hook_expert_out"])
def test_jetmoe_mlp_zeroing_a_slot_equals_hf_without_that_expert(jet, hook):
    _, ref, gm = jet
    ids = tokens(2, 7)
    expected = _hf_minus_mlp_slot(ref, ids, layer=1, slot=1)

    def zero_slot(t, hook):
        t[:, :, 1] = 0.0

    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.1.mlp.{hook}", zero_slot)])
    assert _diff(got, expected) < TOL
    assert _diff(got, gm(ids)) > 1e-4


def test_jetmoe_attention_hooks_where_hf_computes_them(jet):
    """The attention router, the query experts by hand from their weights, k / v from kv_proj, the pattern HF
    returns, and each slot's weighted output projection rebuilt from the rows HF's output experts read."""
    _, ref, gm = jet
    B, S = 2, 7
    ids = tokens(B, S)
    n, K, Hkv, dh = gm.dims["n_layers"], gm.dims["top_k"], gm.dims["n_kv_heads"], gm.dims["d_head"]
    paths = [f"model.layers.{i}.{m}" for i in range(n) for m in
             ("input_layernorm", "self_attention", "self_attention.kv_proj", "self_attention.experts.router")]
    seen, out = _record(ref, paths, ids, output_attentions=True)
    rows, _ = _record(ref, [f"model.layers.{i}.self_attention.experts.output_linear" for i in range(n)], ids, pre=True)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    for i in range(n):
        attn = ref.model.layers[i].self_attention
        moa = attn.experts
        x = seen[f"model.layers.{i}.input_layernorm"].reshape(B * S, -1)
        with torch.no_grad():
            l, idx, g = _gating(moa.router, x)
            q = torch.stack([torch.stack([F.linear(x[t], moa.input_linear.weight[e]) for e in idx[t]])
                             for t in range(B * S)])  # [N,K,Hkv*dh]
        assert _diff(cache[f"blocks.{i}.attn.hook_router_logits"], l.view(B, S, -1)) < TOL
        assert torch.equal(cache[f"blocks.{i}.attn.hook_expert_indices"], idx.view(B, S, -1))
        assert _diff(cache[f"blocks.{i}.attn.hook_routing_weights"], g.view(B, S, -1)) < TOL
        assert _diff(cache["q", i], q.view(B, S, K * Hkv, dh)) < TOL
        k, v = seen[f"model.layers.{i}.self_attention.kv_proj"].chunk(2, dim=-1)
        assert _diff(cache["k", i], k.unflatten(-1, (Hkv, dh))) < TOL
        assert _diff(cache["v", i], v.unflatten(-1, (Hkv, dh))) < TOL
        assert _diff(cache["pattern", i], out.attentions[i]) < TOL
        # slots: the sorted rows the output experts read, back in (token, slot) order, projected by their expert
        order = seen[f"model.layers.{i}.self_attention.experts.router"][0]
        flat = torch.empty_like(rows[f"model.layers.{i}.self_attention.experts.output_linear"])
        flat[order] = rows[f"model.layers.{i}.self_attention.experts.output_linear"]
        with torch.no_grad():
            slots = torch.stack([torch.stack([g[t, k] * F.linear(flat[t * K + k], moa.output_linear.weight[idx[t, k]])
                                              for k in range(K)]) for t in range(B * S)])
        assert _diff(cache[f"blocks.{i}.attn.hook_expert_out"], slots.view(B, S, K, -1)) < TOL
        assert _diff(cache["attn_out", i], seen[f"model.layers.{i}.self_attention"][0]) < TOL
        # z (pattern @ V per head) is what the output experts read: head k*Hkv + j is slot k's columns of kv head j
        assert _diff(cache["z", i].reshape(B * S * K, Hkv * dh), flat) < TOL


def test_jetmoe_attention_zeroing_a_routing_weight_equals_hf_without_that_slot(jet):
    """Attention gate of slot 0 zeroed in layer 0: HF's attention output minus that slot's weighted projection."""
    _, ref, gm = jet
    B, S = 2, 7
    ids = tokens(B, S)
    attn = ref.model.layers[0].self_attention
    K = attn.top_k
    seen = {}
    handles = [attn.experts.router.register_forward_hook(lambda m, a, o: seen.__setitem__("router", (a[0], o))),
               attn.experts.output_linear.register_forward_pre_hook(lambda m, a: seen.__setitem__("rows", a[0]))]

    def remove_slot(m, args, out):
        x, (order, *_rest) = seen["router"]
        _, idx, g = _gating(attn.experts.router, x)
        flat = torch.empty_like(seen["rows"])
        flat[order] = seen["rows"]
        slot0 = torch.stack([g[t, 0] * F.linear(flat[t * K], attn.experts.output_linear.weight[idx[t, 0]])
                             for t in range(x.shape[0])])
        return (out[0] - slot0.view(out[0].shape), *out[1:])

    handles.append(attn.register_forward_hook(remove_slot))
    try:
        with torch.no_grad():
            expected = ref(ids).logits
    finally:
        for h in handles:
            h.remove()

    def zero_slot(t, hook):
        t[:, :, 0] = 0.0

    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_routing_weights", zero_slot)])
        got_slot = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_expert_out", zero_slot)])
    assert _diff(got, expected) < TOL
    assert _diff(got_slot, expected) < TOL
    assert _diff(got, gm(ids)) > 1e-4


@pytest.mark.parametrize("arch", ["diffllama", "jetmoe"])
def test_rotated_queries_and_keys_are_hfs_rotary_of_the_projections(arch):
    """hook_q / hook_k / hook_rot_q / hook_rot_k against HF: the projections' outputs (forward hooks; JetMoE's
    queries by hand from its query experts' weights) and HF's apply_rotary_pos_emb with its rotary module's cos/sin.
    JetMoE's rot_k is before HF repeats the keys over the K slots."""
    import importlib
    _, ref, gm = traced(arch)
    hf = importlib.import_module(f"transformers.models.{arch}.modeling_{arch}")
    B, S, H, Hkv, dh = 2, 7, gm.dims["n_heads"], gm.dims["n_kv_heads"], gm.dims["d_head"]
    ids = tokens(B, S)
    layer = ref.model.layers[1]
    paths = ["model.layers.1.input_layernorm"] + (
        ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"] if arch == "diffllama"
        else ["model.layers.1.self_attention.kv_proj"])
    seen, _ = _record(ref, paths, ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.1.attn."))
        x = seen["model.layers.1.input_layernorm"]
        if arch == "diffllama":
            q, k = seen["model.layers.1.self_attn.q_proj"], seen["model.layers.1.self_attn.k_proj"]
        else:
            moa = layer.self_attention.experts
            flat = x.reshape(B * S, -1)
            _, idx, _ = _gating(moa.router, flat)
            q = torch.stack([torch.cat([F.linear(flat[t], moa.input_linear.weight[e]) for e in idx[t]])
                             for t in range(B * S)]).view(B, S, -1)
            k = seen["model.layers.1.self_attention.kv_proj"].chunk(2, dim=-1)[0]
        q, k = q.unflatten(-1, (H, dh)), k.unflatten(-1, (Hkv, dh))
        cos, sin = ref.model.rotary_emb(x, torch.arange(S)[None])
        rot_q, rot_k = hf.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert _diff(cache["q", 1], q) < TOL and _diff(cache["k", 1], k) < TOL
    assert _diff(cache["rot_q", 1], rot_q.transpose(1, 2)) < TOL
    assert _diff(cache["rot_k", 1], rot_k.transpose(1, 2)) < TOL
    assert _diff(cache["rot_q", 1], cache["q", 1]) > 1e-3  # the rotation did something
