"""Every hook in HOOKS.md exists for these families, fires exactly once per forward, with the stated shape."""
import pytest
import torch

import tiny
from tiny import mid_hook, tokens

# Golden per-layer hook lists, written from HOOKS.md (not from the code under test).
LAYER_HOOKS = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k",
               "attn.hook_v", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out",
               "hook_resid_mid", "ln2.hook_scale", "ln2.hook_normalized", "mlp.hook_pre", "mlp.hook_post",
               "hook_mlp_out", "hook_resid_post"]
ROTARY = ["attn.hook_rot_q", "attn.hook_rot_k"]
GATED = ["mlp.hook_pre_linear"]
SANDWICH = ["ln1_post.hook_scale", "ln1_post.hook_normalized", "ln2_post.hook_scale", "ln2_post.hook_normalized"]
ATTN_SOFTCAP = ["attn.hook_attn_scores_pre_cap"]
# Gemma 4 (architectures/gemma4.py): per-layer embeddings and the MoE block next to the MLP
GEMMA4 = ["ple.hook_per_layer_input", "ple.hook_gate", "ple.hook_gated", "hook_ple_out", "mlp.hook_router_logits",
          "mlp.hook_router_probs", "mlp.hook_expert_indices", "mlp.hook_routing_weights", "mlp.hook_expert_out",
          "hook_moe_out"]
# An MoE layer (HOOKS.md, mixture of experts): the routing hooks replace the dense MLP's hook_pre/pre_linear/post
MOE = ["mlp.hook_router_logits", "mlp.hook_expert_indices", "mlp.hook_routing_weights", "mlp.hook_expert_out"]
DENSE_MLP = ["mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"]
FAMILY = {
    "llama": dict(rotary=True, gated=True, pos=False),
    "mistral": dict(rotary=True, gated=True, pos=False),
    "qwen2": dict(rotary=True, gated=True, pos=False),
    "qwen3": dict(rotary=True, gated=True, pos=False),
    "gpt2": dict(rotary=False, gated=False, pos=True),
    "gemma": dict(rotary=True, gated=True, pos=False),
    "gemma2": dict(rotary=True, gated=True, pos=False, sandwich=True, attn_softcap=True, final_softcap=True),
    # HF's Gemma 3 never passes attn_logit_softcapping to its attention function: no attention softcap
    "gemma3_text": dict(rotary=True, gated=True, pos=False, sandwich=True, final_softcap=True),
    "gpt_bigcode": dict(rotary=False, gated=False, pos=True),
    "gpt_bigcode_mha": dict(rotary=False, gated=False, pos=True),
    # Falcon: parallel blocks have no resid_mid; the 7B style has one norm for attention and MLP (no ln2)
    "falcon_7b": dict(rotary=True, gated=False, pos=False, parallel=True, ln2=False),
    "falcon_mha": dict(rotary=True, gated=False, pos=False),
    "falcon_rw": dict(rotary=False, gated=False, pos=False),
    "falcon_new_mqa": dict(rotary=True, gated=False, pos=False, parallel=True),
    "falcon_40b": dict(rotary=True, gated=False, pos=False, parallel=True),
    # layers 3 and 4 reuse the keys/values of layers 1 and 2: no k/v projections, so no hook_k / hook_v
    "gemma4_text": dict(rotary=True, gated=True, pos=False, sandwich=True, final_softcap=True, extra=GEMMA4,
                        kv_shared_layers=(3, 4)),
}


FAMILY.update(tiny.FAMILY)  # the family groups' facts (tests/tiny_<group>.py)


