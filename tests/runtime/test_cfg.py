"""gm.cfg: TransformerLens's config fields for every tiny family, against the tiny configs' values written out.

The config part is checked without tracing: ``build_config`` on a model built on the meta device (what ``gm.cfg``
calls with the traced module's spec, dims and HF model). Expected values are the tiny recipes' (tests/tiny*.py) and
the HF config classes' defaults where a recipe leaves a field alone (eps, rope theta, activation), in TL's
conventions: n_key_value_heads None without GQA, softcaps -1.0 when off, d_mlp the dense MLP width (one expert's
width where every layer is MoE, as TL's Mixtral).
"""
import copy
import pickle

import pytest
import torch
import transformers as tf

import fxbridge as bridge
from conftest import arch_params, traced
from fxbridge.architectures import dims_from_config, get_spec
from fxbridge.runtime.tl_config import build_config
from tiny import CONFIGS

def _f(*parts: dict, **values) -> dict:
    """The fields of ``parts`` (later ones win), then ``values``."""
    out = {}
    for part in parts:
        out.update(part)
    return {**out, **values}


LLAMA = _f(n_layers=3, d_model=64, n_heads=4, d_head=16, n_key_value_heads=2, d_mlp=96, d_vocab=101, n_ctx=128,
             act_fn="silu", eps=1e-6, normalization_type="RMS", positional_embedding_type="rotary", rotary_dim=16,
             rotary_base=10000.0, rotary_base_local=None, parallel_attn_mlp=False, gated_mlp=True, num_experts=None,
             experts_per_token=None, attn_scores_soft_cap=-1.0, output_logits_soft_cap=-1.0,
             use_normalization_before_and_after=False, default_prepend_bos=True)
# LayerNorm, learned absolute positions, plain MLP of 4 x d_model (GPT-2 style)
CLASSIC = _f(LLAMA, n_key_value_heads=None, d_mlp=256, eps=1e-5, normalization_type="LN",
               positional_embedding_type="standard", rotary_dim=None, rotary_base=10000, gated_mlp=False)
FALCON = _f(CLASSIC, n_layers=2, act_fn="gelu", positional_embedding_type="rotary", rotary_dim=16,
              rotary_base=10000.0)
GPTJ = _f(LLAMA, n_key_value_heads=None, act_fn="gelu_new", eps=1e-5, normalization_type="LN", rotary_dim=8,
            rotary_base=10000, parallel_attn_mlp=True, gated_mlp=False)
NO_BOS = _f(default_prepend_bos=False)  # TL turns default_prepend_bos off for these families
LN = _f(eps=1e-5, normalization_type="LN")
MOE = _f(num_experts=4, experts_per_token=2)
GELU_TANH = _f(act_fn="gelu_pytorch_tanh")

