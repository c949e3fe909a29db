"""Compiled decoding: ``generate(compile=...)`` with a static KV cache and a compiled step.

Oracles: HF ``generate(do_sample=False)`` on the eager copy (as tests/runtime/test_generate.py), and the eager
traced module's cached generation with the same hooks (itself checked against TransformerLens's no-cache loop and
HF in tests/runtime/test_generate_hooks.py). Llama compiles with the default backend (inductor) and Gemma 2 (sliding
window, softcaps) with ``aot_eager`` in ``make test``; every other family with ``aot_eager`` under ``-m slow``.
"""
import copy

import pytest
import torch
from conftest import arch_params_fast, traced
from tiny import left_padded, tokens

NEW = 6
FAST = {"llama": True, "gemma2": {"backend": "aot_eager"}}
AOT = {"backend": "aot_eager"}


def _params():
    return arch_params_fast(FAST)


def _eos(model):
    eos = model.generation_config.eos_token_id
    return (eos[0] if eos else None) if isinstance(eos, (list, tuple)) else eos


def _greedy(gm, ids, mask=None, **kwargs):
    return gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=False, attention_mask=mask,
                       verbose=False, **kwargs)


@pytest.mark.parametrize("arch", _params())
def test_compiled_greedy_generation_equals_hf_generate(arch):
    _, ref, gm = traced(arch)
    options = FAST.get(arch, AOT)
    eos = _eos(ref)
    for ids, mask in ((tokens(2, 6), None), left_padded(3, 7, [0, 2, 4])):
        kwargs = {} if mask is None else {"attention_mask": mask}
        with torch.no_grad():
            expected = ref.generate(ids, max_new_tokens=NEW, do_sample=False, pad_token_id=0 if eos is None else eos,
                                    **kwargs)
        got = gm.generate(ids, max_new_tokens=NEW, do_sample=False, stop_at_eos=eos is not None, attention_mask=mask,
                          verbose=False, compile=options)
        assert torch.equal(got, expected)


def test_compiled_decoding_follows_hook_changes_and_caches_per_step():
    _, _, gm = traced("llama")
    ids, mask = left_padded(2, 7, [0, 3])
    name = "blocks.1.hook_resid_post"
    for seed in (3, 4):  # a new hook set: dynamo recompiles the step, the new hook takes effect
        vector = torch.randn(gm.cfg.d_model, generator=torch.Generator().manual_seed(seed)) * 4.0

        def steer(resid, hook):
            return resid + vector
        with gm.hooks([(name, steer)]):
            expected, eager_steps = _greedy(gm, ids, mask, names_filter=name)
            got, steps = _greedy(gm, ids, mask, names_filter=name, compile=AOT)
        assert torch.equal(got, expected)
        assert len(steps) == NEW
        assert (steps.positions(name) - eager_steps.positions(name)).abs().max() < 1e-5
    assert torch.equal(_greedy(gm, ids, mask, compile=AOT), _greedy(gm, ids, mask))  # hooks removed


def test_generation_on_a_compiled_module_compiles_its_decoding_and_survives_a_raising_hook():
    _, _, shared = traced("llama")
    gm = copy.deepcopy(shared)
    gm.compile(backend="aot_eager")
    ids = tokens(2, 6)
    expected = _greedy(shared, ids)
    assert torch.equal(_greedy(gm, ids), expected)  # compile=None: a compiled module decodes compiled
    assert gm._decoder()._compiled  # the static step was compiled
    calls = []

    def fail_on_third(resid, hook):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
    with pytest.raises(RuntimeError, match="boom"):
        with gm.hooks([("blocks.0.hook_resid_post", fail_on_third)]):
            _greedy(gm, ids, compile=AOT)
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())
    assert torch.equal(_greedy(gm, ids, compile=AOT), expected)
