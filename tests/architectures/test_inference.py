"""Spec inference for model types with no registered spec (fxbridge/architectures/infer.py).

Each family goes through both routes: the registered one (its spec, or route 1: the registered family whose class
the model is) and the inferred one (``infer_spec``, or ``trace`` with the model_type taken out of the registry).
The inferred spec is checked against facts written here by hand from the HF modelling code, the traced logits
against HF eager (plain and left-padded batches), and wherever a registered spec exists, both routes must give the
same hook points (names and shapes) and the same activations. Families the registry lacks in this checkout run the
inferred route only (the comparison runs once they are registered).
"""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import fxbridge
from fxbridge.architectures import REGISTRY, get_spec
from fxbridge.architectures.infer import infer_spec
from fxbridge.errors import InferredSpecWarning, UnsupportedArchitecture
from tiny import COMMON, CONFIGS, build_from_config, eager_reference, left_padded, missing_config_class, tokens

TOL = 1e-5
LLAMA_LIKE = dict(COMMON, pad_token_id=0)
# model_type -> config kwargs for families that register no spec of their own here (tiny.CONFIGS where present)
LOCAL = {t: LLAMA_LIKE for t in ("exaone", "internlm3", "ministral", "ministral3", "helium", "seed_oss", "ernie4_5",
                                 "jais2", "nanochat", "apertus", "arcee", "nemotron", "hunyuan_v1_dense")}
