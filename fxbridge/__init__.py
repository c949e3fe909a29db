"""fxbridge: trace a Hugging Face causal LM into a torch.fx GraphModule with TransformerLens-style hooks.

    import fxbridge as bridge
    gm = bridge.trace(model)
    logits, cache = gm.run_with_cache(tokens)
"""
from .architectures import supported_architectures
from .errors import (CaptureError, FxBridgeError, HookShapeError, NotTracedError, PatternNotFound,
                     UnsupportedArchitecture)
from .runtime import ActivationCache, HookedGraphModule, HookPoint, get_act_name
from .trace import TraceReport, trace

__version__ = "0.1.0"

__all__ = ["ActivationCache", "CaptureError", "FxBridgeError", "HookPoint", "HookShapeError", "HookedGraphModule",
           "NotTracedError", "PatternNotFound", "TraceReport", "UnsupportedArchitecture", "get_act_name",
           "supported_architectures", "trace"]
