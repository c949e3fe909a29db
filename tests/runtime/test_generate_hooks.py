"""Hooks during ``gm.generate``: where they fire and with what shapes, steering, k / v edits reaching the KV cache,
per-step activations, sampling, text input, and bad input.

Oracles: HF ``generate`` with the same edit made by a torch forward hook on the HF decoder layer; HF's hidden states
of the whole generated sequence; and the no-cache loop TransformerLens's semantics define (``run_with_hooks`` on the
whole sequence, argmax, append), written out here.
"""
import copy

import pytest
import torch
from conftest import arch_params, traced
from tiny import build, forward_hooks, left_padded, tokens
from tiny_tokenizer import numbered

import fxbridge as bridge
from fxbridge.errors import UsageError
from fxbridge.runtime.generate import sample_logits

STEERED = ["llama", "gpt2", "gemma2", "falcon_rw", "gemma4_text"]  # + sliding window, softcaps, ALiBi, KV sharing
NEW = 5


def _layers(model):
    return model.model.layers if hasattr(model, "model") else model.transformer.h


def _greedy(gm, ids, mask=None, **kwargs):
    return gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask,
                       verbose=False, **kwargs)


def _no_cache_loop(gm, ids, mask, fwd_hooks, steps=NEW):
    """TransformerLens's semantics of generation under hooks, written out: the whole sequence every step."""
    mask = torch.ones_like(ids) if mask is None else mask
    for _ in range(steps):
        positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        kwargs = {"position_ids": positions} if "position_ids" in gm._fxb_inputs else {}
        logits = gm.run_with_hooks(ids, attention_mask=mask, fwd_hooks=fwd_hooks, **kwargs)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    return ids


def _steer(vector):
    def hook(resid, hook):
        return resid + vector
    return hook


@pytest.mark.parametrize("arch", arch_params(STEERED))
def test_steering_equals_the_no_cache_loop_and_hf_generate_with_the_same_edit(arch):
    _, model, gm = traced(arch)  # HF's side: the eager copy (tests/runtime/test_generate.py says why)
    ids, mask = left_padded(2, 7, [0, 3])
    layer = 1
    vector = torch.randn(gm.cfg.d_model, generator=torch.Generator().manual_seed(3)) * 4.0
    name = f"blocks.{layer}.hook_resid_post"
    with gm.hooks([(name, _steer(vector))]):
        cached = _greedy(gm, ids, mask)
        uncached = _greedy(gm, ids, mask, use_past_kv_cache=False)
    loop = _no_cache_loop(gm, ids, mask, [(name, _steer(vector))])

    def hf_steer(module, args, out):
        return (out[0] + vector, *out[1:]) if isinstance(out, tuple) else out + vector
    eos = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None  # HF generates NEW tokens, as the loop does
    try:
        with forward_hooks((_layers(model)[layer], hf_steer)), torch.no_grad():
            hf = model.generate(ids, attention_mask=mask, max_new_tokens=NEW, do_sample=False, pad_token_id=0)
    finally:
        model.generation_config.eos_token_id = eos
    assert torch.equal(cached, loop)
    assert torch.equal(uncached, loop)
    assert torch.equal(cached, hf)
    assert not torch.equal(cached, _greedy(gm, ids, mask))  # the steering changed what was generated


def _recorder(seen):
    def record(tensor, hook):
        seen.setdefault(hook.name, []).append(tuple(tensor.shape))
    return record


@pytest.mark.parametrize("arch", arch_params(["llama", "gemma2"]))
def test_hooks_see_the_prompt_then_one_new_position_per_step(arch):
    _, _, gm = traced(arch)
    batch, prompt = 2, 6
    names = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores",
             "blocks.0.attn.hook_k", "blocks.0.attn.hook_q", "ln_final.hook_normalized"]
    seen: dict = {}
    with gm.hooks([(n, _recorder(seen)) for n in names]):
        _greedy(gm, tokens(batch, prompt))
    d, h = gm.cfg.d_model, gm.cfg.n_heads
    totals = [prompt + t for t in range(NEW)]
    assert seen["blocks.0.hook_resid_post"] == [(batch, prompt, d)] + [(batch, 1, d)] * (NEW - 1)
    assert seen["ln_final.hook_normalized"] == [(batch, prompt, d)] + [(batch, 1, d)] * (NEW - 1)
    for name in ("blocks.1.attn.hook_pattern", "blocks.1.attn.hook_attn_scores"):
        assert seen[name] == [(batch, h, prompt, prompt)] + [(batch, h, 1, s) for s in totals[1:]]
    n_kv, d_head = gm.cfg.n_key_value_heads or h, gm.cfg.d_head
    assert seen["blocks.0.attn.hook_k"] == [(batch, prompt, n_kv, d_head)] + [(batch, 1, n_kv, d_head)] * (NEW - 1)
    assert seen["blocks.0.attn.hook_q"] == [(batch, prompt, h, d_head)] + [(batch, 1, h, d_head)] * (NEW - 1)


