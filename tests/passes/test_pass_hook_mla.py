"""hook_mla on a toy multi-head latent attention: latents, per-head q / k / v, the shared rotary key, and the key
HF writes into an empty buffer by slice copies rebuilt as a cat (same values, edits reach the attention)."""
import functools

import pytest
import torch
from torch import nn

from toy import (D, GatedMLP, RMSNorm, capture_toy, delta, eager, hook_nodes, max_diff, no_match, op_counts, rotary,
                 run, run_pass, tokens, toy_config, toy_lm, toy_spec, watch)

H, DN, DR, DV, RQ, RKV = 4, 6, 4, 5, 12, 10  # heads, nope / rope parts of a q/k head, value head, LoRA ranks
DIMS = dict(n_layers=2, d_model=D, n_heads=H, n_kv_heads=H, d_head=DN + DR, d_vocab=61, d_nope=DN, d_rope=DR,
            d_head_v=DV, kv_lora_rank=RKV, q_lora_rank=RQ)
SPEC = toy_spec(q=None, k=None, v=None)
NAMES = ["hook_q_latent", "hook_q", "hook_kv_latent", "hook_k_rope", "hook_k", "hook_v"]


class MLA(nn.Module):
    """HF's DeepseekV3Attention in miniature (rotate-half RoPE; ``q_lora=False``: a plain q_proj as V2-Lite)."""

    def __init__(self, q_lora: bool = True, layer_idx: int = 0):
        super().__init__()
        self.q_lora, self.layer_idx, self.seen, self.edit, self.record = q_lora, layer_idx, {}, None, False
        if q_lora:
            self.q_a_proj, self.q_a_layernorm = nn.Linear(D, RQ), RMSNorm(RQ)
            self.q_b_proj = nn.Linear(RQ, H * (DN + DR))
        else:
            self.q_proj = nn.Linear(D, H * (DN + DR))
        self.kv_a_proj_with_mqa = nn.Linear(D, RKV + DR)
        self.kv_a_layernorm = RMSNorm(RKV)
        self.kv_b_proj = nn.Linear(RKV, H * (DN + DV))
        self.o_proj = nn.Linear(H * DV, D)

    def forward(self, x, mask, state):
        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora else self.q_proj(x)
        q = q.view(b, s, -1, DN + DR).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [DN, DR], dim=-1)
        kv, k_rot = torch.split(self.kv_a_proj_with_mqa(x), [RKV, DR], dim=-1)
        kv = self.kv_a_layernorm(kv).view(b, 1, s, RKV)
        q_rot, k_rot = rotary(q_rot), rotary(k_rot.view(b, 1, s, DR))
        if self.record:  # eager runs of the oracle only
            self.seen["k_rope"] = k_rot.transpose(1, 2).detach().clone()
        if self.edit is not None:  # the hand edit of the oracle: the shared rotary key
            k_rot = self.edit(k_rot)
        query = torch.cat((q_pass, q_rot), dim=-1)
        kv = self.kv_b_proj(kv).view(b, s, -1, DN + DV).transpose(1, 2)
        k_nope, v = torch.split(kv, [DN, DV], dim=-1)
        key = kv.new_empty(*kv.shape[:-1], DN + DR)
        key[..., :DN].copy_(k_nope)
        key[..., DN:].copy_(k_rot.expand(-1, H, -1, -1))
        z = torch.ops.fxbridge.attention(query, key, v, mask, (DN + DR) ** -0.5, None, self.layer_idx)
        return self.o_proj(z.reshape(b, s, -1))


class MLALayer(nn.Module):
    def __init__(self, config, i, *, norm=RMSNorm, q_lora=True):
        super().__init__()
        self.input_layernorm, self.post_attention_layernorm = norm(D), norm(D)
        self.self_attn, self.mlp = MLA(q_lora, i), GatedMLP()

    def forward(self, x, mask, state):
        x = x + self.self_attn(self.input_layernorm(x), mask, state)
        return x + self.mlp(self.post_attention_layernorm(x))


@functools.cache
def _toy(q_lora: bool = True):
    return capture_toy(toy_lm(2, layer=MLALayer, config=toy_config(2), q_lora=q_lora))


