"""The hook contract under the inputs people really give it (probe defects 3, 4, 7 and the smaller items of 12)."""
import numpy as np
import pytest
import torch

import fxbridge as bridge
from tiny import build, tokens

N_HEADS, D_HEAD = 4, 16


@pytest.fixture(scope="module")
def llama():
    model = build("llama")
    return model, bridge.trace(model)


@pytest.fixture(scope="module")
def gpt2():
    model = build("gpt2")
    return model, bridge.trace(model)


# ------------------------------------------------------------------------------------------------ stop_at_layer
@pytest.mark.parametrize("bad", [True, False, 1.0, 0.5, "1", [1]])
def test_stop_at_layer_of_the_wrong_type_raises_and_does_not_poison_the_cache(llama, gpt2, bad):
    for model, gm in (llama, gpt2):
        with pytest.raises(TypeError, match="stop_at_layer must be an int"):
            gm(tokens(1, 5), stop_at_layer=bad)
        out = gm(tokens(1, 5), stop_at_layer=1)  # a valid call afterwards: the residual before layer 1
        _, cache = gm.run_with_cache(tokens(1, 5), names_filter="blocks.1.hook_resid_pre")
        torch.testing.assert_close(out, cache["blocks.1.hook_resid_pre"], rtol=0, atol=0)


def test_stop_at_layer_accepts_integer_like_indices(llama):
    _, gm = llama
    ref = gm(tokens(1, 5), stop_at_layer=2)
    for index in (np.int64(2), torch.tensor(2), -1):
        torch.testing.assert_close(gm(tokens(1, 5), stop_at_layer=index), ref, rtol=0, atol=0)


# ----------------------------------------------------------------------------------- in-place edits, autograd
def _hf_loss_and_grads(model, ids, zero_head: int, layer: int):
    """Oracle: HF with head ``zero_head`` of layer ``layer`` removed at the input of its o_proj (= hook_z)."""
    o_proj = model.model.layers[layer].self_attn.o_proj

    def ablate(module, args):
        z = args[0].clone()
        z[..., zero_head * D_HEAD:(zero_head + 1) * D_HEAD] = 0
        return (z,)

    handle = o_proj.register_forward_pre_hook(ablate)
    try:
        model.zero_grad()
        loss = model(ids).logits.logsumexp(-1).mean()
        loss.backward()
    finally:
        handle.remove()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_in_place_hook_z_ablation_works_under_autograd_and_matches_hf(llama):
    """The README's zero_head_2: edit in place, then backward() -- as TransformerLens code does."""
    model, gm = llama
    ids = tokens(2, 7)
    expected_loss, expected_grads = _hf_loss_and_grads(model, ids, zero_head=2, layer=1)

    def zero_head_2(z, hook):
        z[:, :, 2] = 0

    model.zero_grad()
    loss = gm.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_2)]).logsumexp(-1).mean()
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss, rtol=0, atol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    model.zero_grad()


@pytest.mark.parametrize("point", ["blocks.0.attn.hook_pattern", "blocks.0.attn.hook_attn_scores",
                                   "blocks.1.attn.hook_z", "blocks.0.mlp.hook_post", "blocks.0.ln1.hook_scale"])
def test_in_place_edit_equals_returned_edit_under_autograd(llama, point):
    """TransformerLens semantics: ``t.mul_(0.5)`` in a hook is the same intervention as ``return t * 0.5``."""
    model, gm = llama
    ids = tokens(2, 7)

    def run(hook):
        model.zero_grad()
        loss = gm.run_with_hooks(ids, fwd_hooks=[(point, hook)]).logsumexp(-1).mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    ret_loss, ret_grads = run(lambda t, hook: t * 0.5)
    def halve_in_place(t, hook):
        t.mul_(0.5)

    inplace_loss, inplace_grads = run(halve_in_place)
    plain = gm(ids).logsumexp(-1).mean().detach()
    assert abs(float(ret_loss - plain)) > 1e-6  # the edit did something
    torch.testing.assert_close(inplace_loss, ret_loss, rtol=0, atol=0)
    for a, b in zip(inplace_grads, ret_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    model.zero_grad()


def test_gpt2_pos_embed_can_be_edited_in_place(gpt2):
    model, gm = gpt2
    ids = tokens(2, 7)

    def halve_pos(t, hook):
        t.mul_(0.5)  # (fill_/zero_ happen to accept an expanded tensor; arithmetic in place does not)

    with torch.no_grad():
        out = gm.run_with_hooks(ids, fwd_hooks=[("hook_pos_embed", halve_pos)])
        wpe = model.transformer.wpe.weight.clone()
        model.transformer.wpe.weight.mul_(0.5)  # oracle: HF with its position embeddings halved
        try:
            expected = model(ids).logits
        finally:
            model.transformer.wpe.weight.copy_(wpe)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ hook return dtype
@pytest.mark.parametrize("point, dtype", [("blocks.0.hook_resid_mid", torch.int64),
                                          ("blocks.1.hook_resid_post", torch.float64),
                                          ("blocks.0.attn.hook_z", torch.float16),
                                          ("blocks.0.attn.hook_pattern", torch.float16),
                                          ("hook_unembed", torch.float64)])
def test_a_hook_returning_another_dtype_is_named(llama, point, dtype):
    _, gm = llama
    with pytest.raises(bridge.HookShapeError) as err:
        gm.run_with_hooks(tokens(2, 7), fwd_hooks=[(point, lambda t, hook: t.to(dtype))])
    msg = str(err.value)
    assert point in msg and str(dtype).replace("torch.", "") in msg and "float32" in msg
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())


# --------------------------------------------------------------------------------------------- cache aliases
def test_the_cache_resolves_the_aliases_names_filter_accepts(llama):
    _, gm = llama
    alias = next(a for a, c in gm.aliases.items() if c == "blocks.0.attn.hook_q")
    _, cache = gm.run_with_cache(tokens(2, 7), names_filter=alias)
    assert alias in cache and "blocks.0.attn.hook_q" in cache
    assert cache[alias] is cache["blocks.0.attn.hook_q"]
    assert cache.to("cpu")[alias].shape == (2, 7, N_HEADS, D_HEAD)


# ------------------------------------------------------------------------------ exceptions inside the graph
def test_an_exception_inside_the_graph_prints_nothing_to_stderr(llama, capfd):
    _, gm = llama
    with pytest.raises(IndexError):
        gm(torch.full((1, 4), 10_000))  # id out of the vocabulary: HF's own IndexError
    with pytest.raises(IndexError):
        gm(torch.full((1, 4), 10_000), stop_at_layer=1)
    captured = capfd.readouterr()
    assert "FX-traced Module" not in captured.err and captured.err.count("\n") < 3, captured.err


@pytest.mark.parametrize("kwarg", ["inputs_embeds", "past_key_values", "use_cache", "labels"])
def test_hf_forward_arguments_the_capture_does_not_cover_are_named(llama, kwarg):
    _, gm = llama
    with pytest.raises(TypeError, match=f"does not take {kwarg}"):
        gm(tokens(1, 4), **{kwarg: None})
