"""Llama 4 (text) and DBRX: where each family's own hooks sit, checked against HF's modules (forward hooks on the
eager reference) or computed by hand from HF's weights.

The generic parity / hook / intervention tests run on these tiny configs too (tests/tiny_llama4.py).
"""
import pytest
import torch
import torch.nn.functional as F

import fxbridge as bridge
from conftest import arch_params, traced
from tiny import CONFIGS, build_from_config, eager_reference, left_padded, tokens

TOL = 1e-5
LLAMA4 = arch_params(["llama4_text"])


def _record(ref, paths, ids, edit=None, attention_mask=None):
    """HF eager forward with forward hooks on ``paths``: {path: (first input, output)}, and the logits.
    ``edit(path, input, output)`` may return a replacement output."""
    seen, handles = {}, []
    for path in paths:
        def keep(mod, args, kwargs, out, path=path):
            x = args[0] if args else next(iter(kwargs.values()))
            # a copy: Llama 4 adds the routed output into the shared expert's output in place afterwards
            seen[path] = (x.clone(), tuple(o.clone() for o in out) if isinstance(out, tuple) else out.clone())
            if edit is not None:
                return edit(path, x, out)
        handles.append(ref.get_submodule(path).register_forward_hook(keep, with_kwargs=True))
    try:
        with torch.no_grad():
            logits = ref(ids, attention_mask=attention_mask).logits
    finally:
        for h in handles:
            h.remove()
    return seen, logits


def _llama4_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of HF's Llama4TextExperts applied to x [..., D], by hand from its weights."""
    gate, up = (x @ experts.gate_up_proj[e]).chunk(2, dim=-1)
    return (up * F.silu(gate)) @ experts.down_proj[e]


# ---------------------------------------------------------------------------------------------------- Llama 4
@pytest.mark.parametrize("arch", LLAMA4)
def test_llama4_logits_plain_and_left_padded(arch):
    _, ref, gm = traced(arch)
    ids = tokens(2, 9)
    with torch.no_grad():
        assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL
        ids, mask = left_padded(3, 9, [0, 2, 5])
        diff = (gm(ids, attention_mask=mask) - ref(ids, attention_mask=mask).logits).abs() * mask[..., None]
    assert diff.max().item() < TOL


@pytest.mark.parametrize("arch", LLAMA4)
def test_llama4_routing_hooks_are_hf_router_values(arch):
    _, ref, gm = traced(arch)
    ids = tokens(2, 9)
    B, S = ids.shape
    for i in (1, 3):
        ff = f"model.layers.{i}.feed_forward"
        seen, _ = _record(ref, [f"{ff}.router", f"{ff}.shared_expert", ff], ids)
        with torch.no_grad():
            _, cache = gm.run_with_cache(ids, names_filter=lambda n, i=i: n.startswith(f"blocks.{i}."))
        scores, logits = seen[f"{ff}.router"][1]
        k = ref.config.num_experts_per_tok
        top_v, top_i = torch.topk(logits, k, dim=1)
        torch.testing.assert_close(cache[f"blocks.{i}.mlp.hook_router_logits"], logits.view(B, S, -1), atol=TOL, rtol=0)
        assert cache[f"blocks.{i}.mlp.hook_expert_indices"].dtype == torch.int64
        assert torch.equal(cache[f"blocks.{i}.mlp.hook_expert_indices"], top_i.view(B, S, k))
        # the weights are HF's router scores at the chosen experts (sigmoid of the top-k logits)
        torch.testing.assert_close(cache[f"blocks.{i}.mlp.hook_routing_weights"],
                                   scores.gather(1, top_i).view(B, S, k), atol=TOL, rtol=0)
        assert not torch.allclose(scores.gather(1, top_i), top_v)  # sigmoid really applied
        torch.testing.assert_close(cache[f"blocks.{i}.mlp.hook_shared_out"],
                                   seen[f"{ff}.shared_expert"][1].view(B, S, -1), atol=TOL, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{i}.hook_mlp_out"], seen[ff][1][0].view(B, S, -1), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", LLAMA4)