def test_without_the_kv_cache_every_step_recomputes_the_whole_sequence():
    _, _, gm = traced("llama")
    seen: dict = {}
    gm.add_hook("blocks.0.hook_resid_post", _recorder(seen))  # add_hook's hooks fire as hooks()'s do
    gm.add_hook("blocks.0.attn.hook_pattern", _recorder(seen))
    try:
        _greedy(gm, tokens(2, 6), use_past_kv_cache=False)
    finally:
        gm.reset_hooks()
    d, h = gm.cfg.d_model, gm.cfg.n_heads
    assert seen["blocks.0.hook_resid_post"] == [(2, 6 + t, d) for t in range(NEW)]
    assert seen["blocks.0.attn.hook_pattern"] == [(2, h, 6 + t, 6 + t) for t in range(NEW)]


@pytest.mark.parametrize("arch", arch_params(["llama", "gpt2"]))
@pytest.mark.parametrize("point", ["hook_k", "hook_v"])
def test_an_edit_to_k_or_v_in_the_prompt_step_is_what_later_steps_read_from_the_cache(arch, point):
    """TL's semantics: the edited k / v is what is cached. The prompt's forward is the only one that sees the
    prompt positions, so later steps must attend to the edited values without any hook editing them again."""
    _, _, gm = traced(arch)
    ids = tokens(2, 6, seed=4)
    prompt = ids.shape[1]
    name = f"blocks.0.attn.{point}"

    def edit_prompt_step(value, hook):
        if value.shape[1] == prompt:  # the prompt's forward
            return value * -3.0
        return None

    def edit_prompt_positions(value, hook):  # the same edit in the no-cache loop: the prompt's positions, every time
        value = value.clone()
        value[:, :prompt] *= -3.0
        return value

    z = "blocks.0.attn.hook_z"
    with gm.hooks([(name, edit_prompt_step)]):
        cached, steps = _greedy(gm, ids, names_filter=z)
    loop = _no_cache_loop(gm, ids, None, [(name, edit_prompt_positions)])
    assert torch.equal(cached, loop)
    _, plain = _greedy(gm, ids, names_filter=z)
    for t in range(1, NEW):  # the z of each later step, against the edited no-cache forward's last position
        with gm.hooks([(name, edit_prompt_positions)]):
            _, reference = gm.run_with_cache(loop[:, :prompt + t], names_filter=z)
        assert (steps[t][z][:, 0] - reference[z][:, -1]).abs().max() < 1e-5
        assert (steps[t][z] - plain[t][z]).abs().max() > 1e-4  # the edit reached this step through the cache


