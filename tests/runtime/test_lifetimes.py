"""Lifetimes: a traced module and its HF model are freed when the caller drops them (probe defect 1)."""
import gc
import weakref

import torch

import fxbridge as bridge
from tiny import build


def _trace_use_drop(arch: str):
    model = build(arch)
    gm = bridge.trace(model)
    gm(torch.randint(0, 100, (1, 6)))
    gm.run_with_cache(torch.randint(0, 100, (1, 6)))
    gm.hook_table()  # replays the cores on fake values (exporter/values.py keeps a per-graph table of those runs)
    gm(torch.randint(0, 100, (1, 6)), stop_at_layer=1)
    return weakref.ref(model), weakref.ref(gm), weakref.ref(gm.graph)


def test_dropped_module_and_model_are_freed():
    for arch in ("llama", "gpt2"):
        model_ref, gm_ref, graph_ref = _trace_use_drop(arch)
        gc.collect()
        assert model_ref() is None, f"{arch}: the HF model outlives its traced module"
        assert gm_ref() is None, f"{arch}: the traced module is never freed"
        assert graph_ref() is None, f"{arch}: the traced graph is never freed"


def test_sweep_over_checkpoints_runs_in_flat_memory():
    """What a sweep does: build, trace, run, drop -- the live tensors after each cycle do not grow."""
    def live_params() -> int:
        gc.collect()
        return sum(o.numel() for o in gc.get_objects() if isinstance(o, torch.nn.Parameter))

    _trace_use_drop("llama")
    base = live_params()
    for _ in range(3):
        _trace_use_drop("llama")
        assert live_params() == base