def test_llama4_expert_out_is_each_chosen_expert_on_its_weighted_input(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 9)
    B, S = ids.shape
    i = 1
    ff = f"model.layers.{i}.feed_forward"
    seen, _ = _record(ref, [ff], ids)
    x = seen[ff][0].reshape(B, S, -1)  # HF's MoE input (the ln2 output)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.startswith(f"blocks.{i}."))
        idx = cache[f"blocks.{i}.mlp.hook_expert_indices"]
        w = cache[f"blocks.{i}.mlp.hook_routing_weights"]
        experts = ref.get_submodule(f"{ff}.experts")
        want = torch.stack([torch.stack([torch.stack([
            _llama4_expert(experts, int(idx[b, s, k]), w[b, s, k] * x[b, s]) for k in range(idx.shape[-1])])
            for s in range(S)]) for b in range(B)])
    torch.testing.assert_close(cache[f"blocks.{i}.mlp.hook_expert_out"], want, atol=TOL, rtol=0)
    # slots + shared expert = the block output
    slots, shared = cache[f"blocks.{i}.mlp.hook_expert_out"], cache[f"blocks.{i}.mlp.hook_shared_out"]
    torch.testing.assert_close(slots.sum(2) + shared, cache[f"blocks.{i}.hook_mlp_out"], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", LLAMA4)
def test_llama4_zeroing_a_slot_removes_that_expert_at_that_token(arch):
    _, ref, gm = traced(arch)
    ids = tokens(2, 9)
    B, S = ids.shape
    i, b, s = 1, 1, 4
    ff = f"model.layers.{i}.feed_forward"
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.startswith(f"blocks.{i}.mlp."))
    e = int(cache[f"blocks.{i}.mlp.hook_expert_indices"][b, s, 0])
    w = cache[f"blocks.{i}.mlp.hook_routing_weights"][b, s, 0]
    experts = ref.get_submodule(f"{ff}.experts")

    def remove(path, x, out):  # HF's block output minus expert e applied to its weighted input, at token (b, s)
        y = out[0].clone().view(B, S, -1)
        y[b, s] -= _llama4_expert(experts, e, w * x.reshape(B, S, -1)[b, s])
        return (y.view(out[0].shape), out[1])
    _, want = _record(ref, [ff], ids, edit=remove)

    def zero(t, hook):
        t[b, s, 0] = 0
        return t
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.mlp.hook_expert_out", zero)])
        plain = gm(ids)
    assert (got - plain).abs().max().item() > 1e-3  # the edit mattered
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", LLAMA4)
def test_llama4_editing_routing_weights_rescales_the_expert_input(arch):
    _, ref, gm = traced(arch)
    ids = tokens(2, 9)
    i = 3
    ff = f"model.layers.{i}.feed_forward"

    def halve_scores(path, x, out):  # HF: the router's scores (what multiplies the experts' input) halved
        return (out[0] * 0.5, out[1])
    _, want = _record(ref, [f"{ff}.router"], ids, edit=halve_scores)
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.mlp.hook_routing_weights", lambda t, hook: t * 0.5)])
        assert (got - gm(ids)).abs().max().item() > 1e-3
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", LLAMA4)
def test_llama4_chunked_mask_nope_layer_and_patterns(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 9)
    S, chunk = ids.shape[1], model.config.attention_chunk_size
    paths = [f"model.layers.{i}.self_attn" for i in range(4)]
    seen, _ = _record(ref, paths, ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: "attn.hook_" in n)
    for i, path in enumerate(paths):  # HF eager's attention weights: chunked mask, temperature tuning, q/k norm
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_pattern"], seen[path][1][1], atol=TOL, rtol=0)
    q_pos, k_pos = torch.arange(S)[:, None], torch.arange(S)[None, :]
    chunked = (k_pos <= q_pos) & (q_pos // chunk == k_pos // chunk)
    scores0 = cache["blocks.0.attn.hook_attn_scores"]
    assert (scores0[..., ~chunked] == torch.finfo(scores0.dtype).min).all()
    assert (scores0[..., chunked] > -1e4).all()
    scores3 = cache["blocks.3.attn.hook_attn_scores"]  # the NoPE layer attends to every earlier key
    assert (scores3[..., k_pos.expand(S, S) <= q_pos] > -1e4).all()
    assert "blocks.3.attn.hook_rot_q" not in gm.hook_dict and "blocks.0.attn.hook_rot_q" in gm.hook_dict
    # hook_q is the projection output, before temperature tuning (NoPE) and before RoPE + L2 norm
    seen_q, _ = _record(ref, ["model.layers.3.self_attn.q_proj", "model.layers.0.self_attn.q_proj"], ids)
    for i in (0, 3):
        torch.testing.assert_close(cache[f"blocks.{i}.attn.hook_q"],
                                   seen_q[f"model.layers.{i}.self_attn.q_proj"][1].view(2, S, 4, 16), atol=TOL, rtol=0)
    # the L2 norm (eps rms_norm_eps) is inside hook_rot_q on RoPE layers: unit RMS per head; hook_q is not normed
    ms = cache["blocks.0.attn.hook_rot_q"].pow(2).mean(-1)
    m = ms / (1 - ms) * model.config.rms_norm_eps  # the mean square before the norm, from ms = m / (m + eps)
    torch.testing.assert_close(m, cache["blocks.0.attn.hook_q"].pow(2).mean(-1), atol=1e-6, rtol=1e-2)
    assert (cache["blocks.0.attn.hook_q"].pow(2).mean(-1).sqrt() - 1).abs().min() > 0.1


@pytest.mark.slow
def test_llama4_top2_logits_and_slots():
    config = CONFIGS["llama4_text"]()
    config.num_experts_per_tok = 2
    model = build_from_config(config)
    ref = eager_reference(model)
    gm = bridge.trace(model)
    ids, mask = left_padded(2, 9, [0, 3])
    with torch.no_grad():
        diff = (gm(ids, attention_mask=mask) - ref(ids, attention_mask=mask).logits).abs() * mask[..., None]
        assert diff.max().item() < TOL
        _, cache = gm.run_with_cache(ids, attention_mask=mask)
    assert cache["blocks.1.mlp.hook_expert_out"].shape == (2, 9, 2, 64)
    torch.testing.assert_close(cache["blocks.1.mlp.hook_expert_out"].sum(2) + cache["blocks.1.mlp.hook_shared_out"],
                               cache["blocks.1.hook_mlp_out"], atol=TOL, rtol=0)


# ---------------------------------------------------------------------------------------------------- DBRX
DBRX = arch_params(["dbrx"])


def _dbrx_expert(experts, e: int, x: torch.Tensor) -> torch.Tensor:
    """Expert e of HF's DbrxExperts on x [..., D], by hand from its fused w1 / v1 / w2 parameters."""
    mlp = experts.mlp
    f, d = experts.ffn_hidden_size, experts.hidden_size
    w1, v1, w2 = (p.view(-1, f, d)[e] for p in (mlp.w1, mlp.v1, mlp.w2))
    return (F.silu(x @ w1.T) * (x @ v1.T)) @ w2


@pytest.mark.parametrize("arch", DBRX)
def test_dbrx_logits_plain_and_left_padded(arch):
    _, ref, gm = traced(arch)
    ids = tokens(2, 9)
    with torch.no_grad():
        assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL
        ids, mask = left_padded(3, 9, [0, 2, 5])
        diff = (gm(ids, attention_mask=mask) - ref(ids, attention_mask=mask).logits).abs() * mask[..., None]
    assert diff.max().item() < TOL


@pytest.mark.parametrize("arch", DBRX)
def test_dbrx_qkv_are_the_clamped_wqkv_split(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 9)
    B, S = ids.shape
    path = "transformer.blocks.1.norm_attn_norm.attn.Wqkv"
    seen, _ = _record(ref, [path], ids)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.startswith("blocks.1.attn.hook_"))
    raw = seen[path][1]
    clip = model.config.attn_config.clip_qkv
    assert (raw.abs() > clip).float().mean() > 0.05  # the clamp bites
    q, k, v = raw.clamp(-clip, clip).split([64, 32, 32], dim=-1)
    torch.testing.assert_close(cache["blocks.1.attn.hook_q"], q.view(B, S, 4, 16), atol=TOL, rtol=0)
    torch.testing.assert_close(cache["blocks.1.attn.hook_k"], k.view(B, S, 2, 16), atol=TOL, rtol=0)
    torch.testing.assert_close(cache["blocks.1.attn.hook_v"], v.view(B, S, 2, 16), atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", DBRX)
def test_dbrx_routing_hooks_and_slots_against_hf(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 9)
    B, S = ids.shape
    for i in range(2):
        ffn = f"transformer.blocks.{i}.ffn"
        seen, _ = _record(ref, [f"{ffn}.router", ffn], ids)
        with torch.no_grad():
            _, cache = gm.run_with_cache(ids, names_filter=lambda n, i=i: n.startswith(f"blocks.{i}."))
        logits = seen[f"{ffn}.router"][1]
        probs = logits.softmax(-1)
        top_v, top_i = torch.topk(probs, 2, dim=-1)
        weights = top_v / top_v.abs().sum(-1, keepdim=True)  # moe_normalize_expert_weights = 1 (p-norm, p=1)
        hooked = {h: cache[f"blocks.{i}.mlp.hook_{h}"] for h in ("router_logits", "router_probs", "expert_indices",
                                                                 "routing_weights", "expert_out")}
        torch.testing.assert_close(hooked["router_logits"], logits.view(B, S, 4), atol=TOL, rtol=0)
        torch.testing.assert_close(hooked["router_probs"], probs.view(B, S, 4), atol=TOL, rtol=0)
        assert torch.equal(hooked["expert_indices"], top_i.view(B, S, 2))
        torch.testing.assert_close(hooked["routing_weights"], weights.view(B, S, 2), atol=TOL, rtol=0)
        assert not torch.allclose(weights, top_v)  # the normalisation matters
        x = seen[ffn][0]  # the FFN input (norm_2's output), [B,S,D]
        experts = ref.get_submodule(f"{ffn}.experts")
        with torch.no_grad():
            want = torch.stack([torch.stack([torch.stack([
                hooked["routing_weights"][b, s, k]
                * _dbrx_expert(experts, int(hooked["expert_indices"][b, s, k]), x[b, s])
                for k in range(2)]) for s in range(S)]) for b in range(B)])
        torch.testing.assert_close(hooked["expert_out"], want, atol=TOL, rtol=0)
        torch.testing.assert_close(cache[f"blocks.{i}.hook_mlp_out"], seen[ffn][1], atol=TOL, rtol=0)


@pytest.mark.parametrize("arch", DBRX)
def test_dbrx_zeroing_a_slot_and_editing_weights_match_hf(arch):
    _, ref, gm = traced(arch)
    ids = tokens(2, 9)
    B, S = ids.shape
    i, b, s, k = 1, 0, 5, 1
    ffn = f"transformer.blocks.{i}.ffn"
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids, names_filter=lambda n: n.startswith(f"blocks.{i}.mlp."))
    e = int(cache[f"blocks.{i}.mlp.hook_expert_indices"][b, s, k])
    w = cache[f"blocks.{i}.mlp.hook_routing_weights"][b, s, k]
    experts = ref.get_submodule(f"{ffn}.experts")

    def remove(path, x, out):  # HF's FFN output minus slot k's weighted expert at token (b, s)
        y = out.clone()
        y[b, s] -= w * _dbrx_expert(experts, e, x[b, s])
        return y
    _, want = _record(ref, [ffn], ids, edit=remove)

    def zero(t, hook):
        t[b, s, k] = 0
        return t
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.mlp.hook_expert_out", zero)])
        assert (got - gm(ids)).abs().max().item() > 1e-4
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)

    # routing weights doubled: HF's experts given doubled top_k_weights
    def double(mod, args, kwargs):
        hidden, index, weights = args
        return (hidden, index, weights * 2), kwargs
    h = experts.register_forward_pre_hook(double, with_kwargs=True)
    try:
        with torch.no_grad():
            want = ref(ids).logits
    finally:
        h.remove()
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{i}.mlp.hook_routing_weights", lambda t, hook: t * 2)])
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