EXPECTED = {
    "llama": {}, "mistral": {}, "qwen2": NO_BOS, "qwen3": NO_BOS, "ministral": {}, "seed_oss": NO_BOS,
    "gpt2": _f(CLASSIC, act_fn="gelu_new"),
    "gemma": _f(GELU_TANH, n_key_value_heads=1, d_head=24, rotary_dim=24),
    "gemma2": _f(GELU_TANH, attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0,
                   use_normalization_before_and_after=True),
    "gemma3_text": _f(GELU_TANH, output_logits_soft_cap=3.0, use_normalization_before_and_after=True,
                        rotary_base=1000.0, rotary_base_local=10.0),
    "gemma4_text": _f(GELU_TANH, MOE, n_layers=5, output_logits_soft_cap=30.0,
                        use_normalization_before_and_after=True, rotary_base=1000000.0, rotary_base_local=10000.0),
    "vaultgemma": _f(GELU_TANH, attn_scores_soft_cap=5.0, output_logits_soft_cap=3.0),
    "gpt_bigcode": _f(CLASSIC, GELU_TANH, n_layers=2, n_key_value_heads=1),
    "gpt_bigcode_mha": _f(CLASSIC, GELU_TANH, n_layers=2),
    "falcon_7b": _f(FALCON, n_key_value_heads=1, parallel_attn_mlp=True),
    "falcon_mha": FALCON,
    "falcon_rw": _f(FALCON, positional_embedding_type="alibi", rotary_dim=None, rotary_base=10000),
    "falcon_new_mqa": _f(FALCON, n_key_value_heads=1, parallel_attn_mlp=True),
    "falcon_40b": _f(FALCON, n_heads=8, d_head=8, n_key_value_heads=2, rotary_dim=8, parallel_attn_mlp=True),
    "exaone": _f(NO_BOS, eps=1e-5, rotary_base=500000.0), "internlm3": _f(eps=1e-5),
    "ministral3": _f(eps=1e-5, rotary_base=1000000.0), "helium": _f(eps=1e-8, rotary_base=100000.0),
    "ernie4_5": _f(NO_BOS, eps=1e-5, rotary_base=500000.0),
    "jais2": _f(LN, act_fn="relu2", gated_mlp=False),
    "nanochat": _f(act_fn="relu2", gated_mlp=False, output_logits_soft_cap=15.0),
    "smollm3": _f(NO_BOS, rotary_base=2000000.0),
    "apertus": _f(act_fn="xielu", eps=1e-5, rotary_base=12000000.0, gated_mlp=False),
    "arcee": _f(act_fn="relu2", eps=1e-5, gated_mlp=False),
    "nemotron": _f(LN, act_fn="relu2", rotary_dim=8, gated_mlp=False),
    "hunyuan_v1_dense": _f(eps=1e-5), "olmo": LN, "olmo2": _f(eps=1e-5),
    "olmo3": _f(eps=1e-5, rotary_base=1000.0, rotary_base_local=10.0), "exaone4": _f(NO_BOS, eps=1e-5),
    "gpt_neox": _f(GPTJ, NO_BOS, act_fn="gelu", rotary_dim=4, rotary_base=10000.0),
    "gpt_neox_seq": _f(GPTJ, NO_BOS, act_fn="gelu", rotary_dim=4, rotary_base=10000.0, parallel_attn_mlp=False),
    "gptj": GPTJ, "codegen": _f(GPTJ, n_heads=8, d_head=8, rotary_dim=4),
    "phi": _f(GPTJ, NO_BOS, n_key_value_heads=2, rotary_base=10000.0),
    "phi_qk_norm": _f(GPTJ, NO_BOS, rotary_base=10000.0),
    "cohere": _f(LN, rotary_base=500000.0, parallel_attn_mlp=True),
    "cohere_qk_norm": _f(LN, rotary_base=500000.0, parallel_attn_mlp=True),
    "cohere2": _f(LN, parallel_attn_mlp=True),
    "phi3": _f(eps=1e-5, rotary_dim=12),
    "glm": _f(NO_BOS, eps=1.5625e-07, rotary_dim=8),
    "glm4": _f(eps=1.5625e-07, rotary_dim=8, use_normalization_before_and_after=True),
    "starcoder2": _f(LN, GELU_TANH, NO_BOS, gated_mlp=False),
    "stablelm": _f(LN, rotary_dim=4), "stablelm_parallel": _f(LN, rotary_dim=4, parallel_attn_mlp=True),
    "persimmon": _f(LN, n_key_value_heads=None, act_fn="relu2", rotary_dim=8, gated_mlp=False),
    "opt": _f(CLASSIC, act_fn="relu", d_mlp=96), "opt_350m": _f(CLASSIC, act_fn="relu", d_mlp=96),
    "xglm": _f(CLASSIC, act_fn="gelu", d_mlp=96), "gpt_neo": _f(CLASSIC, act_fn="gelu_new", d_mlp=96),
    "openai-gpt": _f(CLASSIC, act_fn="gelu"),
    "bloom": _f(CLASSIC, NO_BOS, positional_embedding_type="alibi", n_ctx=None, act_fn="gelu_fast"),
    "mpt": _f(CLASSIC, NO_BOS, positional_embedding_type="alibi", act_fn="gelu"),
    "granite": NO_BOS, "granite_unit": _f(NO_BOS, n_key_value_heads=None),
    "bitnet": _f(act_fn="relu2", eps=1e-5, rotary_base=500000.0),
    # MoE: d_mlp is the first dense layer's width, or one expert's (moe_intermediate_size 32) where all are MoE
    "mixtral": _f(MOE, eps=1e-5, rotary_base=1000000.0, d_mlp=32),
    "qwen3_moe": _f(MOE, NO_BOS),  # mlp_only_layers=[1]: a dense layer of intermediate_size 96
    "olmoe": _f(MOE, eps=1e-5, d_mlp=32), "flex_olmo": _f(MOE, d_mlp=32, rotary_base=500000.0),
    "minimax_m2": _f(MOE, NO_BOS, d_mlp=32, rotary_base=5000000.0),
    "phimoe": _f(MOE, LN, NO_BOS, d_mlp=32, rotary_base=1000000.0),
    "qwen2_moe": _f(MOE, NO_BOS),  # mlp_only_layers=[0]
    "ernie4_5_moe": _f(MOE, NO_BOS, eps=1e-5, rotary_base=500000.0),  # moe_layer_start_index=1
    "glm4_moe": _f(MOE, NO_BOS, eps=1e-5, rotary_dim=8),  # first_k_dense_replace=1
    "granitemoe": _f(MOE, NO_BOS, d_mlp=32),
    "deepseek_v3": _f(MOE, n_key_value_heads=None, rotary_dim=8),  # MLA: qk_rope_head_dim 8 of d_head 8 + 8
    "deepseek_v2": _f(MOE, n_key_value_heads=None, rotary_dim=8),
    "gpt_oss": _f(MOE, d_vocab=128, eps=1e-5, rotary_base=150000.0),  # every layer MoE, experts 96 wide
    "diffllama": _f(n_layers=2, eps=1e-5),
    "jetmoe": _f(MOE, n_layers=2, d_head=12, rotary_dim=12, gated_mlp=False),
    "llama4_text": _f(n_layers=4, d_vocab=128, eps=1e-5, rotary_base=500000.0, num_experts=4, experts_per_token=1),
    "dbrx": _f(LN, MOE, n_layers=2, d_vocab=128, d_mlp=32, gated_mlp=False),
}


