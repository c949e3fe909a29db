"""ActivationCache analysis methods (legacy TransformerLens semantics and labels) against HF eager values recorded on
the reference model: its hidden states, the output projections' outputs, the final norm's input, and norms and
logit differences computed by hand. GPT-2 (LayerNorm, learned positions, biases), Llama (RMSNorm, GQA) and Falcon 7B
(parallel blocks, one norm per layer)."""
import pytest
import torch

from conftest import arch_params, traced
from tiny import forward_hooks, tokens

ARCHS = arch_params(("gpt2", "llama", "falcon_7b"))
TOL = dict(rtol=1e-5, atol=1e-5)
_RUNS = {}


def run(arch):
    """(gm, cache of every hook, HF facts) for one batch, computed once per architecture."""
    if arch not in _RUNS:
        model, ref, gm = traced(arch)
        spec, n = gm.spec, gm.dims["n_layers"]
        seen = {}

        def rec(key):  # clones: Falcon adds into the MLP output in place after the module returns
            return lambda mod, args, out: seen.update({key: (args[0].clone(), out.clone())})

        pairs = [(ref.get_submodule(spec.final_norm), rec("final"))]
        for l in range(n):
            pairs.append((ref.get_submodule(spec.layer(l, f"{spec.attn}.{spec.o_proj}")), rec(f"o{l}")))
            pairs.append((ref.get_submodule(spec.mlp_path(l, spec.mlp_out)), rec(f"mlp{l}")))
        ids = tokens(2, 6)
        with torch.no_grad(), forward_hooks(*pairs):
            out = ref(ids, output_hidden_states=True)
        gm.reset_hooks(including_permanent=True)
        _, cache = gm.run_with_cache(ids)
        hf = dict(ids=ids, logits=out.logits, pre=[out.hidden_states[l] for l in range(n)], final=seen["final"][0],
                  attn_out=[seen[f"o{l}"][1] for l in range(n)], mlp_out=[seen[f"mlp{l}"][1] for l in range(n)],
                  mlp_bias=[ref.get_submodule(spec.mlp_path(l, spec.mlp_out)).bias for l in range(n)])
        _RUNS[arch] = (gm, cache, hf)
    return _RUNS[arch]


def normalise(x, norm, kind):
    """The final norm's normalisation written out: LayerNorm centres, RMSNorm does not; no weight, no bias."""
    eps = getattr(norm, "eps", None) or getattr(norm, "variance_epsilon")
    if kind == "layernorm":
        x = x - x.mean(-1, keepdim=True)
    return x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("arch", ARCHS)
def test_decompose_resid_sums_to_each_residual(arch):
    gm, cache, hf = run(arch)
    n = gm.dims["n_layers"]
    stack, labels = cache.decompose_resid(return_labels=True)
    embeds = ["embed", "pos_embed"] if arch == "gpt2" else ["embed"]
    assert labels == embeds + [f"{l}_{part}" for l in range(n) for part in ("attn_out", "mlp_out")]
    torch.testing.assert_close(stack.sum(0), hf["final"], **TOL)
    for l in range(n):
        torch.testing.assert_close(cache.decompose_resid(layer=l).sum(0), hf["pre"][l], **TOL)
    attn_only, attn_labels = cache.decompose_resid(mode="attn", incl_embeds=False, return_labels=True)
    assert attn_labels == [f"{l}_attn_out" for l in range(n)]
    torch.testing.assert_close(attn_only.sum(0), sum(hf["attn_out"]), **TOL)
    assert cache.decompose_resid(pos_slice=-1).shape == (len(labels), 2, gm.dims["d_model"])


