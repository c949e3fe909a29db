"""The TransformerLens workflow of examples/tl_workflow.py gives TransformerLens's own numbers.

The oracle is TransformerLens itself: a legacy ``HookedTransformer`` (transformer-lens 3.x, which ``make test-sae``
installs with sae-lens) built from the same tiny HF GPT-2 / Llama through TL's own weight converters and loaded
without processing (``fold_ln=False``...), as ``from_pretrained_no_processing`` loads. Both run the same workflow
function; every number must agree. Skipped where transformer-lens 3.x is not installed.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

tl = pytest.importorskip("transformer_lens")
if not hasattr(tl, "HookedTransformer"):  # transformer-lens 4.x removed it
    pytest.skip("needs transformer-lens 3.x (HookedTransformer)", allow_module_level=True)

import torch  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from transformer_lens import utils as tl_utils  # noqa: E402

import fxbridge as bridge  # noqa: E402
from fxbridge import utils  # noqa: E402
from tiny import build  # noqa: E402
from tiny_tokenizer import gpt2_like  # noqa: E402

pytestmark = pytest.mark.sae
_spec = importlib.util.spec_from_file_location("tl_workflow", Path(__file__).parents[2] / "examples" / "tl_workflow.py")
workflow = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(workflow)


def _hooked_transformer(arch: str, model, tokenizer_dir):
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights
    c = model.config
    if arch == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_ctx=c.n_positions, d_head=c.n_embd // c.n_head, n_heads=c.n_head,
            d_mlp=4 * c.n_embd, d_vocab=c.vocab_size, act_fn="gelu_new", normalization_type="LN",
            eps=c.layer_norm_epsilon, positional_embedding_type="standard", original_architecture="GPT2LMHeadModel")
        state = convert_gpt2_weights(model, cfg)
    else:
        cfg = HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_ctx=c.max_position_embeddings, d_head=c.head_dim,
            n_heads=c.num_attention_heads, n_key_value_heads=c.num_key_value_heads, d_mlp=c.intermediate_size,
            d_vocab=c.vocab_size, act_fn="silu", normalization_type="RMS", eps=c.rms_norm_eps,
            positional_embedding_type="rotary", rotary_dim=c.head_dim, rotary_base=c.rope_parameters["rope_theta"],
            gated_mlp=True, final_rms=True, original_architecture="LlamaForCausalLM")
        state = convert_llama_weights(model, cfg)
    ht = HookedTransformer(cfg)
    ht.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    ht.set_tokenizer(AutoTokenizer.from_pretrained(tokenizer_dir))  # TL reloads it (with add_bos_token) from a path
    return ht.eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_the_workflow_gives_hooked_transformer_numbers(arch, tmp_path):
    gpt2_like().save_pretrained(tmp_path)
    model = build(arch)
    ht = _hooked_transformer(arch, model, tmp_path)
    gm = bridge.trace(model, tokenizer=AutoTokenizer.from_pretrained(tmp_path))
    with torch.no_grad():
        expected = workflow.run_workflow(ht, tl_utils)
        got = workflow.run_workflow(gm, utils)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if isinstance(value, float):
            assert got[key] == pytest.approx(value, abs=1e-5), key
        elif isinstance(value, list) and value and isinstance(value[0], (float, list)):
            np.testing.assert_allclose(np.array(got[key]), np.array(value), atol=1e-4, err_msg=key)
        else:
            assert got[key] == value, key
