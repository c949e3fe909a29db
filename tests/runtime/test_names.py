"""The hook table (runtime/names.py) against HOOKS.md, written out by hand here."""
import pytest

from fxbridge.runtime.names import HOOKS, aliases_for, get_act_name, hook_name, shape_of

# HOOKS.md: TransformerBridge's component spellings of one layer of a gated (Llama) and a plain (GPT-2) MLP model
LLAMA_LAYER = {"blocks.0.hook_in": "blocks.0.hook_resid_pre", "blocks.0.hook_out": "blocks.0.hook_resid_post",
               "blocks.0.attn.q.hook_out": "blocks.0.attn.hook_q", "blocks.0.attn.k.hook_out": "blocks.0.attn.hook_k",
               "blocks.0.attn.v.hook_out": "blocks.0.attn.hook_v", "blocks.0.attn.o.hook_in": "blocks.0.attn.hook_z",
               "blocks.0.attn.hook_out": "blocks.0.hook_attn_out", "blocks.0.mlp.hook_out": "blocks.0.hook_mlp_out",
               "blocks.0.mlp.gate.hook_out": "blocks.0.mlp.hook_pre",
               "blocks.0.mlp.in.hook_out": "blocks.0.mlp.hook_pre_linear",
               "blocks.0.mlp.out.hook_in": "blocks.0.mlp.hook_post", "unembed.hook_out": "hook_unembed"}


def test_gated_mlp_aliases():
    names = ["hook_embed", "hook_unembed"] + [f"blocks.0.{n}" for n in (
        "hook_resid_pre", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z", "hook_attn_out",
        "hook_resid_mid", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post", "hook_mlp_out", "hook_resid_post")]
    assert aliases_for(names) == LLAMA_LAYER


def test_plain_mlp_calls_its_input_projection_in():
    aliases = aliases_for(["blocks.2.mlp.hook_pre", "blocks.2.mlp.hook_post"])
    assert aliases == {"blocks.2.mlp.in.hook_out": "blocks.2.mlp.hook_pre",
                       "blocks.2.mlp.out.hook_in": "blocks.2.mlp.hook_post"}


def test_aliases_only_for_points_that_exist():
    assert aliases_for(["blocks.0.attn.hook_pattern"]) == {}


@pytest.mark.parametrize("name, shape", [("blocks.3.attn.hook_k", ("B", "S", "Hkv", "dh")),
                                         ("blocks.0.attn.hook_pattern", ("B", "H", "S", "S")),
                                         ("ln_final.hook_scale", ("B", "S", "1")),
                                         ("blocks.1.mlp.hook_expert_out", ("B", "S", "K", "D")),
                                         ("hook_unembed", ("B", "S", "V")), ("blocks.0.nothing", None)])
def test_shapes_are_the_contracts(name, shape):
    assert shape_of(name) == shape


def test_hook_name_builds_and_checks():
    assert hook_name("attn.hook_q", 3) == "blocks.3.attn.hook_q"
    assert hook_name("hook_embed") == "hook_embed"
    with pytest.raises(KeyError):
        hook_name("attn.hook_qq", 3)
    with pytest.raises(ValueError):
        hook_name("hook_resid_pre")  # per-layer: needs the layer


# TransformerLens's get_act_name: which sub-module each short name lives in (written out, not read from the table)
ATTN_ACTS = ("q", "k", "v", "rot_q", "rot_k", "attn_scores_pre_cap", "attn_scores", "pattern", "z", "result")
MLP_ACTS = ("pre", "pre_linear", "post")


@pytest.mark.parametrize("short, group", [(a, "attn") for a in ATTN_ACTS] + [(a, "mlp") for a in MLP_ACTS])
def test_get_act_name_puts_attn_and_mlp_points_in_their_module(short, group):
    assert get_act_name(short, 5) == f"blocks.5.{group}.hook_{short}"


def test_get_act_name_shorthands():
    assert get_act_name("resid_post", 2) == "blocks.2.hook_resid_post"
    assert get_act_name("scale") == "ln_final.hook_scale"
    assert get_act_name("scale", 1, "ln2") == "blocks.1.ln2.hook_scale"
    assert get_act_name("attn", 0) == "blocks.0.attn.hook_pattern"


def test_table_templates_are_unique():
    templates = [row.template for row in HOOKS]
    assert len(templates) == len(set(templates))
