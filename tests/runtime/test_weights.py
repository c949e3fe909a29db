"""Weights in TransformerLens layouts: every property against the HF module weights, split by hand the way each
family's HF forward splits them (not through fxbridge's layout table); views; gm.blocks[i]; reconstructions of HF
module outputs from the weights; the errors for weights a family does not have."""
import copy

import pytest
import torch

from conftest import arch_params, traced
from fxbridge.errors import UsageError
from fxbridge.runtime.hook_point import HookPoint
from tiny import forward_hooks, tokens

FAST = ("gpt2", "llama", "falcon_40b", "gpt_bigcode")
SLOW = ("gpt_bigcode_mha", "falcon_mha", "bloom", "codegen", "phi3", "qwen2", "gpt_neox", "opt")


def _params(archs):
    out = []
    for p in arch_params(archs):
        marks = list(p.marks) + ([] if p.values[0] in FAST else [pytest.mark.slow])
        out.append(pytest.param(*p.values, marks=marks))
    return out


def heads(w: torch.Tensor, n: int) -> torch.Tensor:
    """A Linear weight [n*dh, D] as TL's [n, D, dh] (einops "(n h) m -> n m h")."""
    return w.reshape(n, -1, w.shape[-1]).transpose(1, 2)


def out_heads(w_in_out: torch.Tensor, n: int) -> torch.Tensor:
    """An output projection as [in = n*dh, D] -> [n, dh, D]."""
    return w_in_out.reshape(n, -1, w_in_out.shape[-1])


def zeros_or(b, *shape):
    return torch.zeros(*shape) if b is None else b.reshape(*shape)


def _sizes(model):
    c = model.config
    h, d = c.num_attention_heads, c.hidden_size
    return h, getattr(c, "num_key_value_heads", None) or h, d // h, d


# ---- per family: HF's own split written out on the weights (each returns per-layer TL-layout tensors) ----
def _gpt2(model, l):
    h, _, dh, d = _sizes(model)
    layer = model.transformer.h[l]
    w, b = layer.attn.c_attn.weight, layer.attn.c_attn.bias  # Conv1D [D, 3D]: HF splits the output [q | k | v]
    q, k, v = (w[:, i * d:(i + 1) * d].reshape(d, h, dh).permute(1, 0, 2) for i in range(3))
    bq, bk, bv = (b[i * d:(i + 1) * d].reshape(h, dh) for i in range(3))
    return dict(W_Q=q, _W_K=k, _W_V=v, b_Q=bq, _b_K=bk, _b_V=bv,
                W_O=out_heads(layer.attn.c_proj.weight, h), b_O=layer.attn.c_proj.bias,
                W_in=layer.mlp.c_fc.weight, b_in=layer.mlp.c_fc.bias, W_out=layer.mlp.c_proj.weight,
                b_out=layer.mlp.c_proj.bias)


def _llama(model, l):
    h, hkv, dh, d = _sizes(model)
    layer = model.model.layers[l]
    a, mlp = layer.self_attn, layer.mlp
    return dict(W_Q=heads(a.q_proj.weight, h), _W_K=heads(a.k_proj.weight, hkv), _W_V=heads(a.v_proj.weight, hkv),
                b_Q=zeros_or(a.q_proj.bias, h, dh), _b_K=zeros_or(a.k_proj.bias, hkv, dh),
                _b_V=zeros_or(a.v_proj.bias, hkv, dh), W_O=out_heads(a.o_proj.weight.T, h), b_O=torch.zeros(d),
                W_in=mlp.up_proj.weight.T, W_gate=mlp.gate_proj.weight.T, W_out=mlp.down_proj.weight.T,
                b_in=torch.zeros(mlp.up_proj.out_features), b_out=torch.zeros(d))


def _falcon_mlp(layer, d, bias=None):
    up, down = layer.mlp.dense_h_to_4h, layer.mlp.dense_4h_to_h
    return dict(W_in=up.weight.T, W_out=down.weight.T, b_in=zeros_or(up.bias, up.out_features),
                b_out=zeros_or(down.bias, d))