@pytest.mark.parametrize("arch", arch_params(["llama", "gemma2"]))
def test_names_filter_returns_every_steps_activations(arch):
    model, ref, gm = traced(arch)
    ids, mask = left_padded(2, 6, [0, 2])
    out, steps = gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask,
                             verbose=False, names_filter=lambda n: n.endswith("hook_resid_post") or "pattern" in n)
    assert len(steps) == NEW
    full_mask = torch.cat([mask, torch.ones(2, NEW, dtype=mask.dtype)], dim=1)
    positions = (full_mask.cumsum(-1) - 1).masked_fill(full_mask == 0, 1)
    with torch.no_grad():
        hidden = ref(out, attention_mask=full_mask, position_ids=positions, output_hidden_states=True).hidden_states
    real = mask.bool()
    for layer in range(gm.cfg.n_layers - 1):  # HF's last hidden state is after the final norm
        name = f"blocks.{layer}.hook_resid_post"
        prompt = steps[0][name]
        assert prompt.shape == (2, 6, gm.cfg.d_model)
        assert (prompt[real] - hidden[layer + 1][:, :6][real]).abs().max() < 1e-5
        for t in range(1, NEW):
            assert steps[t][name].shape == (2, 1, gm.cfg.d_model)
            assert (steps[t][name][:, 0] - hidden[layer + 1][:, 6 + t - 1]).abs().max() < 1e-5
        joined = steps.positions(name)
        assert joined.shape == (2, 6 + NEW - 1, gm.cfg.d_model)
        assert (joined[:, 6:] - hidden[layer + 1][:, 6:6 + NEW - 1]).abs().max() < 1e-5
    assert steps[3]["pattern", 0].shape == (2, gm.cfg.n_heads, 1, 6 + 3)
    with pytest.raises(ValueError, match="per step"):
        steps.positions("blocks.0.attn.hook_pattern")
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())


def test_names_filter_without_the_cache_joins_the_last_position_of_each_step():
    _, _, gm = traced("llama")
    ids = tokens(2, 6)
    name = "blocks.1.hook_resid_post"
    _, cached = gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, verbose=False,
                            names_filter=name)
    _, uncached = gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, verbose=False,
                              names_filter=name, use_past_kv_cache=False)
    assert uncached[2][name].shape == (2, 8, gm.cfg.d_model)
    assert (cached.positions(name) - uncached.positions(name)).abs().max() < 1e-5


def test_an_exception_in_a_hook_mid_generation_leaves_nothing_behind():
    _, _, gm = traced("llama")
    ids = tokens(2, 6)
    expected = _greedy(gm, ids)
    calls = []

    def fail_on_third(resid, hook):
        calls.append(resid.shape)
        if len(calls) == 3:
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with gm.hooks([("blocks.0.hook_resid_post", fail_on_third)]):
            gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, verbose=False,
                        names_filter="blocks.1.hook_resid_post")
    assert len(calls) == 3
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())
    assert torch.equal(_greedy(gm, ids), expected)


def test_eos_stops_a_row_and_pads_it_with_eos_until_every_row_stops():
    model, _, gm = traced("llama")
    ids = tokens(2, 6)
    free = _greedy(gm, ids)  # what greedy decoding produces without stopping
    eos = int(free[0, 6 + 1])  # row 0's second new token
    out = gm.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, verbose=False)
    finished_at = [next((t for t in range(6, free.shape[1]) if free[r, t] == eos), None) for r in range(2)]
    assert torch.equal(out[0, :8], free[0, :8])
    assert (out[0, 8:] == eos).all()
    if finished_at[1] is None:
        assert out.shape[1] == free.shape[1] and torch.equal(out[1], free[1])
    with torch.no_grad():
        hf = model.generate(ids, max_new_tokens=NEW, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    assert torch.equal(out, hf)


def test_max_new_tokens_zero_returns_the_prompt_and_negative_raises():
    _, _, gm = traced("llama")
    ids = tokens(1, 5)
    assert torch.equal(gm.generate(ids, max_new_tokens=0, stop_at_eos=False, verbose=False), ids)
    with pytest.raises(ValueError, match="max_new_tokens"):
        gm.generate(ids, max_new_tokens=-1, stop_at_eos=False, verbose=False)


def test_bad_input_is_refused_with_the_fix():
    _, _, gm = traced("llama")
    with pytest.raises(UsageError, match="tokenizer"):
        gm.generate("hello world", stop_at_eos=False, verbose=False)
    ids, mask = left_padded(2, 5, [0, 2])
    with pytest.raises(ValueError, match="left-pad"):
        gm.generate(ids, attention_mask=mask.flip(-1), stop_at_eos=False, verbose=False)
    with pytest.raises(ValueError, match="return_type"):
        gm.generate(ids, return_type="embeds", stop_at_eos=False, verbose=False)


def test_stop_at_eos_without_an_eos_id_says_what_to_set():
    model = bridge.trace(_model_without_eos())
    with pytest.raises(ValueError, match="eos_token_id=.*stop_at_eos=False"):
        model.generate(tokens(1, 4), verbose=False)
    assert model.generate(tokens(1, 4), max_new_tokens=2, stop_at_eos=False, verbose=False).shape == (1, 6)


def _model_without_eos():
    model = build("llama")
    model.generation_config.eos_token_id = None
    model.config.eos_token_id = None
    return model


def test_a_meta_traced_module_refuses_to_generate():
    import transformers as tf
    config = build("llama").config
    with torch.device("meta"):
        meta_model = tf.LlamaForCausalLM(config)
    gm = bridge.trace(meta_model)
    with pytest.raises(UsageError, match="meta device"):
        gm.generate(tokens(1, 4).to("meta"), stop_at_eos=False, verbose=False)


def test_string_input_generates_text_and_lists_are_left_padded():
    gm = copy.deepcopy(traced("llama")[2])
    model, tok = gm.hf, numbered(gm.cfg.d_vocab)
    gm.set_tokenizer(tok)
    text = gm.generate("w5 w9 w17", max_new_tokens=3, do_sample=False, verbose=False)
    ids = gm.to_tokens("w5 w9 w17")
    expected = _hf_text(model, tok, ids, None)
    assert text == expected
    batch = gm.generate(["w5 w9 w17 w30", "w8"], max_new_tokens=3, do_sample=False, verbose=False)
    ids = gm.to_tokens(["w5 w9 w17 w30", "w8"], padding_side="left")
    mask = (torch.arange(ids.shape[1]) >= ids.shape[1] - torch.tensor([[5], [2]])).long()  # BOS + words
    assert batch == _hf_text(model, tok, ids, mask)
    tokens_out = gm.generate("w5 w9", max_new_tokens=2, do_sample=False, verbose=False, return_type="tokens")
    assert tokens_out.shape == (1, 3 + 2)


def _hf_text(model, tok, ids, mask):
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=3, do_sample=False, eos_token_id=tok.eos_token_id,
                             pad_token_id=tok.eos_token_id, **kwargs)
    texts = [tok.decode(row, skip_special_tokens=True) for row in out]
    return texts[0] if len(texts) == 1 else texts


