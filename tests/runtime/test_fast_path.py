"""Pay only for what is hooked: which attention path runs, and that every fast path computes what HF computes.

Paths are checked by counting calls (torch profiler, or a wrapper around the SDPA call), never by the clock.
"""
import copy
from unittest import mock

import pytest
import torch
import transformers as tf
from torch.profiler import ProfilerActivity, profile

import fxbridge as bridge
from conftest import traced
from fxbridge.runtime import attention, cores
from tiny import COMMON, FALCON, build_from_config, left_padded, tokens

TOL = 1e-5


def _sdpa_calls(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::scaled_dot_product_attention")


@pytest.fixture
def llama():
    model, ref, gm = traced("llama")
    gm.reset_hooks(including_permanent=True)
    yield model, ref, gm
    gm.reset_hooks(including_permanent=True)


def test_no_hooks_every_layer_fused_and_exact(llama):
    _, ref, gm = llama
    ids = tokens(2, 9)
    with torch.no_grad():
        assert _sdpa_calls(lambda: gm(ids)) == gm.dims["n_layers"]
        assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL


def test_pattern_hook_makes_only_that_layer_eager(llama):
    _, ref, gm = llama
    ids = tokens(2, 9)
    seen = {}
    gm.add_hook("blocks.1.attn.hook_pattern", lambda t, hook: seen.__setitem__("pattern", t.clone()))
    with torch.no_grad():
        assert _sdpa_calls(lambda: gm(ids)) == gm.dims["n_layers"] - 1
        got = gm(ids)
        expected = ref(ids, output_attentions=True)
    assert (got - expected.logits).abs().max().item() < TOL
    assert (seen["pattern"] - expected.attentions[1]).abs().max().item() < TOL
    gm.reset_hooks()
    with torch.no_grad():
        assert _sdpa_calls(lambda: gm(ids)) == gm.dims["n_layers"]  # removing the hook restores the fused path


def test_scores_hook_edit_takes_effect_on_eager_layer_only(llama):
    _, _, gm = llama
    ids = tokens(1, 6)
    with torch.no_grad():
        clean = gm(ids)
        edited = gm.run_with_hooks(ids, fwd_hooks=[("blocks.2.attn.hook_attn_scores", lambda t, hook: t * 0.0)])
        assert _sdpa_calls(lambda: gm.run_with_hooks(
            ids, fwd_hooks=[("blocks.2.attn.hook_attn_scores", lambda t, hook: None)])) == gm.dims["n_layers"] - 1
    assert (edited - clean).abs().max().item() > 1e-4


def _sdpa_is_causal_flags(gm, *args, **kwargs) -> list[bool]:
    flags = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(*a, **kw):
        flags.append(bool(kw.get("is_causal", False)) and kw.get("attn_mask") is None)
        return real(*a, **kw)

    with mock.patch.object(cores.F, "scaled_dot_product_attention", spy), torch.no_grad():
        out = gm(*args, **kwargs)
    return flags, out


def test_is_causal_shortcut_without_padding_is_exact(llama):
    _, ref, gm = llama
    ids = tokens(3, 11)
    flags, out = _sdpa_is_causal_flags(gm, ids)
    assert flags == [True] * gm.dims["n_layers"]
    with torch.no_grad():
        assert (out - ref(ids).logits).abs().max().item() < TOL


def test_padding_keeps_the_mask_and_is_exact(llama):
    _, ref, gm = llama
    ids, mask = left_padded(3, 9, pads=[0, 2, 5])
    flags, out = _sdpa_is_causal_flags(gm, ids, attention_mask=mask)
    assert flags == [False] * gm.dims["n_layers"]
    with torch.no_grad():
        expected = ref(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (out - expected)[keep].abs().max().item() < TOL
    # an all-ones mask passed explicitly is plainly causal again
    flags, _ = _sdpa_is_causal_flags(gm, ids, attention_mask=torch.ones_like(mask))
    assert flags == [True] * gm.dims["n_layers"]


@pytest.mark.parametrize("seq,shortcut", [(4, True), (12, False)])
def test_sliding_window_uses_the_shortcut_only_inside_the_window(seq, shortcut):
    model, ref, gm = traced("mistral")  # sliding_window=4 on every layer
    assert model.config.sliding_window == 4
    gm.reset_hooks(including_permanent=True)
    ids = tokens(2, seq)
    flags, out = _sdpa_is_causal_flags(gm, ids)
    assert flags == [shortcut] * gm.dims["n_layers"]
    with torch.no_grad():
        assert (out - ref(ids).logits).abs().max().item() < TOL


def test_is_plain_causal_on_hand_built_masks():
    n, neg = 5, torch.finfo(torch.float32).min
    causal = torch.zeros(n, n).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), neg)
    assert attention.is_plain_causal(causal.expand(2, 1, n, n).clone(), n, n)
    padded = causal.expand(2, 1, n, n).clone()
    padded[1, 0, :, 0] = neg
    assert not attention.is_plain_causal(padded, n, n)
    window = causal.clone()
    window[4, 0] = neg  # a sliding window of 4 cuts position 0 out of row 4
    assert not attention.is_plain_causal(window[None, None], n, n)
    assert not attention.is_plain_causal(causal.masked_fill(causal != 0, float("-inf"))[None, None], n, n)
    assert not attention.is_plain_causal(None, n, n)
    assert not attention.is_plain_causal(causal[None, None], n, n + 1)


