"""fxbridge: trace a Hugging Face causal LM into a torch.fx GraphModule with TransformerLens-style hooks.

    import fxbridge as bridge
    gm = bridge.trace(model)
    logits, cache = gm.run_with_cache(tokens)
    bridge.export(gm, "layer3.svg", layer=3)      # also .dot / .json / .graphml; bridge.to_networkx(gm)
"""
from .architectures import supported_architectures
from .errors import (CaptureError, FxBridgeError, HookShapeError, InferredSpecWarning, MissingDependency,
                     ModelLoadError, NotTracedError, PassOrderError, PatternNotFound, UnsupportedArchitecture,
                     UnsupportedModel, UsageError, VerificationError)
from .exporter import export, to_networkx
from .runtime import ActivationCache, HookedGraphModule, HookPoint, get_act_name
from .pipeline import TraceReport, trace
from .pretrained import from_pretrained

__version__ = "0.1.0"

__all__ = ["ActivationCache", "CaptureError", "FxBridgeError", "HookPoint", "HookShapeError", "HookedGraphModule",
           "InferredSpecWarning",
           "MissingDependency", "ModelLoadError", "NotTracedError", "PassOrderError", "PatternNotFound", "TraceReport",
           "UnsupportedArchitecture", "UnsupportedModel", "UsageError", "VerificationError", "export", "from_pretrained",
           "get_act_name",
           "supported_architectures", "to_networkx", "trace"]
