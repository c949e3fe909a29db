"""``use_attn_result``: blocks.{i}.attn.hook_result holds each head's z_h @ W_O[h]; the heads sum to o_proj's output."""
import pytest
import torch
from einops import rearrange

import fxbridge as bridge
from conftest import arch_params
from tiny import build, eager_reference, tokens

TOL = 1e-5
_RESULT = {}


def traced_with_result(arch):
    if arch not in _RESULT:
        model = build(arch)
        _RESULT[arch] = (model, eager_reference(model), bridge.trace(model, use_attn_result=True))
    return _RESULT[arch]


def _splittable(arch) -> bool:
    from fxbridge.architectures import get_spec
    from tiny import CONFIGS, missing_config_class
    return missing_config_class(arch) is not None or not get_spec(CONFIGS[arch]()).no_attn_result


@pytest.mark.parametrize("arch", [p for p in arch_params(slow_beyond_core=True) if _splittable(p.values[0])])
def test_hook_result_sums_to_the_output_projection(arch):
    model, ref, gm = traced_with_result(arch)
    layer = 1
    path = gm.spec.layer(layer, f"{gm.spec.attn}.{gm.spec.o_proj}")
    o_proj = ref.get_submodule(path)
    seen = {}
    handle = o_proj.register_forward_hook(lambda mod, args, out: seen.update(x=args[0], out=out))
    ids = tokens(2, 7)
    try:
        with torch.no_grad():
            expected = ref(ids).logits
            logits, cache = gm.run_with_cache(ids, names_filter=lambda n: n.startswith(f"blocks.{layer}.attn."))
    finally:
        handle.remove()
    assert (logits - expected).abs().max().item() < TOL
    result = cache["result", layer]
    H, D = gm.dims["n_heads"], gm.dims["d_model"]
    assert result.shape == (2, 7, H, D)
    bias = o_proj.bias if getattr(o_proj, "bias", None) is not None else 0.0
    assert (result.sum(dim=2) + bias - seen["out"]).abs().max().item() < TOL
    # each head by hand from HF's weight: W_O[h] is the h-th block of d_head input columns
    weight = o_proj.weight if type(o_proj).__name__ == "Conv1D" else o_proj.weight.T  # [H*dh, D]
    w_o = rearrange(weight, "(h k) d -> h k d", h=H)
    z = cache["z", layer]
    by_hand = torch.einsum("bshk,hkd->bshd", z, w_o)
    assert (by_hand - result).abs().max().item() < TOL


def test_ablating_a_head_through_hook_result_equals_hook_z():
    _, _, gm = traced_with_result("llama")
    ids = tokens(2, 6)

    def zero_z(z, hook):
        z[:, :, 1] = 0.0

    def zero_result(r, hook):
        r[:, :, 1] = 0.0

    with torch.no_grad():
        via_z = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_z", zero_z)])
        via_result = gm.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_result", zero_result)])
        clean = gm(ids)
    assert (via_z - via_result).abs().max().item() < TOL
    assert (via_z - clean).abs().max().item() > 1e-4


def test_hook_result_is_absent_unless_asked():
    from conftest import traced
    _, _, gm = traced("llama")
    assert not any(name.endswith("hook_result") for name in gm.hook_dict)


@pytest.mark.parametrize("arch", arch_params(["jetmoe"]))
def test_a_family_without_one_output_projection_refuses_use_attn_result_by_saying_why(arch):
    with pytest.raises(ValueError, match="use_attn_result=True is not available for JetMoE .jetmoe.: its output "
                                         "projection is a mixture of experts"):
        bridge.trace(build(arch), use_attn_result=True)
