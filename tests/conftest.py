import sys
from pathlib import Path

import pytest
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))

import fxbridge as bridge  # noqa: E402
from tiny import CONFIGS, build, eager_reference, missing_config_class  # noqa: E402

_TRACED = {}


def traced(arch: str):
    """(hf model, eager reference copy, traced module), traced once per session per architecture."""
    if arch not in _TRACED:
        model = build(arch)
        ref = eager_reference(model)
        _TRACED[arch] = (model, ref, bridge.trace(model))
    return _TRACED[arch]


def arch_params(archs=None) -> list:
    """pytest params over tiny architectures; one whose config class the installed transformers lacks is skipped."""
    params = []
    for arch in sorted(CONFIGS if archs is None else archs):
        missing = missing_config_class(arch)
        reason = f"the installed transformers {tf.__version__} has no {missing}"
        params.append(pytest.param(arch, marks=pytest.mark.skipif(missing is not None, reason=reason)))
    return params


def pytest_report_header(config):
    import einops
    import networkx
    import torch
    return (f"fxbridge against torch {torch.__version__}, transformers {tf.__version__}, einops {einops.__version__}, "
            f"networkx {networkx.__version__}")


@pytest.fixture(params=arch_params())
def arch(request):
    return request.param


@pytest.fixture
def trio(arch):
    model, ref, gm = traced(arch)
    gm.reset_hooks(including_permanent=True)
    yield model, ref, gm
    gm.reset_hooks(including_permanent=True)
