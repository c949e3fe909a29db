"""TransformerLens's forward keywords on a traced module: return types, loss, partial forwards, positions, incl_bwd.

Oracles: HF eager (its logits, its ``labels=`` loss, decoder-layer outputs and their gradients recorded with torch
hooks on the HF model) and TransformerLens's loss formula written out here.
"""
import pytest
import torch
import torch.nn.functional as F
from conftest import traced
from tiny import forward_hooks, left_padded, tokens

pytestmark = pytest.mark.xdist_group("llama")
ARCHS = ["llama", "gpt2"]


def _layer_outputs(model, layers):
    """{i: output of HF decoder layer i} recorded by forward hooks (the HF oracle for resid_post)."""
    seen = {}

    def rec(i):
        def hook(module, args, out):
            seen[i] = out[0] if isinstance(out, tuple) else out
        return hook
    return seen, [(layers[i], rec(i)) for i in range(len(layers))]


def _decoder_layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


@pytest.mark.parametrize("arch", ARCHS)
def test_return_types_and_loss_equal_hf(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 9)
    with torch.no_grad():
        hf = ref(input_ids=ids, labels=ids)
        logits = gm(ids, return_type="logits")
        loss = gm(ids, return_type="loss")
        both = gm(ids, return_type="both")
        per_token = gm(ids, return_type="loss", loss_per_token=True)
        nothing = gm(ids, return_type=None)
    assert (logits - hf.logits).abs().max() < 1e-5
    assert abs(loss.item() - hf.loss.item()) < 1e-5
    assert both.logits is not None and (both.logits - hf.logits).abs().max() < 1e-5
    assert abs(both.loss.item() - hf.loss.item()) < 1e-5
    assert nothing is None
    # per token: -log p(token t+1), [B, S-1], written out from HF's logits
    expected = -F.log_softmax(hf.logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert per_token.shape == (2, 8)
    assert (per_token - expected).abs().max() < 1e-5


def test_loss_with_a_mask_counts_only_unmasked_pairs():
    _, ref, gm = traced("llama")
    ids, mask = left_padded(2, 8, pads=[0, 3])
    with torch.no_grad():
        hf_logits = ref(input_ids=ids, attention_mask=mask).logits
        loss = gm(ids, attention_mask=mask, return_type="loss")
    lp = -F.log_softmax(hf_logits, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    keep = (mask[:, :-1] * mask[:, 1:]).bool()  # TL: the token and the next one are both real
    assert abs(loss.item() - lp[keep].mean().item()) < 1e-5


def test_unknown_return_type_lists_the_choices():
    _, _, gm = traced("llama")
    with pytest.raises(ValueError, match="'logits', 'loss', 'both', None"):
        gm(tokens(1, 4), return_type="probs")


@pytest.mark.parametrize("arch", ARCHS)
def test_stop_at_layer_covers_minus_n_to_n(arch):
    model, ref, gm = traced(arch)
    n = gm.dims["n_layers"]
    ids = tokens(2, 6)
    layers = _decoder_layers(ref)
    seen, pairs = _layer_outputs(ref, layers)
    with torch.no_grad(), forward_hooks(*pairs):
        ref(input_ids=ids)
    with torch.no_grad():
        assert (gm(ids, stop_at_layer=n) - seen[n - 1]).abs().max() < 1e-5  # the last block's output
        assert (gm(ids, stop_at_layer=-1) - seen[n - 2]).abs().max() < 1e-5  # blocks[:-1], as a Python slice
        assert (gm(ids, stop_at_layer=1) - seen[0]).abs().max() < 1e-5
        assert (gm(ids, stop_at_layer=-n) - gm(ids, stop_at_layer=0)).abs().max() == 0
    for bad in (n + 1, -n - 1):
        with pytest.raises(ValueError, match=rf"\[-{n}, {n}\]"):
            gm(ids, stop_at_layer=bad)


@pytest.mark.parametrize("arch", ARCHS)
def test_start_at_layer_runs_the_rest_from_a_residual(arch):
    model, ref, gm = traced(arch)
    ids = tokens(2, 6)
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
        resid = gm(ids, stop_at_layer=1)
        fired = []
        gm.add_hook("blocks.1.hook_resid_pre", lambda t, hook: fired.append(t.clone()))
        gm.add_hook("blocks.0.hook_resid_post", lambda t, hook: fired.append("layer 0 ran"))
        try:
            got = gm(resid, start_at_layer=1, tokens=ids)
            loss = gm(resid, start_at_layer=1, tokens=ids, return_type="loss")
            mid = gm(resid, start_at_layer=1, stop_at_layer=2)
        finally:
            gm.reset_hooks()
        assert (got - expected).abs().max() < 1e-5
        assert abs(loss.item() - ref(input_ids=ids, labels=ids).loss.item()) < 1e-5
        assert len(fired) == 3 and all(isinstance(f, torch.Tensor) and (f == resid).all() for f in fired)
        seen, pairs = _layer_outputs(ref, _decoder_layers(ref))
        with forward_hooks(*pairs):
            ref(input_ids=ids)
        assert (mid - seen[1]).abs().max() < 1e-5
        # a different residual changes the output: the input really is what the blocks read
        assert (gm(resid * 2, start_at_layer=1) - expected).abs().max() > 1e-3


def test_start_at_layer_needs_tokens_for_the_loss():
    _, _, gm = traced("llama")
    resid = torch.zeros(1, 4, gm.dims["d_model"])
    with pytest.raises(ValueError, match="tokens="):
        gm(resid, start_at_layer=1, return_type="loss")


@pytest.mark.parametrize("arch", ARCHS)
def test_position_ids_are_passed_as_hf_takes_them(arch):
    model, ref, gm = traced(arch)
    ids, mask = left_padded(2, 7, pads=[0, 3])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        default = ref(input_ids=ids, attention_mask=mask).logits
        got = gm(ids, attention_mask=mask, position_ids=positions)
        plain = gm(ids, attention_mask=mask)
    keep = mask.bool()
    assert (got - expected)[keep].abs().max() < 1e-5
    assert (plain - default)[keep].abs().max() < 1e-5  # no positions given: HF's default (0..S-1)
    if arch == "gpt2":  # learned absolute positions: a shifted row changes (RoPE is shift-invariant)
        assert (expected - default)[keep].abs().max() > 1e-3


def test_run_with_cache_incl_bwd_runs_the_backward():
    model, ref, gm = traced("llama")
    ids = tokens(1, 6)
    layers = _decoder_layers(ref)
    outs = {}

    def keep(i):
        def hook(module, args, out):
            out = out[0] if isinstance(out, tuple) else out
            out.retain_grad()
            outs[i] = out
        return hook
    with forward_hooks(*[(layers[i], keep(i)) for i in range(len(layers))]):
        ref(input_ids=ids, labels=ids).loss.backward()
    ref.zero_grad(set_to_none=True)
    loss, cache = gm.run_with_cache(ids, return_type="loss", incl_bwd=True,
                                    names_filter=lambda name: name.endswith("hook_resid_post"))
    model.zero_grad(set_to_none=True)
    for i in range(len(layers)):
        assert (cache[f"blocks.{i}.hook_resid_post_grad"] - outs[i].grad).abs().max() < 1e-6
    with pytest.raises(ValueError, match="return_type='loss'"):
        gm.run_with_cache(ids, incl_bwd=True)
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())


def test_hook_layer_ctx_and_tl_reset_hooks():
    _, _, gm = traced("llama")
    hp = gm.hook_dict["blocks.2.attn.hook_z"]
    assert hp.layer() == 2 and hp.name == "blocks.2.attn.hook_z"
    with pytest.raises(ValueError, match="not inside a block"):
        gm.hook_dict["hook_embed"].layer()

    def count(t, hook):
        hook.ctx["calls"] = hook.ctx.get("calls", 0) + 1
    gm.add_hook("blocks.2.attn.hook_z", count)
    gm(tokens(1, 3))
    gm(tokens(1, 3))
    assert hp.ctx["calls"] == 2  # ctx persists across calls
    gm.reset_hooks(False)  # TL's positional order: clear_contexts first
    assert hp.ctx["calls"] == 2 and not hp.has_hooks
    gm.reset_hooks()
    assert hp.ctx == {}
    gm.run_with_hooks(tokens(1, 3), fwd_hooks=[("blocks.2.attn.hook_z", count)], clear_contexts=True)
    assert hp.ctx == {}


def test_hf_spellings_and_refused_arguments():
    model, ref, gm = traced("llama")
    ids = tokens(1, 5)
    with torch.no_grad():
        assert (gm(input_ids=ids) - ref(input_ids=ids).logits).abs().max() < 1e-5
    with pytest.raises(TypeError, match="past_key_values: generation"):
        gm(ids, past_key_values=None)
    with pytest.raises(TypeError, match="labels: use return_type='loss'"):
        gm(ids, labels=ids)


def test_a_family_without_position_ids_refuses_them():
    _, _, gm = traced("bloom")
    ids = tokens(1, 4)
    from fxbridge import UsageError
    with pytest.raises(UsageError, match="takes no position_ids"):
        gm(ids, position_ids=torch.arange(4)[None])


def test_string_input_and_the_tokenizer_survive_copies():
    """A string batch runs through the tokenizer; a left-padded one gets its mask and mask-derived positions (HF's
    generate's), checked against HF with both passed; deepcopy and pickling keep the tokenizer."""
    import copy
    import pickle

    import fxbridge as bridge
    from tiny_tokenizer import gpt2_like
    model, ref, _ = traced("gpt2")
    gm = bridge.trace(model, tokenizer=gpt2_like())
    texts = ["the cat sat on the mat", "hello world"]
    ids = gm.to_tokens(texts, padding_side="left")
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - torch.tensor([7, 3])[:, None]).long()  # 6 / 2 words + BOS
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        got = gm(texts, padding_side="left")
        loss = gm(texts, padding_side="left", return_type="loss")
    keep = mask.bool()
    assert (got - expected)[keep].abs().max() < 1e-5
    lp = -F.log_softmax(expected, -1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    assert abs(loss.item() - lp[(mask[:, :-1] * mask[:, 1:]).bool()].mean().item()) < 1e-5
    for other in (copy.deepcopy(gm), pickle.loads(pickle.dumps(gm))):
        assert other.tokenizer is not None and other.tokenizer is not gm.tokenizer
        assert (other.to_tokens(texts) == gm.to_tokens(texts)).all()
    with pytest.raises(bridge.UsageError, match="tokenizer="):
        traced("llama")[2]("hello")


@pytest.mark.parametrize("arch", [*ARCHS, "gemma"])
def test_calling_a_norm_computes_the_hf_norm(arch):
    """TL notebooks call ``model.ln_final(resid)`` and ``model.blocks[i].ln1(resid)``: HF's whole norm (weights,
    Gemma's 1 + w), not the graph's normalisation alone."""
    model, ref, gm = traced(arch)
    x = torch.randn(2, 3, gm.dims["d_model"])
    hf_final = ref.model.norm if hasattr(ref, "model") else ref.transformer.ln_f
    hf_ln1 = _decoder_layers(ref)[0]
    hf_ln1 = getattr(hf_ln1, "input_layernorm", None) or hf_ln1.ln_1
    with torch.no_grad():
        assert (gm.ln_final(x) - hf_final(x)).abs().max() < 1e-6
        assert (gm.blocks[0].ln1(x) - hf_ln1(x)).abs().max() < 1e-6
    assert torch.equal(gm.ln_final.w, hf_final.weight)


def test_run_with_cache_pos_slice_keeps_the_positions_tl_keeps():
    """TL's pos_slice: the position dim is -3 for per-head activations (q, k, v, z), -2 for the rest (the query
    positions of scores and patterns); an int drops the dim."""
    _, _, gm = traced("llama")
    ids = tokens(2, 6)
    with torch.no_grad():
        _, full = gm.run_with_cache(ids)
        _, last = gm.run_with_cache(ids, pos_slice=-1)
        _, span = gm.run_with_cache(ids, pos_slice=(1, 4), remove_batch_dim=False)
    assert torch.equal(last["blocks.0.hook_resid_pre"], full["blocks.0.hook_resid_pre"][:, -1])
    assert torch.equal(last["blocks.0.attn.hook_z"], full["blocks.0.attn.hook_z"][:, -1])
    assert torch.equal(last["blocks.0.attn.hook_rot_q"], full["blocks.0.attn.hook_rot_q"][:, -1])
    assert torch.equal(last["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"][:, :, -1])
    assert torch.equal(span["blocks.1.mlp.hook_post"], full["blocks.1.mlp.hook_post"][:, 1:4])
    assert torch.equal(span["blocks.1.attn.hook_k"], full["blocks.1.attn.hook_k"][:, 1:4])


def test_run_with_cache_reset_hooks_end_false_leaves_the_caching_hooks():
    _, _, gm = traced("llama")
    try:
        _, cache = gm.run_with_cache(tokens(1, 3), names_filter="blocks.0.hook_resid_pre", reset_hooks_end=False)
        assert gm.hook_dict["blocks.0.hook_resid_pre"].has_hooks  # as TL: still attached
        gm(tokens(1, 5))
        assert cache["blocks.0.hook_resid_pre"].shape[1] == 5  # and still caching
    finally:
        gm.reset_hooks()
