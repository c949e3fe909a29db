import os
import sys
from pathlib import Path

import pytest
import transformers as tf

sys.path.insert(0, str(Path(__file__).parent))

import fxbridge as bridge  # noqa: E402

if os.environ.get("PYTEST_XDIST_WORKER"):  # one pytest-xdist worker per core: one torch thread each
    import torch
    torch.set_num_threads(1)
from tiny import CONFIGS, CORE, build, eager_reference, missing_config_class  # noqa: E402

_TRACED = {}


def traced(arch: str):
    """(hf model, eager reference copy, traced module), traced once per session per architecture."""
    if arch not in _TRACED:
        model = build(arch)
        ref = eager_reference(model)
        _TRACED[arch] = (model, ref, bridge.trace(model))
    return _TRACED[arch]


def arch_params(archs=None, *, slow_beyond_core: bool = False) -> list:
    """pytest params over tiny architectures; one whose config class the installed transformers lacks is skipped.
    ``slow_beyond_core``: families outside tiny.CORE are marked ``slow`` (run with ``pytest -m slow``)."""
    params = []
    for arch in sorted(CONFIGS if archs is None else archs):
        missing = missing_config_class(arch)
        reason = f"the installed transformers {tf.__version__} has no {missing}"
        # xdist_group: under `make test` (pytest-xdist, --dist loadgroup) one worker runs every test of an
        # architecture, so it is traced once
        marks = [pytest.mark.skipif(missing is not None, reason=reason), pytest.mark.xdist_group(arch)]
        if slow_beyond_core and arch not in CORE:
            marks.append(pytest.mark.slow)
        params.append(pytest.param(arch, marks=marks))
    return params


def arch_params_fast(fast) -> list:
    """``arch_params()`` over every tiny architecture, those outside ``fast`` marked ``slow``."""
    return [pytest.param(p.values[0], marks=[*p.marks, *([] if p.values[0] in fast else [pytest.mark.slow])])
            for p in arch_params()]


def pytest_report_header(config):
    import einops
    import networkx
    import torch
    return (f"fxbridge against torch {torch.__version__}, transformers {tf.__version__}, einops {einops.__version__}, "
            f"networkx {networkx.__version__}")


@pytest.fixture(params=arch_params())
def arch(request):
    return request.param


def _fresh(arch):
    model, ref, gm = traced(arch)
    gm.reset_hooks(including_permanent=True)
    yield model, ref, gm
    gm.reset_hooks(including_permanent=True)


@pytest.fixture
def trio(arch):
    """Every tiny family: the contract tests (parity, padding, hooks, head ablation) run on all of them."""
    yield from _fresh(arch)


@pytest.fixture(params=arch_params(slow_beyond_core=True))
def core_arch(request):
    return request.param


@pytest.fixture
def core_trio(core_arch):
    """The generic-suite tests beyond the contract run on tiny.CORE; the other families with ``-m slow``."""
    yield from _fresh(core_arch)
