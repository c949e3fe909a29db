"""Interventions with known answers: edits through hooks equal the same edit made by hand on HF."""
import torch

import tiny
from tiny import mid_hook, tokens

TOL = 1e-5


def _z_reader(ref, gm, layer, arch):
    """The HF module hook_z feeds: the output projection, or the family's ``z_feeds`` fact (a module path relative
    to the layer; BitNet: the attention sub-norm between the heads and o_proj)."""
    spec = gm.spec
    rel = tiny.FAMILY.get(arch, {}).get("z_feeds", f"{spec.attn}.{spec.o_proj}")
    return ref.get_submodule(spec.layer(layer, rel))


def test_zero_head_via_hook_z_equals_manual_hf_edit(trio, arch):
    _, ref, gm = trio
    layer, head, dh = 1, 2, gm.dims.get("d_head_v", gm.dims["d_head"])  # o_proj reads the value heads (MLA: v_head_dim)
    ids = tokens(2, 7)

    def zero_head(z, hook):
        z[:, :, head] = 0.0

    def zero_input_columns(module, args):
        x = args[0].clone()
        x[..., head * dh:(head + 1) * dh] = 0.0
        return (x,)

    # a family whose heads reach no module as columns of its input (JetMoE's output experts read expert-sorted
    # rows) makes the same edit on HF its own way: FAMILY "zero_head_in_hf"(ref, layer, head, dh) -> hook handles
    edit = tiny.FAMILY.get(arch, {}).get("zero_head_in_hf")
    handles = edit(ref, layer, head, dh) if edit else [
        _z_reader(ref, gm, layer, arch).register_forward_pre_hook(zero_input_columns)]
    try:
        with torch.no_grad():
            expected = ref(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    with torch.no_grad():
        got = gm.run_with_hooks(ids, fwd_hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
        clean = gm(ids)
    assert (got - expected).abs().max().item() < TOL
    assert (got - clean).abs().max().item() > 1e-4  # the ablation did something


def test_replacing_pattern_changes_output_and_is_used(core_trio, core_arch):
    arch = core_arch
    _, ref, gm = core_trio
    ids = tokens(2, 6)
    n_rep = gm.dims["n_heads"] // gm.dims["n_kv_heads"]

    def identity_pattern(pattern, hook):
        return torch.eye(pattern.shape[-1], dtype=pattern.dtype).expand_as(pattern).clone()

    with torch.no_grad():
        clean = gm(ids)
        with gm.hooks(fwd_hooks=[("blocks.0.attn.hook_pattern", identity_pattern)]):
            edited, cache = gm.run_with_cache(ids, names_filter=["blocks.0.attn.hook_v", "blocks.0.attn.hook_z"])
    assert (edited - clean).abs().max().item() > 1e-4
    # attending only to itself, each head's z is its own position's value vector
    v = cache["v", 0]
    v_norm = getattr(ref.get_submodule(gm.spec.layer(0, gm.spec.attn)), "v_norm", None)
    if v_norm is not None:  # Gemma 4 attends to v_norm(v); hook_v is before it (HOOKS.md)
        with torch.no_grad():
            v = v_norm(v)
    # FAMILY "z_of_values": how the heads read the KV heads (JetMoE repeats them: head h reads h % Hkv), or None
    # where hook_z is not pattern @ V (DiffLlama: the o_proj input, after the difference and the group norm)
    z_of_values = tiny.FAMILY.get(arch, {}).get("z_of_values", lambda v, n: v.repeat_interleave(n, dim=2))
    if z_of_values is not None:
        assert (cache["z", 0] - z_of_values(v, n_rep)).abs().max().item() < TOL


def test_editing_scores_takes_effect(core_trio):
    _, _, gm = core_trio
    ids = tokens(1, 4)  # within Mistral's sliding window of 4, so token 0 is visible everywhere

    def only_first_token(scores, hook):
        scores[..., 1:] = torch.finfo(scores.dtype).min

    with torch.no_grad(), gm.hooks(fwd_hooks=[("blocks.1.attn.hook_attn_scores", only_first_token)]):
        _, cache = gm.run_with_cache(ids, names_filter=lambda name: name.startswith("blocks.1.attn.hook_")
                                     and name.split(".")[-1] in ("hook_pattern", "hook_attn_scores", "hook_sink_logits"))
    pattern, expected = cache["pattern", 1], torch.ones_like(cache["pattern", 1][..., 0])
    if "blocks.1.attn.hook_sink_logits" in cache:  # attention sinks (gpt_oss) keep their share: softmax([s_0, sink])
        sinks = cache["blocks.1.attn.hook_sink_logits"].reshape(1, -1, 1)
        expected = torch.sigmoid(cache["attn_scores", 1][..., 0] - sinks)
    assert torch.allclose(pattern[..., 0], expected) and (pattern[..., 1:] == 0).all()


def test_in_place_edit_of_norm_scale_propagates(core_trio):
    _, _, gm = core_trio
    ids = tokens(1, 4)
    # Falcon 7B style: one norm for attention and MLP; post-norm-only blocks (OLMo 2, FlexOlmo): their post-norms
    ln = next(n for n in ("ln2", "ln1", "ln2_post", "ln1_post") if f"blocks.0.{n}.hook_scale" in gm.hook_dict)
    with torch.no_grad():
        _, clean = gm.run_with_cache(ids, names_filter=f"blocks.0.{ln}.hook_normalized")

        def double(scale, hook):
            scale.mul_(2.0)

        with gm.hooks(fwd_hooks=[(f"blocks.0.{ln}.hook_scale", double)]):
            _, edited = gm.run_with_cache(ids, names_filter=f"blocks.0.{ln}.hook_normalized")
    name = f"blocks.0.{ln}.hook_normalized"
    torch.testing.assert_close(edited[name], clean[name] / 2)


def test_backward_hooks_receive_the_gradient(core_trio):
    _, _, gm = core_trio
    ids = tokens(2, 5)
    saved, grads = {}, {}
    name = mid_hook(gm, 1)

    def keep(t, hook):
        saved["act"] = t

    def grad_hook(g, hook):
        grads[hook.name] = g.clone()

    logits = gm.run_with_hooks(ids, fwd_hooks=[(name, keep)], bwd_hooks=[(name, grad_hook)])
    loss = logits.float().logsumexp(-1).mean()
    expected = torch.autograd.grad(loss, saved["act"], retain_graph=True)[0]
    loss.backward()
    assert grads[name].shape == saved["act"].shape
    torch.testing.assert_close(grads[name], expected)
    gm.zero_grad(set_to_none=True)


def test_gqa_kv_head_edit_reaches_only_its_group():
    from conftest import traced
    _, _, gm = traced("llama")
    ids = tokens(1, 6)
    n_rep = gm.dims["n_heads"] // gm.dims["n_kv_heads"]
    assert n_rep > 1

    def bump_kv_head_0(k, hook):
        k[:, :, 0] += 3.0

    with torch.no_grad():
        _, clean = gm.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
        with gm.hooks(fwd_hooks=[("blocks.0.attn.hook_k", bump_kv_head_0)]):
            _, edited = gm.run_with_cache(ids, names_filter="blocks.0.attn.hook_pattern")
    changed = (edited["pattern", 0] - clean["pattern", 0]).abs().amax(dim=(0, 2, 3)) > 1e-6
    assert changed.tolist() == [h < n_rep for h in range(gm.dims["n_heads"])]
