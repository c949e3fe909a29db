"""Hook runtime: hook points, the hooked GraphModule, the activation cache, and the fused-or-eager cores."""
from .cache import ActivationCache
from .names import HOOKS, HookDef, aliases_for, get_act_name, hook_name, shape_of
from .cores import AttentionCore, LayerNormCore, RMSNormCore
from .hook_point import HookHandle, HookPoint
from .module import HookedGraphModule

__all__ = ["HOOKS", "ActivationCache", "AttentionCore", "HookDef", "HookHandle", "HookPoint", "HookedGraphModule",
           "LayerNormCore", "RMSNormCore", "aliases_for", "get_act_name", "hook_name", "shape_of"]
