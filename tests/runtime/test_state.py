"""Module state after trace(): pickling round trip, dtype moves, float64 norms (probe defects 5 and 6)."""
import io
import pickle

import pytest
import torch

import fxbridge as bridge
from tiny import build, tokens


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_torch_save_and_load_give_back_a_hookable_module(arch):
    model = build(arch)
    gm = bridge.trace(model, use_attn_result=True)
    buf = io.BytesIO()
    torch.save(gm, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    assert isinstance(loaded, bridge.HookedGraphModule) and loaded is not gm
    ids = tokens(2, 7)
    with torch.no_grad():
        expected = model(ids).logits
        torch.testing.assert_close(loaded(ids), expected, rtol=0, atol=1e-5)
        # hookable: zeroing the residual before the unembedding leaves only the final norm's bias path
        _, cache = loaded.run_with_cache(ids, names_filter="blocks.0.attn.hook_result")  # the option survived
    assert cache["blocks.0.attn.hook_result"].shape == (2, 7, 4, 64)  # [B,S,H,D]
    loaded.hf.get_input_embeddings().weight.data.zero_()  # the loaded module owns its own weights
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), expected, rtol=0, atol=1e-5)


def test_pickle_round_trip_warns_that_hooks_are_not_saved():
    gm = bridge.trace(build("llama"))
    gm.add_hook("blocks.0.hook_resid_post", lambda t, hook: t * 0, is_permanent=True)
    with pytest.warns(UserWarning, match="not saved"):
        data = pickle.dumps(gm)
    loaded = pickle.loads(data)
    assert not any(hp.has_hooks for hp in loaded.hook_dict.values())
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens(1, 5)), gm.hf(tokens(1, 5)).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("convert", [lambda gm: gm.to(torch.float64), lambda gm: gm.double(),
                                     lambda gm: gm.half(), lambda gm: gm.bfloat16(),
                                     lambda gm: gm.to("cpu", torch.float16)])
def test_dtype_moves_after_trace_say_to_trace_again_and_touch_nothing(convert):
    model = build("llama")
    gm = bridge.trace(model)
    with pytest.raises(bridge.UsageError, match=r"trace again: gm = fxbridge.trace\(gm.hf.to\(torch\."):
        convert(gm)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # refused before any weight moved
    ids = tokens(2, 7)
    with torch.no_grad():
        torch.testing.assert_close(gm(ids), model(ids).logits, rtol=0, atol=1e-5)


def test_same_dtype_and_device_moves_still_work():
    model = build("gpt2")
    gm = bridge.trace(model)
    assert gm.to("cpu") is gm and gm.float() is gm and gm.to(torch.float32) is gm
    with torch.no_grad():
        torch.testing.assert_close(gm(tokens(1, 5)), model(tokens(1, 5)).logits, rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_tracing_the_converted_model_matches_hf_in_that_dtype(dtype):
    model = build("llama").to(dtype)
    gm = bridge.trace(model)
    ids = tokens(2, 7)
    with torch.no_grad():
        out, ref = gm(ids), model(ids).logits
    assert out.dtype == dtype
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12 if dtype == torch.float64 else 0)


def test_hooked_layernorm_keeps_float64():
    """GPT-2's LayerNorm core with its hooks attached computes in float64 for a float64 model, as HF does."""
    model = build("gpt2").to(torch.float64)
    gm = bridge.trace(model)
    ids = tokens(2, 7)
    seen = {}

    def record(t, hook):
        seen[hook.name] = t.dtype

    hooks = [(f"blocks.{i}.ln1.hook_scale", record) for i in range(3)]
    with torch.no_grad():
        out = gm.run_with_hooks(ids, fwd_hooks=hooks)
        ref = model(ids).logits
    assert set(seen.values()) == {torch.float64}
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)