@pytest.mark.slow
def test_llama4_stitched_at_8_layers_equals_full_capture(monkeypatch):
    """Dense / MoE and RoPE / NoPE layer kinds (3 kinds, 6 of 8 layers captured): ``moe_layers`` renumbered for the
    shallow copy, and the per-layer ``position_embeddings.to(device)`` no longer chains the layers."""
    import transformers as tf
    config = tf.Llama4TextConfig(**dict(CONFIGS["llama4_text"].kwargs, num_hidden_layers=8,
                                        no_rope_layers=[1, 1, 1, 0] * 2))
    model = build_from_config(config)
    ref = eager_reference(model)
    stitched = bridge.trace(model)
    assert stitched.report.capture_notes[0].startswith("stitched: captured 6 of 8 layers")
    monkeypatch.setenv("FXBRIDGE_STITCH", "0")
    full = bridge.trace(model)
    assert list(stitched.hook_dict) == list(full.hook_dict)
    ids, mask = left_padded(3, 10, [0, 2, 5])
    with torch.no_grad():
        a, b = stitched(ids, attention_mask=mask), full(ids, attention_mask=mask)
        assert torch.equal(a, b)
        assert ((a - ref(ids, attention_mask=mask).logits).abs() * mask[..., None]).max().item() < TOL