def _hooked(q_lora: bool = True):
    toy = _toy(q_lora)
    root, graph = toy.fresh()
    dims = DIMS if q_lora else {k: v for k, v in DIMS.items() if k != "q_lora_rank"}
    assert run_pass("hook_mla", graph, root, SPEC, dims) == (12 if q_lora else 10)
    return toy, root, graph


def test_hooks_each_layer_and_rebuilds_the_key_as_a_cat():
    toy = _toy()
    root, graph = toy.fresh()
    before = op_counts(graph)
    run_pass("hook_mla", graph, root, SPEC, DIMS)
    changed = delta(before, op_counts(graph))
    # per layer: the buffer, its 2 slices and 2 copies go, one cat comes
    assert changed["aten.new_empty.default"] == -2 and changed["aten.copy_.default"] == -4
    assert changed["aten.cat.default"] == 2
    assert hook_nodes(graph) == [f"blocks.{i}.attn.{n}" for i in range(2) for n in NAMES]
    ids = tokens()
    assert max_diff(run(root, graph, ids), eager(toy.model, ids)) == 0.0


def test_the_hooks_see_hf_values():
    toy, root, graph = _hooked()
    names = [f"blocks.1.attn.{n}" for n in NAMES]
    seen = watch(root, names)
    ids = tokens()
    run(root, graph, ids)
    attn = toy.model.model.layers[1].self_attn
    io = {}
    handles = [getattr(attn, m).register_forward_hook(lambda mod, a, out, m=m: io.__setitem__(m, out.detach()))
               for m in ("q_a_layernorm", "q_b_proj", "kv_a_layernorm", "kv_b_proj")]
    attn.record = True
    try:
        eager(toy.model, ids)
    finally:
        attn.record = False
        for h in handles:
            h.remove()
    b, s = ids.shape
    assert torch.equal(seen["blocks.1.attn.hook_q_latent"], io["q_a_layernorm"])
    assert torch.equal(seen["blocks.1.attn.hook_kv_latent"], io["kv_a_layernorm"])
    assert torch.equal(seen["blocks.1.attn.hook_q"], io["q_b_proj"].view(b, s, H, DN + DR))
    kv = io["kv_b_proj"].view(b, s, H, DN + DV)
    assert torch.equal(seen["blocks.1.attn.hook_k"], kv[..., :DN])
    assert torch.equal(seen["blocks.1.attn.hook_v"], kv[..., DN:])
    assert seen["blocks.1.attn.hook_k_rope"].shape == (b, s, 1, DR)
    assert torch.equal(seen["blocks.1.attn.hook_k_rope"], attn.seen["k_rope"])  # after RoPE


def test_an_edit_of_the_shared_rotary_key_reaches_every_head():
    toy, root, graph = _hooked()

    def halve(t, hook):
        t.mul_(0.5)  # in place
    root.get_submodule("blocks.0.attn.hook_k_rope").add_hook(halve)
    ids = tokens()
    attn = toy.model.model.layers[0].self_attn
    attn.edit = lambda k: k * 0.5
    try:
        want = eager(toy.model, ids)
    finally:
        attn.edit = None
    got = run(root, graph, ids)
    assert max_diff(got, want) < 1e-6 and max_diff(got, eager(toy.model, ids)) > 1e-4


def test_without_a_query_lora_there_is_no_query_latent():
    toy, root, graph = _hooked(q_lora=False)
    assert hook_nodes(graph) == [f"blocks.{i}.attn.{n}" for i in range(2) for n in NAMES if n != "hook_q_latent"]
    seen = watch(root, ["blocks.0.attn.hook_q"])
    ids = tokens()
    run(root, graph, ids)
    out = {}
    h = toy.model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda m, a, o: out.setdefault("q", o))
    try:
        eager(toy.model, ids)
    finally:
        h.remove()
    assert torch.equal(seen["blocks.0.attn.hook_q"], out["q"].view(*ids.shape, H, DN + DR))


def test_split_sizes_unlike_the_config_are_named():
    toy = _toy()
    root, graph = toy.fresh()
    err = no_match("hook_mla", graph, root, SPEC, dict(DIMS, d_head_v=DV + 1, d_nope=DN - 1))
    assert "kv_b_proj" in str(err) and "split" in str(err)


def test_a_model_without_mla_matches_nothing():
    from toy import captured
    toy = captured("llama")
    root, graph = toy.fresh()
    err = no_match("hook_mla", graph, root, SPEC, DIMS)
    assert "hook_mla" in str(err)