def test_softcap_layers_stay_eager_and_exact():
    model, ref, gm = traced("gemma2")
    assert model.config.attn_logit_softcapping is not None
    gm.reset_hooks(including_permanent=True)
    ids = tokens(2, 7)
    with torch.no_grad():
        assert _sdpa_calls(lambda: gm(ids)) == 0  # HF runs Gemma 2 eager too (sdpa cannot softcap)
        assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL


def test_fast_forward_is_used_and_sees_replaced_parameters():
    model, ref, gm = traced("gpt2")
    gm.reset_hooks(including_permanent=True)
    assert type(gm)._graph_forward is not type(gm)._fx_forward, "the fast forward fell back to fx's code"
    ids = tokens(2, 5)
    old, old_ref = model.transformer.ln_f.weight, ref.transformer.ln_f.weight
    new = torch.rand_like(old) + 0.5
    try:  # replacing the Parameter object (as load_state_dict(assign=True) does) must be seen by the next forward
        model.transformer.ln_f.weight = torch.nn.Parameter(new.clone())
        ref.transformer.ln_f.weight = torch.nn.Parameter(new.clone())
        with torch.no_grad():
            assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL
            assert (gm(ids) - gm._fx_forward(*gm._graph_args(ids, torch.ones_like(ids), None))).abs().max().item() == 0
    finally:
        model.transformer.ln_f.weight, ref.transformer.ln_f.weight = old, old_ref


def test_cache_stores_activations_without_copies(llama):
    _, _, gm = llama
    ids = tokens(1, 5)
    with torch.no_grad():
        _, cache = gm.run_with_cache(ids)
    # resid_post of layer 0 is the very tensor that enters layer 1: one storage, no clone
    a, b = cache["resid_post", 0], cache["resid_pre", 1]
    assert a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert len(cache) == len(gm.hook_dict)


def test_torch_module_hooks_on_a_hook_point_still_fire(llama):
    _, _, gm = llama
    fired = []
    handle = gm.hook_dict["blocks.0.hook_resid_post"].register_forward_hook(lambda m, a, out: fired.append(m.name))
    try:
        with torch.no_grad():
            gm(tokens(1, 4))
    finally:
        handle.remove()
    assert fired == ["blocks.0.hook_resid_post"]


def test_trace_on_meta_device():
    config = tf.LlamaConfig(**{**COMMON, "num_hidden_layers": 2})
    with torch.device("meta"):
        model = tf.AutoModelForCausalLM.from_config(config)
    gm = bridge.trace(model)
    _, _, cpu_gm = traced("llama")
    expected = [n for n in cpu_gm.hook_dict if not n.startswith("blocks.2.")]
    assert list(gm.hook_dict) == expected
    assert all(p.is_meta for p in gm.parameters())
    out = gm(torch.zeros(2, 5, dtype=torch.long, device="meta"))
    assert out.is_meta and out.shape == (2, 5, config.vocab_size)


