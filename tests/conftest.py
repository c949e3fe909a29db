import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import fxbridge as bridge  # noqa: E402
from tiny import CONFIGS, build, eager_reference  # noqa: E402

_TRACED = {}


def traced(arch: str):
    """(hf model, eager reference copy, traced module), traced once per session per architecture."""
    if arch not in _TRACED:
        model = build(arch)
        ref = eager_reference(model)
        _TRACED[arch] = (model, ref, bridge.trace(model))
    return _TRACED[arch]


@pytest.fixture(params=sorted(CONFIGS))
def arch(request):
    return request.param


@pytest.fixture
def trio(arch):
    model, ref, gm = traced(arch)
    gm.reset_hooks(including_permanent=True)
    yield model, ref, gm
    gm.reset_hooks(including_permanent=True)