def _falcon_40b(model, l):
    h, _, dh, d = _sizes(model)
    g = model.config.num_kv_heads
    r = h // g
    layer = model.transformer.h[l]
    a = layer.self_attention
    w = a.query_key_value.weight.view(g, r + 2, dh, d)  # HF: view(..., -1, H/Hkv + 2, dh); q = [:-2], k, v
    out = dict(W_Q=w[:, :r].reshape(h, dh, d).transpose(1, 2), _W_K=w[:, r].transpose(1, 2),
               _W_V=w[:, r + 1].transpose(1, 2), b_Q=torch.zeros(h, dh), _b_K=torch.zeros(g, dh),
               _b_V=torch.zeros(g, dh), W_O=out_heads(a.dense.weight.T, h), b_O=torch.zeros(d))
    return {**out, **_falcon_mlp(layer, d)}


def _per_head(w, b, h, dh, d):
    """HF's view(..., H, 3, dh) split (Falcon MHA, Bloom, GPTBigCode MHA, GPT-NeoX's chunk of (H, 3*dh))."""
    w4, b3 = w.view(h, 3, dh, d), b.view(h, 3, dh) if b is not None else torch.zeros(h, 3, dh)
    return dict(W_Q=w4[:, 0].transpose(1, 2), _W_K=w4[:, 1].transpose(1, 2), _W_V=w4[:, 2].transpose(1, 2),
                b_Q=b3[:, 0], _b_K=b3[:, 1], _b_V=b3[:, 2])


def _falcon_mha(model, l):
    h, _, dh, d = _sizes(model)
    layer = model.transformer.h[l]
    a = layer.self_attention
    return {**_per_head(a.query_key_value.weight, a.query_key_value.bias, h, dh, d),
            "W_O": out_heads(a.dense.weight.T, h), "b_O": zeros_or(a.dense.bias, d), **_falcon_mlp(layer, d)}


_bloom = _falcon_mha  # same module names, per-head layout, biases


def _bigcode_mlp(layer):
    return dict(W_in=layer.mlp.c_fc.weight.T, b_in=layer.mlp.c_fc.bias, W_out=layer.mlp.c_proj.weight.T,
                b_out=layer.mlp.c_proj.bias)


def _gpt_bigcode(model, l):
    h, _, dh, d = _sizes(model)
    layer = model.transformer.h[l]
    a = layer.attn
    w, b = a.c_attn.weight, a.c_attn.bias  # MQA: split (D, dh, dh)
    out = dict(W_Q=heads(w[:d], h), _W_K=heads(w[d:d + dh], 1), _W_V=heads(w[d + dh:], 1), b_Q=b[:d].reshape(h, dh),
               _b_K=b[d:d + dh].reshape(1, dh), _b_V=b[d + dh:].reshape(1, dh), W_O=out_heads(a.c_proj.weight.T, h),
               b_O=a.c_proj.bias)
    return {**out, **_bigcode_mlp(layer)}


def _gpt_bigcode_mha(model, l):
    h, _, dh, d = _sizes(model)
    layer = model.transformer.h[l]
    a = layer.attn
    return {**_per_head(a.c_attn.weight, a.c_attn.bias, h, dh, d), "W_O": out_heads(a.c_proj.weight.T, h),
            "b_O": a.c_proj.bias, **_bigcode_mlp(layer)}


def _gpt_neox(model, l):
    h, _, dh, d = _sizes(model)
    layer = model.gpt_neox.layers[l]
    a = layer.attention
    return {**_per_head(a.query_key_value.weight, a.query_key_value.bias, h, dh, d),
            "W_O": out_heads(a.dense.weight.T, h), "b_O": a.dense.bias, **_falcon_mlp(layer, d)}