LOCAL["smollm3"] = dict(LLAMA_LIKE, no_rope_layers=[1, 0, 1])  # layer 1 is NoPE
# parallel blocks: GPT-J (one LayerNorm for both branches, partial interleaved rotary), Phi (partial rotary)
LOCAL["gptj"] = dict(vocab_size=101, n_embd=64, n_head=4, n_layer=3, rotary_dim=8, n_positions=128,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
LOCAL["phi"] = dict(LLAMA_LIKE, bos_token_id=0, eos_token_id=0)
REGISTERED = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")
FAMILIES = REGISTERED + tuple(LOCAL)
# Both routes on the Llama-like families in make test; the rest of the comparison with -m slow
# (one of each convention: NoPE, LayerNorm + plain MLP, fc1/fc2 + softcap + reused norm, LayerNorm1P, other norm
# names, post-RoPE q/k norms, q/k/v biases + dropout)
BOTH_ROUTES = [t if t in ("smollm3", "jais2", "nanochat", "nemotron", "apertus", "hunyuan_v1_dense", "seed_oss")
               else pytest.param(t, marks=pytest.mark.slow) for t in FAMILIES]

# What the HF modelling code says (hand-written): fields of the inferred spec that differ from Llama's defaults.
GATED = dict(mlp_gate="gate_proj", mlp_in="up_proj", mlp_out="down_proj", norm="rms", nope_layers=())
PLAIN = dict(GATED, mlp_gate=None)
EXPECTED = {t: GATED for t in FAMILIES}
EXPECTED.update({
    "jais2": dict(PLAIN, norm="layernorm"),  # ReLU^2 up/down, LayerNorm with bias
    "nemotron": dict(PLAIN, norm="layernorm"),  # LayerNorm1P: layer_norm(x, w + 1, b)
    "arcee": PLAIN,
    "apertus": dict(PLAIN, ln1="attention_layernorm", ln2="feedforward_layernorm"),  # xIELU
    # weightless RMSNorm, also on the embeddings; final-logit softcap
    "nanochat": dict(PLAIN, mlp_in="fc1", mlp_out="fc2", final_softcap_config="final_logit_softcapping"),
    "smollm3": dict(GATED, nope_layers=(1,)),
    # sandwich norms; the final softcap's config attribute found by its value (3.0 in the tiny configs)
    "gemma2": dict(GATED, ln1_post="post_attention_layernorm", ln2="pre_feedforward_layernorm",
                   ln2_post="post_feedforward_layernorm", final_softcap_config="final_logit_softcapping"),
})
EXPECTED["gemma3_text"] = EXPECTED["gemma2"]
_PARALLEL = dict(PLAIN, norm="layernorm", parallel=True, ln2=None)
EXPECTED["gptj"] = dict(_PARALLEL, layers="transformer.h", embed="transformer.wte", final_norm="transformer.ln_f",
                        ln1="ln_1", attn="attn", o_proj="out_proj", mlp_in="fc_in", mlp_out="fc_out")
EXPECTED["phi"] = dict(_PARALLEL, final_norm="model.final_layernorm", o_proj="dense", mlp_in="fc1", mlp_out="fc2")


def _config(model_type: str):
    if model_type in CONFIGS:
        if missing_config_class(model_type):
            pytest.skip(f"transformers lacks {missing_config_class(model_type)}")
        return CONFIGS[model_type]()
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers lacks {model_type}")
    return CONFIG_MAPPING[model_type](**LOCAL[model_type])


def _build(model_type: str):
    model = build_from_config(_config(model_type), seed=0)
    import inspect
    if "ALL_ATTENTION_FUNCTIONS" not in inspect.getsource(inspect.getmodule(type(model))):
        pytest.skip(f"this transformers writes {model_type}'s attention inline (no AttentionInterface)")
    return model


@contextlib.contextmanager
def unregistered(model_type: str, *, family: bool = True):
    """The registry without ``model_type`` while the block runs (the situation of a brand-new checkpoint): with
    ``family``, without every model_type of its spec (a family nobody registered), else without that type alone."""
    spec = REGISTRY.get(model_type)
    types = [t for t, s in REGISTRY.items() if s is spec] if family and spec is not None else [model_type]
    saved = {t: REGISTRY.pop(t) for t in types if t in REGISTRY}
    try:
        yield
    finally:
        REGISTRY.update(saved)


def _trace(model, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = fxbridge.trace(model, **kwargs)
    return gm, [w for w in caught if issubclass(w.category, InferredSpecWarning)]


def _hooks(gm, ids):
    with torch.no_grad():
        logits, cache = gm.run_with_cache(ids)
    return logits, {name: cache[name] for name in cache.keys()}


def _registered_route(model):
    """The spec trace() uses without inference: the model_type's own, or route 1's (None: neither exists)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InferredSpecWarning)
            return get_spec(model)
    except UnsupportedArchitecture:
        return None


@pytest.mark.parametrize("model_type", FAMILIES)
def test_inferred_spec_is_what_hf_computes(model_type):
    model = _build(model_type)
    spec = infer_spec(model)
    assert spec.inferred and spec.family == f"inferred from {type(model).__name__}"
    expected = dict(layers="model.layers", embed="model.embed_tokens", final_norm="model.norm", unembed="lm_head",
                    ln1="input_layernorm", ln2="post_attention_layernorm", ln1_post=None, ln2_post=None,
                    attn="self_attn", q="q_proj", k="k_proj", v="v_proj", o_proj="o_proj", mlp="mlp", rotary=True,
                    parallel=False, pos_embed=None, qkv=None, final_softcap_config=None)
    expected.update({k: v for k, v in EXPECTED[model_type].items() if k != "nope_layers"})  # NoPE: on the hooks
    assert {k: getattr(spec, k) for k in expected} == expected


@pytest.mark.parametrize("model_type", BOTH_ROUTES)
def test_inferred_route_matches_hf_and_the_registered_route(model_type):
    model = _build(model_type)
    ref = eager_reference(model)
    registered = _registered_route(model)
    with unregistered(model_type):
        if registered is not None and model_type not in REGISTRY and registered.model_type != model_type:
            gm, warned = _trace(model, spec=infer_spec(model))  # route 1 would answer: infer explicitly
        else:
            gm, warned = _trace(model)  # the real situation: trace() infers
    assert gm.spec.inferred and len(warned) == 1 and "inferred" in str(warned[0].message)
    assert "inferred from" in str(gm.report) and f"ln1 {gm.spec.ln1}" in str(gm.report)

    ids = tokens(2, 9)
    pad_ids, mask = left_padded(3, 9, pads=[0, 3, 6])
    with torch.no_grad():
        assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL
        keep = mask.bool()
        assert (gm(pad_ids, attention_mask=mask) - ref(pad_ids, attention_mask=mask).logits)[keep].abs().max() < TOL

    logits, hooks = _hooks(gm, ids)
    n = model.config.num_hidden_layers
    nope = EXPECTED[model_type]["nope_layers"]
    for i in range(n):  # NoPE layers have no rot hooks, the others do
        assert (f"blocks.{i}.attn.hook_rot_q" in hooks) == (i not in nope)
        cfg = model.config
        heads = cfg.num_attention_heads
        d_head = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        assert hooks[f"blocks.{i}.attn.hook_q"].shape == (2, 9, heads, d_head)
        assert hooks[f"blocks.{i}.attn.hook_k"].shape == (2, 9, getattr(cfg, "num_key_value_heads", heads), d_head)
        assert (f"blocks.{i}.hook_resid_mid" in hooks) == (not EXPECTED[model_type].get("parallel", False))
        assert (f"blocks.{i}.mlp.hook_pre_linear" in hooks) == (EXPECTED[model_type]["mlp_gate"] is not None)

    if registered is None:
        pytest.skip(f"{model_type} has no registered spec in this checkout: inferred route checked alone")
    gm_reg, _ = _trace(model)
    assert not gm_reg.spec.inferred
    reg_logits, reg_hooks = _hooks(gm_reg, ids)
    assert {k: v.shape for k, v in reg_hooks.items()} == {k: v.shape for k, v in hooks.items()}
    assert set(gm_reg.hook_dict) == set(gm.hook_dict)
    for name, value in hooks.items():
        assert torch.equal(value, reg_hooks[name]), name
    assert torch.equal(logits, reg_logits)


@pytest.mark.parametrize("model_type", ["exaone", "internlm3"])
def test_route_1_uses_the_registered_family_of_the_class(model_type):
    model = _build(model_type)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.model_type == model_type
    with unregistered(model_type, family=False):  # registered with Llama's spec; route 1 finds it by class
        with pytest.warns(InferredSpecWarning, match="LlamaForCausalLM"):
            assert get_spec(model.config).family == "Llama"  # from the config alone, before any weight is built
        gm, warned = _trace(model)
    assert gm.spec is not None and gm.spec.family == "Llama" and not gm.spec.inferred and len(warned) == 1


def test_registered_families_never_infer(monkeypatch):
    from fxbridge.architectures import infer as infer_module

    def refuse(*args, **kwargs):
        raise AssertionError("inference ran for a registered family")
    monkeypatch.setattr(infer_module, "infer", refuse)
    monkeypatch.setattr(infer_module, "verify_inferred", refuse)
    gm, warned = _trace(_build("llama"))
    assert not warned and gm.report.inferred_spec is None and "inferred" not in str(gm.report)


# ------------------------------------------------------------------------------------------------ negatives

def _custom(forward):
    """A Llama subclass under an unknown model_type whose decoder layers run ``forward``."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    class MiswiredConfig(LlamaConfig):
        model_type = "miswired_llama"

    class MiswiredLayer(LlamaDecoderLayer):
        pass
    MiswiredLayer.forward = forward

    class MiswiredForCausalLM(LlamaForCausalLM):
        config_class = MiswiredConfig

    torch.manual_seed(0)
    model = MiswiredForCausalLM(MiswiredConfig(**COMMON)).eval()
    for layer in model.model.layers:
        layer.__class__ = MiswiredLayer
    return model


def _attn(layer, x, kwargs):
    return layer.self_attn(hidden_states=layer.input_layernorm(x), **kwargs)[0]


def test_misplaced_decomposition_is_refused_naming_layer_and_hook():
    def forward(self, hidden_states, **kwargs):
        kwargs.pop("use_cache", None)
        mid = hidden_states + _attn(self, hidden_states, kwargs)
        return 0.5 * (mid + self.mlp(self.post_attention_layernorm(mid)))  # resid_post != resid_mid + mlp_out

    model = _custom(forward)
    with pytest.raises(UnsupportedArchitecture, match=r"layer 0: the layer's output \(hook_resid_post\) is not "
                                                      r"resid_mid \+ the MLP branch") as info:
        fxbridge.trace(model)
    assert "miswired_llama" in str(info.value) and "MiswiredForCausalLM" in str(info.value)


def test_divergence_from_hf_is_refused_naming_layer_and_hook():
    """A traced module that computes something else than HF from layer 1 on fails verification there."""
    from fxbridge.architectures.infer import verify_inferred
    model = _build("arcee")
    with unregistered("arcee"):
        gm, _ = _trace(model)
    gm.add_hook("blocks.1.hook_mlp_out", lambda x, hook: 2 * x, is_permanent=True)
    with pytest.raises(UnsupportedArchitecture, match=r"blocks\.1\.hook_resid_post \(vs HF model\.layers\.1 "
                                                      r"output\) diverges"):
        verify_inferred(gm, model)
    gm.reset_hooks(including_permanent=True)
    assert verify_inferred(gm, model)


def test_parallel_block_is_inferred():
    def forward(self, hidden_states, **kwargs):
        kwargs.pop("use_cache", None)
        h = self.input_layernorm(hidden_states)  # one norm feeds both branches (GPT-J / Phi / Cohere style)
        return hidden_states + self.self_attn(hidden_states=h, **kwargs)[0] + self.mlp(h)

    model = _custom(forward)
    gm, warned = _trace(model)
    assert gm.spec.parallel and gm.spec.ln2 is None and len(warned) == 1
    ids = tokens(2, 7)
    with torch.no_grad():
        assert (gm(ids) - model(ids).logits).abs().max().item() < TOL
    _, hooks = _hooks(gm, ids)
    assert not any("resid_mid" in k or "ln2" in k for k in hooks)
    for i in range(3):  # resid_post = resid_pre + attn_out + mlp_out, by hand
        total = hooks[f"blocks.{i}.hook_resid_pre"] + hooks[f"blocks.{i}.hook_attn_out"] + hooks[
            f"blocks.{i}.hook_mlp_out"]
        assert (hooks[f"blocks.{i}.hook_resid_post"] - total).abs().max().item() < TOL


def test_scaled_residual_is_refused_naming_layer_and_hook():
    def forward(self, hidden_states, **kwargs):
        kwargs.pop("use_cache", None)
        mid = hidden_states + 0.5 * _attn(self, hidden_states, kwargs)  # a residual multiplier
        return mid + self.mlp(self.post_attention_layernorm(mid))

    with pytest.raises(UnsupportedArchitecture, match=r"layer 0: the attention branch \(hook_attn_out, linear_3\) is "
                                                      r"not added to the layer's input \(hook_resid_pre\)"):
        fxbridge.trace(_custom(forward))


def test_a_spec_that_does_not_fit_the_graph_is_refused_naming_pass_and_module():
    """Cohere's LayerNorm is written by hand (mean, rsqrt): not HF's RMSNorm nor a layer_norm call."""
    if "cohere" not in CONFIG_MAPPING or "cohere" in REGISTRY:
        pytest.skip("cohere is registered or missing")
    model = build_from_config(CONFIG_MAPPING["cohere"](**LLAMA_LIKE))
    with pytest.raises(UnsupportedArchitecture, match=r"the inferred spec does not fit the graph: pass 'hook_norms' "
                                                      r"in model\.layers\.0\.input_layernorm"):
        fxbridge.trace(model)


def test_fused_qkv_family_is_refused_naming_the_projection():
    config = CONFIG_MAPPING["phi3"](**dict(COMMON, pad_token_id=0))  # qkv_proj and gate_up_proj
    with unregistered("phi3"), pytest.raises(
            UnsupportedArchitecture, match=r"layer 0: q, k and v come from one fused projection "
                                           r"\(model\.layers\.0\.self_attn\.qkv_proj\)"):
        fxbridge.trace(build_from_config(config))
