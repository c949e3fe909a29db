"""The spec check without tracing: every pass a spec lists exists, and on every tiny config each one expects matches."""
import pytest

from fxbridge.architectures import REGISTRY, dims_from_config, get_spec
from fxbridge.passes import PASSES
from conftest import arch_params
from tiny import CONFIGS

# Passes a spec lists for the whole family that a config switches off (expects 0), each with its reason. Listed
# exactly: a pass expecting 0 anywhere else fails, and so does an entry here that expects matches again.
OFF_BY_CONFIG = {
    # Falcon's sequential blocks (old architecture, parallel_attn=False) have no in-place residual add
    ("falcon_mha", "make_adds_out_of_place"),
    ("falcon_rw", "make_adds_out_of_place"),
    # every layer's MLP is an MoE block: no dense MLP to hook
    *((arch, "hook_mlp") for arch in ("mixtral", "olmoe", "flex_olmo", "minimax_m2", "phimoe", "granitemoe")),
}


@pytest.mark.parametrize("model_type", sorted(REGISTRY))
def test_every_pass_a_spec_lists_is_registered(model_type):
    spec = REGISTRY[model_type]
    assert spec.passes, model_type
    names = [p.name for p in spec.passes]
    missing = [name for name in names if name not in PASSES]
    assert not missing, f"{model_type} lists unknown passes {missing}; known: {sorted(PASSES)}"
    assert len(set(names)) == len(names), f"{model_type} lists a pass twice: {names}"
    for p in spec.passes:
        p.check_configured()  # every parameter a pass needs is given


@pytest.mark.parametrize("arch", arch_params())
def test_on_each_tiny_config_every_listed_pass_expects_matches(arch):
    config = CONFIGS[arch]()
    spec = get_spec(config)
    dims = dims_from_config(config, spec)
    expected = {p.name: p.expected(spec, dims) for p in spec.passes}
    assert all(isinstance(n, int) for n in expected.values()), expected
    off = {name for name, n in expected.items() if n == 0}
    assert off == {name for a, name in OFF_BY_CONFIG if a == arch}, f"{arch}: expected matches per pass: {expected}"
    assert all(n >= 0 for n in expected.values()), expected
