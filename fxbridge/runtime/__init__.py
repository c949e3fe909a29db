"""Hook runtime: hook points, the hooked GraphModule, the activation cache, and the fused-or-eager cores."""
from .cache import ActivationCache, get_act_name
from .cores import AttentionCore, LayerNormCore, RMSNormCore
from .hook_point import HookHandle, HookPoint
from .module import HookedGraphModule

__all__ = ["ActivationCache", "AttentionCore", "HookHandle", "HookPoint", "HookedGraphModule", "LayerNormCore",
           "RMSNormCore", "get_act_name"]