def test_verbose_shows_a_progress_bar(capsys):
    _, _, gm = traced("llama")
    gm.generate(tokens(1, 4), max_new_tokens=3, stop_at_eos=False, do_sample=False, verbose=True)
    assert "3/3" in capsys.readouterr().err
    gm.generate(tokens(1, 4), max_new_tokens=3, stop_at_eos=False, do_sample=False, verbose=False)
    assert capsys.readouterr().err == ""


def test_sampling_is_seeded_and_follows_tls_filters():
    _, _, gm = traced("llama")
    ids = tokens(3, 5)

    def sample(**kwargs):
        torch.manual_seed(11)
        return gm.generate(ids, max_new_tokens=NEW, stop_at_eos=False, verbose=False, **kwargs)
    assert torch.equal(sample(), sample())
    assert torch.equal(sample(top_k=1), _greedy(gm, ids))
    assert torch.equal(sample(top_p=1e-6), _greedy(gm, ids))
    assert torch.equal(sample(temperature=1e-7), _greedy(gm, ids))
    # a frequency penalty large enough forbids every token seen so far
    out = sample(freq_penalty=1e4)
    for row in out:
        new = row[5:].tolist()
        assert not set(new) & set(row[:5].tolist()) and len(set(new)) == len(new)


def test_sample_logits_written_out():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.5], [5.0, 0.0, 0.0, 4.9]])
    assert sample_logits(logits, temperature=0.0).tolist() == [1, 0]
    torch.manual_seed(0)
    draws = torch.stack([sample_logits(logits, top_k=2) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    # top_p: row 0's softmax is [0.028, 0.558, 0.076, 0.338]: 0.8 keeps {1, 3} (0.558 < 0.8 <= 0.896)
    draws = torch.stack([sample_logits(logits, top_p=0.8) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3}
    seen = torch.tensor([[1, 1, 3], [0, 0, 0]])
    penalised = torch.stack([sample_logits(logits, freq_penalty=100.0, tokens=seen) for _ in range(50)])
    assert not (penalised[:, 0] == 1).any() and not (penalised[:, 0] == 3).any() and not (penalised[:, 1] == 0).any()
    with pytest.raises(ValueError, match="top_k"):
        sample_logits(logits, top_k=0)