def golden(arch: str, n_layers: int) -> set[str]:
    """Facts: rotary, gated, pos (learned positions), sandwich, attn_softcap, final_softcap, parallel (no
    resid_mid), ln2=False (one norm), extra (more per-layer hooks), drop (per-layer hooks the family lacks),
    moe_layers (layers whose MLP is an MoE block: routing hooks instead of hook_pre/pre_linear/post), moe_extra
    (more hooks of those layers: shared experts),
    nope_layers (layers without rotary: no rot hooks), kv_shared_layers (no k/v hooks), top (more model-level
    hooks), final_norm=False (no ln_final)."""
    f = FAMILY[arch]
    per_layer = LAYER_HOOKS + (ROTARY if f["rotary"] else []) + (GATED if f["gated"] else [])
    per_layer += (SANDWICH if f.get("sandwich") else []) + (ATTN_SOFTCAP if f.get("attn_softcap") else [])
    if f.get("parallel"):
        per_layer = [h for h in per_layer if h != "hook_resid_mid"]
    if f.get("ln2") is False:
        per_layer = [h for h in per_layer if not h.startswith("ln2.")]
    per_layer += f.get("extra", [])
    per_layer = [h for h in per_layer if h not in f.get("drop", ())]
    names = {"hook_embed", "hook_unembed", *f.get("top", ())}
    if f.get("final_norm", True):
        names |= {"ln_final.hook_scale", "ln_final.hook_normalized"}
    if f["pos"]:
        names.add("hook_pos_embed")
    if f.get("final_softcap"):
        names.add("hook_logits")
    moe_layers = set(f.get("moe_layers", ()))
    moe = {f"blocks.{i}.{h}" for i in moe_layers for h in MOE + f.get("moe_extra", [])}
    shared = {f"blocks.{i}.attn.{h}" for i in f.get("kv_shared_layers", ()) for h in ("hook_k", "hook_v")}
    shared |= {f"blocks.{i}.{h}" for i in moe_layers for h in DENSE_MLP}
    shared |= {f"blocks.{i}.{h}" for i in f.get("nope_layers", ()) for h in ROTARY}
    return (names | moe | {f"blocks.{i}.{h}" for i in range(n_layers) for h in per_layer}) - shared


def expected_shape(name: str, dims: dict, batch: int, seq: int) -> tuple:
    B, S, D, H, Hkv, dh = batch, seq, dims["d_model"], dims["n_heads"], dims["n_kv_heads"], dims["d_head"]
    leaf = name.split(".")[-1]
    table = {
        "hook_q": (B, S, H, dh), "hook_rot_q": (B, S, H, dh), "hook_z": (B, S, H, dh),
        "hook_k": (B, S, Hkv, dh), "hook_v": (B, S, Hkv, dh), "hook_rot_k": (B, S, Hkv, dh),
        "hook_attn_scores": (B, H, S, S), "hook_pattern": (B, H, S, S),
        "hook_scale": (B, S, 1), "hook_unembed": (B, S, dims["d_vocab"]),
        "hook_attn_scores_pre_cap": (B, H, S, S), "hook_logits": (B, S, dims["d_vocab"]),
    }
    if "d_per_layer_input" in dims or "n_experts" in dims:  # Gemma 4: PLE [B,S,P], MoE [B,S,E|K(,D)]
        P, E, K = dims.get("d_per_layer_input"), dims.get("n_experts"), dims.get("top_k")
        table.update({"hook_per_layer_input": (B, S, P), "hook_gate": (B, S, P), "hook_gated": (B, S, P),
                      "hook_router_logits": (B, S, E), "hook_router_probs": (B, S, E), "hook_shared_gate": (B, S, 1),
                      "hook_expert_indices": (B, S, K), "hook_routing_weights": (B, S, K),
                      "hook_expert_out": (B, S, K, D)})
    if name.endswith("mlp.ln_sub.hook_normalized"):  # BitNet's MLP sub-norm: over the MLP width
        return (B, S, None)
    if leaf in table:
        return table[leaf]
    if leaf in ("hook_pre", "hook_pre_linear", "hook_post"):
        return (B, S, None)  # d_mlp: checked to be the MLP width below
    return (B, S, D)


def test_hook_names_are_golden(trio, arch):
    _, _, gm = trio
    assert set(gm.hook_dict) == golden(arch, gm.dims["n_layers"])