def _codegen(model, l):
    h, _, dh, d = _sizes(model)
    m = 4  # HF's mp_num: 4 blocks of [q | v | k], each H/4 heads
    layer = model.transformer.h[l]
    a = layer.attn
    w = a.qkv_proj.weight.view(m, 3, h // m, dh, d)
    q, v, k = (w[:, i].reshape(h, dh, d).transpose(1, 2) for i in range(3))
    return dict(W_Q=q, _W_K=k, _W_V=v, b_Q=torch.zeros(h, dh), _b_K=torch.zeros(h, dh), _b_V=torch.zeros(h, dh),
                W_O=out_heads(a.out_proj.weight.T, h), b_O=torch.zeros(d), W_in=layer.mlp.fc_in.weight.T,
                b_in=layer.mlp.fc_in.bias, W_out=layer.mlp.fc_out.weight.T, b_out=layer.mlp.fc_out.bias)


def _phi3(model, l):
    h, hkv, dh, d = _sizes(model)
    layer = model.model.layers[l]
    a, mlp = layer.self_attn, layer.mlp
    w = a.qkv_proj.weight  # [q | k | v] rows
    f = mlp.down_proj.in_features
    gate_up = mlp.gate_up_proj.weight  # HF: gate, up = chunk(2, -1)
    q, k = w[:h * dh], w[h * dh:(h + hkv) * dh]
    return dict(W_Q=heads(q, h), _W_K=heads(k, hkv), _W_V=heads(w[(h + hkv) * dh:], hkv),
                b_Q=torch.zeros(h, dh), _b_K=torch.zeros(hkv, dh), _b_V=torch.zeros(hkv, dh),
                W_O=out_heads(a.o_proj.weight.T, h), b_O=torch.zeros(d), W_gate=gate_up[:f].T, W_in=gate_up[f:].T,
                b_in=torch.zeros(f), W_out=mlp.down_proj.weight.T, b_out=torch.zeros(d))


def _opt(model, l):
    h, _, dh, d = _sizes(model)
    layer = model.model.decoder.layers[l]
    a = layer.self_attn
    return dict(W_Q=heads(a.q_proj.weight, h), _W_K=heads(a.k_proj.weight, h), _W_V=heads(a.v_proj.weight, h),
                b_Q=a.q_proj.bias.reshape(h, dh), _b_K=a.k_proj.bias.reshape(h, dh), _b_V=a.v_proj.bias.reshape(h, dh),
                W_O=out_heads(a.out_proj.weight.T, h), b_O=a.out_proj.bias, W_in=layer.fc1.weight.T,
                b_in=layer.fc1.bias, W_out=layer.fc2.weight.T, b_out=layer.fc2.bias)


EXPECTED = dict(gpt2=_gpt2, llama=_llama, qwen2=_llama, falcon_40b=_falcon_40b, falcon_mha=_falcon_mha, bloom=_bloom,
                gpt_bigcode=_gpt_bigcode, gpt_bigcode_mha=_gpt_bigcode_mha, gpt_neox=_gpt_neox, codegen=_codegen,
                phi3=_phi3, opt=_opt)
POS = {"gpt2": lambda m: m.transformer.wpe.weight, "gpt_bigcode": lambda m: m.transformer.wpe.weight,
       "gpt_bigcode_mha": lambda m: m.transformer.wpe.weight,
       "opt": lambda m: m.model.decoder.embed_positions.weight[2:]}  # OPT's positions are offset by 2 rows


@pytest.mark.parametrize("arch", _params(FAST + SLOW))
def test_every_weight_property_equals_the_hf_weights(arch):
    model, _, gm = traced(arch)
    h, _, dh, d = _sizes(model)
    n = model.config.num_hidden_layers
    per_layer = [EXPECTED[arch](model, l) for l in range(n)]
    for name in per_layer[0]:
        want = torch.stack([e[name] for e in per_layer])
        got = getattr(gm, name)
        assert got.shape == want.shape, (name, got.shape, want.shape)
        assert torch.equal(got, want), name
        for l in (0, n - 1):
            sub = gm.blocks[l].mlp if name in ("W_in", "W_gate", "W_out", "b_in", "b_out") else gm.blocks[l].attn
            assert torch.equal(getattr(sub, name), want[l]), (name, l)
    # TL's GQA W_K / W_V: every query head h sees KV head h // (H / Hkv), written out
    k, v, rep = gm._W_K, gm._W_V, h // gm._W_K.shape[1]
    for head in range(h):
        assert torch.equal(gm.W_K[:, head], k[:, head // rep]) and torch.equal(gm.W_V[:, head], v[:, head // rep])
        assert torch.equal(gm.b_K[:, head], gm._b_K[:, head // rep])
    assert gm.W_Q.shape == (n, h, d, dh) and gm.W_K.shape == (n, h, d, dh) and gm.W_O.shape == (n, h, dh, d)
    if "W_gate" not in per_layer[0]:
        assert gm.W_gate is None
    assert torch.equal(gm.W_E, model.get_input_embeddings().weight)
    lm_head = model.get_output_embeddings()
    assert torch.equal(gm.W_U, lm_head.weight.T) and gm.W_U.shape == (d, model.config.vocab_size)
    assert torch.equal(gm.b_U, zeros_or(lm_head.bias, model.config.vocab_size))
    if arch in POS:
        assert torch.equal(gm.W_pos, POS[arch](model))
    else:
        with pytest.raises(UsageError, match="position embedding"):
            gm.W_pos


@pytest.mark.parametrize("arch", _params(("gpt2", "llama")))
def test_per_layer_weights_are_views_and_stacks_are_copies(arch):
    model, _, gm = traced(arch)
    q_source = (model.transformer.h[1].attn.c_attn.weight if arch == "gpt2"
                else model.model.layers[1].self_attn.q_proj.weight)
    view = gm.blocks[1].attn.W_Q
    assert view.untyped_storage().data_ptr() == q_source.untyped_storage().data_ptr()
    before = q_source.detach().clone()
    try:
        with torch.no_grad():
            view[2, 5, 3] += 1.0  # head 2, model dim 5, head dim 3
        changed = (q_source != before).nonzero().tolist()
        d, dh = model.config.hidden_size, 16
        # Conv1D stores [in, out], Linear [out, in]
        assert changed == ([[5, 2 * dh + 3]] if arch == "gpt2" else [[2 * dh + 3, 5]])
        stacked = gm.W_Q
        with torch.no_grad():
            stacked[1, 2, 5, 3] += 1.0
        assert q_source[tuple(changed[0])] == before[tuple(changed[0])] + 1.0  # the stacked copy does not write back
    finally:
        with torch.no_grad():
            q_source.copy_(before)
    hf_storage = {p.untyped_storage().data_ptr() for p in model.parameters()}
    for name in ("W_O", "b_O", "W_in", "W_out", "_W_K", "b_Q"):  # views of HF parameters (b_Q: llama has zeros)
        sub = gm.blocks[0].mlp if name in ("W_in", "W_out") else gm.blocks[0].attn
        is_view = getattr(sub, name).untyped_storage().data_ptr() in hf_storage
        assert is_view == (arch == "gpt2" or name not in ("b_O", "b_Q")), name
    if arch == "llama":  # GQA: W_K repeats the KV heads (a copy, as TL's repeat_interleave)
        assert gm.blocks[0].attn.W_K.untyped_storage().data_ptr() not in hf_storage
    assert gm.W_U.untyped_storage().data_ptr() == model.get_output_embeddings().weight.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", _params(FAST))
def test_weights_reconstruct_the_hf_module_outputs(arch):
    """x @ W + b equals each HF module's own forward (recorded on the eager reference), and ln_final's output @ W_U +
    b_U equals HF's logits."""
    model, ref, gm = traced(arch)
    spec, layer = gm.spec, 1
    o_proj = ref.get_submodule(spec.layer(layer, f"{spec.attn}.{spec.o_proj}"))
    mlp_out = ref.get_submodule(spec.mlp_path(layer, spec.mlp_out))
    final = ref.get_submodule(spec.final_norm)
    seen = {}

    def rec(key):
        return lambda mod, args, out: seen.update({key: (args[0].clone(), out.clone())})  # Falcon adds in place

    ids = tokens(2, 6)
    with torch.no_grad(), forward_hooks((o_proj, rec("o")), (mlp_out, rec("mlp")), (final, rec("final"))):
        logits = ref(ids).logits
    z = seen["o"][0].unflatten(-1, (gm.dims["n_heads"], -1))  # [B, S, H, dh], the heads' outputs before W_O
    attn = torch.einsum("bshd,hdm->bsm", z, gm.blocks[layer].attn.W_O) + gm.b_O[layer]
    torch.testing.assert_close(attn, seen["o"][1], rtol=1e-5, atol=1e-5)
    post, out = seen["mlp"]
    torch.testing.assert_close(post @ gm.W_out[layer] + gm.b_out[layer], out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(seen["final"][1] @ gm.W_U + gm.b_U, logits, rtol=1e-5, atol=1e-5)


def test_blocks_are_per_layer_views_that_leave_the_module_untouched():
    model, _, gm = traced("gpt2")
    n = model.config.num_hidden_layers
    assert len(gm.blocks) == n and len(list(gm.blocks)) == n
    assert gm.blocks[-1].attn.hook_z is gm.hook_dict[f"blocks.{n - 1}.attn.hook_z"]
    assert gm.blocks[0].hook_resid_pre is gm.hook_dict["blocks.0.hook_resid_pre"]
    assert gm.blocks[2].mlp.hook_post is gm.hook_dict["blocks.2.mlp.hook_post"]
    assert gm.blocks[1].ln1.hook_scale is gm.hook_dict["blocks.1.ln1.hook_scale"]
    assert gm.blocks[1].ln1.w is model.transformer.h[1].ln_1.weight
    assert gm.blocks[1].ln2.b is model.transformer.h[1].ln_2.bias
    assert [b.hook_resid_post.name for b in gm.blocks] == [f"blocks.{i}.hook_resid_post" for i in range(n)]
    assert gm.embed.W_E is model.transformer.wte.weight and torch.equal(gm.unembed.W_U, gm.W_U)
    x = torch.randn(2, 3, model.config.hidden_size)
    torch.testing.assert_close(gm.unembed(x), x @ model.lm_head.weight.T)
    ids = tokens(2, 3)
    assert torch.equal(gm.embed(ids), model.transformer.wte.weight[ids])
    with pytest.raises(IndexError):
        gm.blocks[n]
    with pytest.raises(AttributeError, match="hook_nonsense"):
        gm.blocks[0].attn.hook_nonsense
    # the module itself: state_dict, hook points and the graph's call_module targets are what they were
    keys = set(gm.state_dict())  # the HF weights (and any graph constants the capture kept), nothing under blocks.
    assert {k for k in keys if k.startswith("hf.")} == {f"hf.{k}" for k in model.state_dict()}
    assert not any(k.startswith("blocks.") for k in keys)
    points = {name: m for name, m in gm.named_modules() if isinstance(m, HookPoint)}
    assert points == gm.hook_dict
    for node in gm.graph.nodes:
        if node.op == "call_module":
            gm.get_submodule(node.target)
    modules = len(list(gm.modules()))
    assert not isinstance(gm.blocks[0], torch.nn.Module) and not isinstance(gm.blocks[0].attn, torch.nn.Module)
    assert len(list(gm.modules())) == modules  # looking weights up adds no module


def test_rms_norm_has_no_bias_and_blocks_follow_a_deepcopy():
    model, _, gm = traced("llama")
    assert gm.blocks[0].ln1.w is model.model.layers[0].input_layernorm.weight
    with pytest.raises(AttributeError, match="RMSNorm"):
        gm.blocks[0].ln1.b
    copied = copy.deepcopy(gm)
    assert copied.blocks[0].attn.W_Q.untyped_storage().data_ptr() == \
        copied.hf.model.layers[0].self_attn.q_proj.weight.untyped_storage().data_ptr()
    assert copied.blocks[0].attn.W_Q.untyped_storage().data_ptr() != gm.blocks[0].attn.W_Q.untyped_storage().data_ptr()
    ids = tokens(1, 4)
    torch.testing.assert_close(copied(ids), gm(ids))


def test_tokens_to_residual_directions_are_w_u_columns():
    _, _, gm = traced("llama")
    assert torch.equal(gm.tokens_to_residual_directions(7), gm.W_U[:, 7])
    assert torch.equal(gm.tokens_to_residual_directions(torch.tensor(7)), gm.W_U[:, 7])
    ids = tokens(2, 3)
    dirs = gm.tokens_to_residual_directions(ids)
    assert dirs.shape == (2, 3, gm.dims["d_model"]) and torch.equal(dirs[1, 2], gm.W_U[:, ids[1, 2]])


@pytest.mark.parametrize("arch", _params(("gemma4_text",)))
def test_heterogeneous_layers_point_to_blocks(arch):
    _, _, gm = traced(arch)
    with pytest.raises(UsageError, match=r"gm\.blocks\[i\]"):
        gm.W_Q
    assert gm.blocks[0].attn.W_Q.shape == (4, 64, 16) and gm.blocks[2].attn.W_Q.shape == (4, 64, 32)
    with pytest.raises(UsageError, match="k projection"):  # layer 3 reuses layer 1's keys (KV sharing)
        gm.blocks[3].attn.W_K


@pytest.mark.parametrize("arch,prop,match", [
    pytest.param("mixtral", "W_in", "mixture-of-experts", marks=pytest.mark.slow),
    pytest.param("deepseek_v3", "W_Q", "DeepSeek V3 has no separate q projection", marks=pytest.mark.slow),
    pytest.param("jetmoe", "W_O", "JetMoeMoA with no weight tensor", marks=pytest.mark.slow)])
def test_weights_a_family_lacks_raise_naming_it(arch, prop, match):
    _, _, gm = traced(arch)
    with pytest.raises(UsageError, match=match):
        getattr(gm, prop)
