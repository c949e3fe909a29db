"""trace leaves the HF model alone, shares its weights, and never leaves hooks behind."""
import pytest
import torch

import fxbridge as bridge
from tiny import build, mid_hook, tokens


def test_trace_leaves_the_hf_model_unchanged_and_shares_weights():
    model = build("llama", seed=3)
    ids = tokens(2, 5)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_modules = [(name, type(m)) for name, m in model.named_modules()]
    before_forward = {name: type(m).forward for name, m in model.named_modules()}
    impl = model.config._attn_implementation
    with torch.no_grad():
        before_logits = model(ids).logits
    gm = bridge.trace(model)
    assert [(name, type(m)) for name, m in model.named_modules()] == before_modules
    assert {name: type(m).forward for name, m in model.named_modules()} == before_forward
    assert all("forward" not in vars(m) for m in model.modules())  # no instance-level patches
    assert model.config._attn_implementation == impl
    for k, v in model.state_dict().items():
        assert torch.equal(v, before_state[k]), k
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before_logits)
    # the traced module holds no copies: every tensor it owns is one of the HF model's
    hf_ptrs = {t.data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert {p.data_ptr() for p in gm.parameters()} <= hf_ptrs
    assert gm.hf is model
    # and it follows edits to the HF weights
    with torch.no_grad():
        model.lm_head.weight.mul_(2.0)
        assert torch.allclose(gm(ids), model(ids).logits, atol=1e-5)


def test_hooks_are_removed_after_run_with_hooks(core_trio):
    _, _, gm = core_trio
    gm.run_with_hooks(tokens(1, 3), fwd_hooks=[(lambda n: True, lambda t, hook: None)],
                      bwd_hooks=[("hook_embed", lambda g, hook: None)])
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())


def test_hooks_are_removed_after_an_exception_inside_hooks(core_trio):
    _, _, gm = core_trio

    def boom(t, hook):
        raise RuntimeError("hook failed")

    mid = mid_hook(gm, 0)
    with pytest.raises(RuntimeError, match="hook failed"):
        with gm.hooks(fwd_hooks=[(mid, boom)]):
            gm(tokens(1, 3))
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())
    with pytest.raises(RuntimeError, match="hook failed"):
        gm.run_with_hooks(tokens(1, 3), fwd_hooks=[(mid, boom)])
    assert not any(hp.has_hooks for hp in gm.hook_dict.values())
    gm(tokens(1, 3))  # still usable


def test_permanent_hooks_survive_reset(core_trio):
    _, _, gm = core_trio
    seen = []
    gm.add_hook("hook_embed", lambda t, hook: seen.append(1), is_permanent=True)
    gm.reset_hooks()
    gm(tokens(1, 3))
    assert seen == [1]
    gm.reset_hooks(including_permanent=True)
    gm(tokens(1, 3))
    assert seen == [1]


def test_deepcopy_gives_an_independent_traced_module():
    import copy
    from conftest import traced
    _, _, gm = traced("llama")
    ids = tokens(2, 5)
    twin = copy.deepcopy(gm)
    assert isinstance(twin, bridge.HookedGraphModule) and set(twin.hook_dict) == set(gm.hook_dict)
    assert twin.hf is not gm.hf
    with torch.no_grad():
        assert torch.equal(twin(ids), gm(ids))
        seen = []
        twin.add_hook("blocks.0.hook_resid_post", lambda t, hook: seen.append(hook.name))
        gm(ids)
        assert seen == []  # hooks on the copy are the copy's
        twin(ids)
        assert seen == ["blocks.0.hook_resid_post"]
        twin.hf.lm_head.weight.mul_(2.0)  # weights are the copy's too
        assert not torch.equal(twin(ids), gm(ids))