# Layers whose sizes differ from the config's global ones, read from the HF modules (Gemma 4: full layers have
# their own head size and KV heads, KV-shared layers a double-wide MLP).
LAYER_SIZES = {**tiny.LAYER_SIZES,
    "gemma4_text": lambda model, i: dict(d_head=model.model.layers[i].self_attn.head_dim,
                                         n_kv_heads=model.config.per_layer_config[i].num_key_value_heads,
                                         d_mlp=model.model.layers[i].mlp.up_proj.out_features),
}


def test_each_hook_fires_once_with_stated_shape(trio, arch):
    model, _, gm = trio
    batch, seq = 2, 6
    counts = {}
    shapes = {}

    def record(tensor, hook):
        counts[hook.name] = counts.get(hook.name, 0) + 1
        shapes[hook.name] = tuple(tensor.shape)

    gm.run_with_hooks(tokens(batch, seq), fwd_hooks=[(lambda name: True, record)])
    assert counts == {name: 1 for name in gm.hook_dict}
    d_mlp = model.config.intermediate_size if hasattr(model.config, "intermediate_size") and \
        model.config.intermediate_size else 4 * gm.dims["d_model"]
    for name, shape in shapes.items():
        dims, layer_d_mlp = gm.dims, d_mlp
        if arch in LAYER_SIZES and name.startswith("blocks."):
            sizes = LAYER_SIZES[arch](model, int(name.split(".")[1]))
            layer_d_mlp = sizes.pop("d_mlp")
            dims = dict(gm.dims, **sizes)
        want = expected_shape(name, dims, batch, seq)
        if want[-1] is None:
            want = (batch, seq, layer_d_mlp)
        assert shape == want, name


def test_run_with_cache_one_entry_per_point_and_only_asked(trio):
    _, _, gm = trio
    ids = tokens(1, 5)
    _, cache = gm.run_with_cache(ids)
    assert set(cache) == set(gm.hook_dict)
    _, small = gm.run_with_cache(ids, names_filter=["blocks.0.attn.hook_pattern", "blocks.0.hook_in"])
    assert set(small) == {"blocks.0.attn.hook_pattern", "blocks.0.hook_resid_pre"}  # alias resolved, one entry
    # a full cache also hooks the norms (explicit scale/normalized): equal up to float rounding
    torch.testing.assert_close(small["pattern", 0], cache["blocks.0.attn.hook_pattern"], atol=1e-6, rtol=0)
    assert torch.equal(cache["resid_post", -1], cache[f"blocks.{gm.dims['n_layers'] - 1}.hook_resid_post"])
    _, nobatch = gm.run_with_cache(ids, names_filter="hook_embed", remove_batch_dim=True)
    assert nobatch["hook_embed"].shape == cache["hook_embed"].shape[1:]


def test_aliases_reach_the_same_point(trio):
    _, _, gm = trio
    assert gm.resolve("blocks.1.attn.q.hook_out") == "blocks.1.attn.hook_q"
    assert gm.resolve("blocks.1.attn.o.hook_in") == "blocks.1.attn.hook_z"
    dense = [i for i in range(gm.dims["n_layers"]) if f"blocks.{i}.mlp.hook_post" in gm.hook_dict]  # not MoE
    assert all(gm.resolve(f"blocks.{i}.mlp.out.hook_in") == f"blocks.{i}.mlp.hook_post" for i in dense)
    assert gm.resolve("blocks.1.hook_out") == "blocks.1.hook_resid_post"


@pytest.mark.parametrize("name", ["blocks.0.ln1.hook_scale", "blocks.0.attn.hook_pattern", "mid"])
def test_hook_points_carry_their_names(core_trio, name):
    _, _, gm = core_trio
    name = mid_hook(gm, 1) if name == "mid" else name
    seen = []
    gm.run_with_hooks(tokens(1, 3), fwd_hooks=[(name, lambda t, hook: seen.append(hook.name))])
    assert seen == [name]


def test_hook_dict_lists_hooks_in_firing_order(trio):
    """hook_dict (and so the hook table) is in the order the hooks fire when all of them are hooked."""
    _, _, gm = trio
    fired = []
    gm.run_with_hooks(tokens(1, 4), fwd_hooks=[(lambda name: True, lambda t, hook: fired.append(hook.name))])
    assert fired == list(gm.hook_dict)