def _deeper(config, n_layers: int):
    """The same config with ``n_layers`` layers, per-layer lists (layer_types) repeated to that length."""
    old = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == old:
            setattr(config, key, (value * n_layers)[:n_layers])
    config.num_hidden_layers = n_layers
    return config




def _falcon(**flags):
    return lambda: tf.FalconConfig(**dict(FALCON, **flags))


SLOW = pytest.mark.slow  # each case traces twice (stitched and full): the other layouts run with -m slow


@pytest.mark.parametrize("make,n_layers,sampled", [
    (lambda: tf.LlamaConfig(**COMMON), 5, 2),
    pytest.param(lambda: tf.Gemma2Config(**dict(COMMON, num_hidden_layers=2, sliding_window=4, query_pre_attn_scalar=20,
                                                layer_types=["sliding_attention", "full_attention"]),
                                         attn_logit_softcapping=5.0, final_logit_softcapping=3.0), 6, 4, marks=SLOW),
    # a per-layer pattern of period 3 that does not divide the depth (2 sliding : 1 full, 8 layers): layers 0 1 2 5
    (lambda: tf.Gemma3TextConfig(**dict(COMMON, num_hidden_layers=3, sliding_window=4, query_pre_attn_scalar=20,
                                        layer_types=["sliding_attention", "sliding_attention", "full_attention"])),
     8, 4),
    # 5 sliding : 1 full at 8 layers: the one full layer is captured as it is (layers 0 1 5)
    pytest.param(lambda: tf.Gemma3TextConfig(**dict(COMMON, num_hidden_layers=6, sliding_window=4,
                                                    query_pre_attn_scalar=20,
                                                    layer_types=["sliding_attention"] * 5 + ["full_attention"])),
                 8, 3, marks=SLOW),
    # Falcon: inline attention whose layers each make their own index constants (t[..., [-2], :])
    pytest.param(_falcon(new_decoder_architecture=False, multi_query=True, parallel_attn=True, alibi=False,
                         bias=False), 5, 2, marks=SLOW),
    pytest.param(_falcon(new_decoder_architecture=False, multi_query=False, parallel_attn=False, alibi=True,
                         bias=True), 5, 2, marks=SLOW),
    (_falcon(new_decoder_architecture=True, num_kv_heads=2, num_attention_heads=8), 5, 2),
    # Gemma 4 (no per-layer embeddings): the last sliding and the last full layer store their k/v, so they are
    # kinds of their own, captured as they are (layers 0 1 2 3 6 7); per_layer_config is keyed by layer index
    pytest.param(lambda: tf.Gemma4TextConfig(**dict(
        COMMON, num_hidden_layers=8, sliding_window=4, global_head_dim=32, hidden_size_per_layer_input=0,
        layer_types=["sliding_attention", "full_attention"] * 4)), 8, 6,
        marks=[SLOW, pytest.mark.skipif(not hasattr(tf, "Gemma4TextConfig"), reason="transformers < 5.5")]),
    # MoE: every layer reads the token count B*S export computed once in layer 0 (layers 0 1)
    pytest.param(lambda: tf.MixtralConfig(**dict(COMMON, num_local_experts=4, num_experts_per_tok=2)), 5, 2,
                 marks=SLOW),
    # a dense first layer, then MoE layers with a shared expert: two kinds, layer 0's occurring once (layers 0 1 2)
    (lambda: tf.Glm4MoeConfig(**dict(COMMON, moe_intermediate_size=32, n_routed_experts=4, num_experts_per_tok=2,
                                     n_shared_experts=1, first_k_dense_replace=1, n_group=2, topk_group=1)), 5, 3),
    # JetMoE: its own gating and parallel experts in attention and MLP, every layer reading B*S from layer 0
    pytest.param(lambda: tf.JetMoeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                         num_local_experts=4, num_experts_per_tok=2, kv_channels=12,
                                         num_key_value_heads=2, tie_word_embeddings=False), 4, 2, marks=SLOW),
], ids=["llama", "gemma2", "gemma3_period3", "gemma3_5to1", "falcon_7b", "falcon_rw_alibi", "falcon_40b", "gemma4",
        "mixtral", "glm4_moe_dense_first", "jetmoe"])
