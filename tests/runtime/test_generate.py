"""``gm.generate``: greedy tokens equal HF ``generate(do_sample=False)`` for every tiny family, plain and left-padded,
with the KV cache and without it.

Oracle: HF's own ``generate`` (its dynamic KV cache; positions from the mask) on the eager-attention copy of the traced
HF model, the reference of every parity test; it stops at the generation config's EOS id as ``gm.generate`` does,
finished rows padded with it. (Eager, not the model's default: transformers 5.15 defaults Gemma 2 to SDPA, which drops
its attention softcap, 0.55 off eager's logits; 5.24 defaults it to eager.)
"""
import torch
from conftest import traced  # noqa: F401  (the trio fixture traces through it)
from tiny import left_padded, tokens

NEW = 6


def _eos(model):
    eos = model.generation_config.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    return eos


def _hf_greedy(model, ids, mask=None):
    eos = _eos(model)
    kwargs = {} if mask is None else {"attention_mask": mask}
    with torch.no_grad():
        return model.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0 if eos is None else eos,
                              **kwargs)


def _ours(gm, model, ids, mask=None, **kwargs):
    return gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=_eos(model) is not None,
                       attention_mask=mask, verbose=False, **kwargs)


def test_greedy_generation_equals_hf_generate(trio):
    _, model, gm = trio
    ids = tokens(2, 6)
    expected = _hf_greedy(model, ids)
    assert expected.shape[1] > ids.shape[1]
    assert torch.equal(_ours(gm, model, ids), expected)
    assert torch.equal(_ours(gm, model, ids, use_past_kv_cache=False), expected)


def test_greedy_generation_of_a_left_padded_batch_equals_hf_generate(trio):
    _, model, gm = trio
    ids, mask = left_padded(3, 7, [0, 2, 4])
    expected = _hf_greedy(model, ids, mask)
    assert torch.equal(_ours(gm, model, ids, mask), expected)
    assert torch.equal(_ours(gm, model, ids, mask, use_past_kv_cache=False), expected)