@pytest.mark.slow
def test_dbrx_stitched_at_4_layers_equals_full_capture(monkeypatch):
    """The capture-time experts forward reads its sizes off its tensors, so the layers stitch (2 of 4 captured)."""
    import transformers as tf
    config = tf.DbrxConfig(**dict(CONFIGS["dbrx"].kwargs, n_layers=4))
    try:  # stitching rebuilds the config from its dict; transformers 5.15's DbrxConfig cannot
        tf.DbrxConfig.from_dict(config.to_dict())
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"transformers {tf.__version__} cannot rebuild DbrxConfig from its dict: {exc}")
    model = build_from_config(config)
    ref = eager_reference(model)
    stitched = bridge.trace(model)
    assert stitched.report.capture_notes[0].startswith("stitched: captured 2 of 4 layers")
    monkeypatch.setenv("FXBRIDGE_STITCH", "0")
    full = bridge.trace(model)
    assert list(stitched.hook_dict) == list(full.hook_dict)
    ids, mask = left_padded(3, 10, [0, 2, 5])
    with torch.no_grad():
        a, b = stitched(ids, attention_mask=mask), full(ids, attention_mask=mask)
        assert torch.equal(a, b)
        assert ((a - ref(ids, attention_mask=mask).logits).abs() * mask[..., None]).max().item() < TOL