def test_stitched_capture_equals_full_capture(monkeypatch, make, n_layers, sampled):
    from fxbridge.architectures import get_spec
    from fxbridge.tracer import capture
    model = build_from_config(_deeper(make(), n_layers))
    path = get_spec(model).layers
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    captured = capture(model, layers=path)
    assert captured.notes[0].startswith(f"stitched: captured {sampled} of {n_layers} layers")
    stitched = bridge.trace(model)
    monkeypatch.setenv("FXBRIDGE_STITCH", "0")
    assert capture(model, layers=path).notes == ["captured every layer"]
    full = bridge.trace(model)
    assert list(stitched.hook_dict) == list(full.hook_dict)
    # the same ops in the same order; size arithmetic (B*S in an MoE block) may sit before the layers when stitched
    sizes = lambda n: isinstance(n.meta.get("val"), (torch.SymInt, int))
    ops = lambda gm, size: [(n.op, str(n.target)) for n in gm.graph.nodes if n.op != "get_attr" and sizes(n) == size]
    assert ops(stitched, False) == ops(full, False) and sorted(ops(stitched, True)) == sorted(ops(full, True))
    ids, mask = left_padded(3, 10, pads=[0, 2, 5])
    with torch.no_grad():
        a, b = stitched(ids, attention_mask=mask), full(ids, attention_mask=mask)
        expected = ref(ids, attention_mask=mask).logits
    assert torch.equal(a, b)
    assert (a - expected)[mask.bool()].abs().max().item() < TOL
    # the stitched layers read their own weights: an edit to the last layer changes only the stitched result's tail
    last = model.get_submodule(f"{path}.{n_layers - 1}")
    name = next(n for n, _ in last.named_parameters() if n.endswith("weight") and "norm" not in n and "ln" not in n)
    with torch.no_grad():
        last.get_parameter(name).mul_(2.0)
        ref.get_submodule(f"{path}.{n_layers - 1}").get_parameter(name).mul_(2.0)
        assert (stitched(ids, attention_mask=mask) - ref(ids, attention_mask=mask).logits)[mask.bool()].abs().max() < TOL


def test_layers_whose_code_depends_on_their_index_are_not_stitched():
    from fxbridge.tracer import capture
    config = tf.GPT2Config(vocab_size=101, n_embd=64, n_layer=4, n_head=4, n_positions=64, bos_token_id=0,
                           eos_token_id=0, scale_attn_by_inverse_layer_idx=True)
    model = build_from_config(config)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    assert capture(model, layers="transformer.h").notes == ["captured every layer"]  # layer i divides its scores by i + 1
    gm = bridge.trace(model)
    ids = tokens(2, 7)
    with torch.no_grad():
        assert (gm(ids) - ref(ids).logits).abs().max().item() < TOL



def test_a_plain_attribute_set_after_construction_is_not_lost_by_stitching():
    """model.logit_scale changed on the module (its config still says 0.25): a shallow rebuild from the config
    would capture 0.25, so stitching refuses and the full capture computes what the module computes (0.5)."""
    from fxbridge.tracer import capture
    from tiny import build
    model = build("cohere")
    assert capture(model, layers="model.layers").notes[0].startswith("stitched")
    model.logit_scale = 0.5
    captured = capture(model, layers="model.layers")
    assert captured.notes == ["captured every layer"]
    scales = [n.args[1] for n in captured.graph.nodes if n.target == torch.ops.aten.mul.Tensor
              and isinstance(n.args[1], float) and n.args[1] in (0.25, 0.5)]
    assert scales == [0.5]