def test_every_tiny_family_has_expected_values():
    assert sorted(EXPECTED) == sorted(CONFIGS)


def _meta_model(arch):
    config = CONFIGS[arch]()
    with torch.device("meta"):
        return tf.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", arch_params())
def test_cfg_fields(arch):
    model = _meta_model(arch)
    spec = get_spec(model)
    cfg = build_config(spec, dims_from_config(model.config, spec), model)
    expected = _f(LLAMA, EXPECTED[arch])
    got = {name: getattr(cfg, name) for name in expected}
    wrong = {name: (got[name], value) for name, value in expected.items()
             if not (got[name] == pytest.approx(value) if isinstance(value, float) else got[name] == value)}
    assert not wrong, f"{arch}: field: (got, expected) {wrong}"
    assert cfg.d_vocab_out == expected["d_vocab"] and cfg.original_architecture == type(model).__name__
    assert cfg.attn_only is False and cfg.seed is None and cfg.tokenizer_prepends_bos is None


@pytest.mark.xdist_group("gpt2")
def test_gm_cfg_attribute_and_dict_access():
    gm = copy.deepcopy(traced("gpt2")[2])
    cfg = gm.cfg
    assert cfg is gm.cfg  # built once
    d = cfg.to_dict()
    assert d["n_layers"] == cfg.n_layers == 3 and d["d_head"] == 16 and d["act_fn"] == "gelu_new"
    assert d["device"] == "cpu" == cfg.device and d["dtype"] == torch.float32 == cfg.dtype
    assert d["default_padding_side"] == "right" and d["model_name"] == "gpt2"
    assert d["original_architecture"] == "GPT2LMHeadModel" and d["use_attn_result"] is False
    assert d["n_params"] == 3 * (4 * 64 * 64) + 3 * (2 * 64 * 256)  # TL's count: W_Q/K/V/O and W_in/W_out
    with pytest.raises(bridge.UsageError, match=r"gm\.to"):
        cfg.device = "cuda"
    # TL's hook switches are fixed by the trace: a value that changes nothing is fine, one that would raises
    cfg.use_attn_result = False
    with pytest.raises(bridge.UsageError, match=r"use_attn_result=True"):
        cfg.use_attn_result = True
    with pytest.raises(bridge.UsageError, match="no such hook points"):
        cfg.use_hook_mlp_in = True
    assert d["use_split_qkv_input"] is False and cfg.use_attn_result is False
    again = pickle.loads(pickle.dumps(cfg))  # e.g. logged with an experiment
    assert again.n_layers == 3 and again.act_fn == "gelu_new" and again.device is None


@pytest.mark.xdist_group("gpt2")
def test_cfg_device_follows_the_module():
    gm = copy.deepcopy(traced("gpt2")[2])
    cfg = gm.cfg
    gm.to("meta")  # a device move the capture allows; cfg read before the move follows it
    assert cfg.device == "meta" and gm.cfg.device == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.xdist_group("gpt2")
def test_cfg_device_follows_cuda():
    gm = copy.deepcopy(traced("gpt2")[2])
    cfg = gm.cfg
    gm.to("cuda")
    assert cfg.device == "cuda:0" and torch.device(cfg.device) == gm.hf.lm_head.weight.device


def test_use_attn_result_is_the_trace_option():
    model = _meta_model("llama")
    spec = get_spec(model)
    cfg = build_config(spec, dims_from_config(model.config, spec), model, use_attn_result=True)
    assert cfg.use_attn_result is True and cfg.to_dict()["use_attn_result"] is True
    cfg.use_attn_result = True  # unchanged: fine
    with pytest.raises(bridge.UsageError, match="fixed when the module is traced"):
        cfg.use_attn_result = False