@pytest.mark.parametrize("arch", ARCHS)
def test_accumulated_resid_labels_and_values(arch):
    gm, cache, hf = run(arch)
    n = gm.dims["n_layers"]
    stack, labels = cache.accumulated_resid(return_labels=True)
    assert labels == [f"{l}_pre" for l in range(n)] + ["final_post"]
    torch.testing.assert_close(stack, torch.stack(hf["pre"] + [hf["final"]]), **TOL)
    part, labels = cache.accumulated_resid(layer=1, return_labels=True, mlp_input=not gm.spec.parallel)
    assert labels == (["0_pre", "1_pre"] if gm.spec.parallel else ["0_pre", "1_pre", "1_mid"])
    if not gm.spec.parallel:
        mids, labels = cache.accumulated_resid(layer=2, incl_mid=True, return_labels=True)
        assert labels == ["0_pre", "0_mid", "1_pre", "1_mid", "2_pre"]
        torch.testing.assert_close(mids[1], hf["pre"][0] + hf["attn_out"][0], **TOL)  # resid_mid = pre + attn_out
    else:
        with pytest.raises(KeyError, match="parallel blocks"):
            cache.accumulated_resid(incl_mid=True)
    # logit lens: at the unembed apply_ln runs the final norm itself on each component (TL recomputes the stats)
    final_norm = gm.hf.get_submodule(gm.spec.final_norm)
    lens = cache.accumulated_resid(apply_ln=True, pos_slice=-1)
    torch.testing.assert_close(lens, final_norm(torch.stack(hf["pre"] + [hf["final"]])[:, :, -1]), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_head_results_sum_with_b_o_to_attn_out(arch):
    gm, cache, hf = run(arch)
    n, h = gm.dims["n_layers"], gm.dims["n_heads"]
    stack, labels = cache.stack_head_results(return_labels=True)
    assert labels == [f"L{l}H{i}" for l in range(n) for i in range(h)] and stack.shape[0] == n * h
    for l in range(n):
        torch.testing.assert_close(stack[l * h:(l + 1) * h].sum(0) + gm.b_O[l].detach(), hf["attn_out"][l], **TOL)
    with_rest, labels = cache.stack_head_results(layer=1, incl_remainder=True, return_labels=True)
    assert labels[-1] == "remainder" and with_rest.shape[0] == h + 1
    torch.testing.assert_close(with_rest.sum(0), hf["pre"][1], **TOL)  # heads + remainder = resid_post of layer 0
    assert cache.stack_head_results(layer=0).shape == (0, 2, 6, gm.dims["d_model"])


@pytest.mark.parametrize("arch", ARCHS)
def test_stack_neuron_results_sum_to_mlp_out_minus_b_out(arch):
    gm, cache, hf = run(arch)
    n = gm.dims["n_layers"]
    f = gm.blocks[0].mlp.W_out.shape[0]
    stack, labels = cache.stack_neuron_results(n, return_labels=True)
    assert labels[:2] == ["L0N0", "L0N1"] and labels[-1] == f"L{n - 1}N{f - 1}" and stack.shape[0] == n * f
    for l in range(n):
        bias = hf["mlp_bias"][l]
        want = hf["mlp_out"][l] - (0 if bias is None else bias)
        torch.testing.assert_close(stack[l * f:(l + 1) * f].sum(0), want, **TOL)
    some, labels = cache.stack_neuron_results(1, neuron_slice=[3, 5], pos_slice=-1, return_labels=True)
    assert labels == ["L0N3", "L0N5"] and some.shape == (2, 2, gm.dims["d_model"])
    post = cache["post", 0, "mlp"][:, -1, 5]
    torch.testing.assert_close(some[1], post[:, None] * gm.blocks[0].mlp.W_out[5].detach(), **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_full_resid_decomposition_sums_to_the_final_residual(arch):
    gm, cache, hf = run(arch)
    stack, labels = cache.get_full_resid_decomposition(return_labels=True)
    assert labels[0] == "L0H0" and "L0N0" in labels and labels[-1] == "bias" and len(labels) == stack.shape[0]
    tail = ["embed", "pos_embed", "bias"] if arch == "gpt2" else ["embed", "bias"]
    assert labels[-len(tail):] == tail
    torch.testing.assert_close(stack.sum(0), hf["final"], **TOL)
    layers, labels = cache.get_full_resid_decomposition(expand_neurons=False, return_labels=True)
    assert f"{gm.dims['n_layers'] - 1}_mlp_out" in labels
    torch.testing.assert_close(layers.sum(0), hf["final"], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_apply_ln_to_stack_is_the_norm_without_weights(arch):
    gm, cache, hf = run(arch)
    final_norm = gm.hf.get_submodule(gm.spec.final_norm)
    want = normalise(hf["final"], final_norm, gm.spec.norm)  # centred for LayerNorm only
    torch.testing.assert_close(cache.apply_ln_to_stack(hf["final"][None])[0], want, **TOL)
    torch.testing.assert_close(cache.decompose_resid(apply_ln=True).sum(0), want, **TOL)  # linear in the stack
    # a layer's input: ln1's cached scale (Falcon 7B's MLP reads the same single norm, so mlp_input uses it too)
    ln1 = gm.hf.get_submodule(gm.spec.layer(1, gm.spec.ln1))
    want1 = normalise(hf["pre"][1], ln1, gm.spec.norm)
    torch.testing.assert_close(cache.apply_ln_to_stack(hf["pre"][1][None], layer=1)[0], want1, **TOL)
    if gm.spec.parallel and gm.spec.ln2 is None:
        torch.testing.assert_close(cache.apply_ln_to_stack(hf["pre"][1][None], layer=1, mlp_input=True)[0], want1,
                                   **TOL)
    sliced = cache.apply_ln_to_stack(hf["final"][None, :, -1], pos_slice=-1, batch_slice=None)
    torch.testing.assert_close(sliced[0], want[:, -1], **TOL)


@pytest.mark.parametrize("arch", ARCHS)
def test_logit_attrs_sum_to_the_logit_difference(arch):
    """DLA with unprocessed weights: with the final norm's weight 1 and bias 0 (set on the HF model for this test), the
    attributions over a full decomposition sum to HF's logit difference minus the b_U difference."""
    model, _, gm = traced(arch)
    norm = model.get_submodule(gm.spec.final_norm)
    saved = {name: p.detach().clone() for name, p in norm.named_parameters()}
    ids = tokens(2, 6)
    right, wrong = ids[:, 1], ids[:, 2]
    try:
        with torch.no_grad():
            norm.weight.fill_(1.0)
            if getattr(norm, "bias", None) is not None:
                norm.bias.zero_()
            logits = model(ids).logits[:, -1]
            _, cache = gm.run_with_cache(ids)
    finally:
        with torch.no_grad():
            for name, p in norm.named_parameters():
                p.copy_(saved[name])
    diff = logits.gather(1, right[:, None])[:, 0] - logits.gather(1, wrong[:, None])[:, 0]
    b_u = gm.b_U.detach()
    stack = cache.decompose_resid(pos_slice=-1)
    attrs = cache.logit_attrs(stack, right, incorrect_tokens=wrong, pos_slice=-1)
    assert attrs.shape == (stack.shape[0], 2)
    torch.testing.assert_close(attrs.sum(0) + b_u[right] - b_u[wrong], diff, **TOL)
    one = cache.logit_attrs(stack, int(right[0]), pos_slice=-1, batch_slice=0)  # one token, batch row 0
    torch.testing.assert_close(one, attrs[:, 0] + cache.logit_attrs(stack, int(wrong[0]), pos_slice=-1,
                                                                   batch_slice=0), **TOL)
    with pytest.raises(ValueError, match="same shape"):
        cache.logit_attrs(stack, right, incorrect_tokens=wrong[:1, None].expand(1, 2), pos_slice=-1)


def test_shorthand_keys_and_missing_scale_errors():
    gm, cache, _ = run("gpt2")
    assert cache["embed"] is cache["hook_embed"] and cache["pos_embed"] is cache["hook_pos_embed"]
    assert cache["pattern", 0] is cache["blocks.0.attn.hook_pattern"]
    assert cache["q", -1, "attn"] is cache[f"blocks.{gm.dims['n_layers'] - 1}.attn.hook_q"]
    assert cache["blocks.0.hook_out"] is cache["blocks.0.hook_resid_post"]
    assert cache["scale"] is cache["ln_final.hook_scale"] and cache["resid_pre", 1] is cache["blocks.1.hook_resid_pre"]
    assert "embed" in cache and ("pattern", 0) in cache
    ids = tokens(1, 4)
    _, partial = gm.run_with_cache(ids, names_filter=lambda name: "resid" in name or "hook_embed" in name)
    with pytest.raises(KeyError, match="ln_final.hook_scale"):
        partial.apply_ln_to_stack(partial["resid_post", -1][None])
    with pytest.raises(KeyError, match="blocks.1.ln2.hook_scale"):
        partial.apply_ln_to_stack(partial["resid_pre", 1][None], layer=1, mlp_input=True)
    with pytest.raises(KeyError, match="blocks.0.attn.hook_z"):
        partial.stack_head_results()


def test_cached_head_results_are_used_and_batch_slices_keep_the_model():
    """A use_attn_result trace caches hook_result: stack_head_results takes those, not z @ W_O (no z needed)."""
    from fxbridge.runtime.cache import ActivationCache
    gm, cache, _ = run("llama")
    n, h, d = gm.dims["n_layers"], gm.dims["n_heads"], gm.dims["d_model"]
    results = {f"blocks.{l}.attn.hook_result": torch.full((2, 6, h, d), float(l)) for l in range(n)}
    fake = ActivationCache(dict(results), n, model=gm)
    stack = fake.stack_head_results()
    assert torch.equal(stack[h * 2], torch.full((2, 6, d), 2.0))
    row = cache.apply_slice_to_batch_dim(1)
    assert row.model is gm and not row.has_batch_dim and torch.equal(row["embed"], cache["embed"][1])
    torch.testing.assert_close(row.decompose_resid().sum(0), cache.decompose_resid().sum(0)[1])
