"""HookPoint: an identity module on the data path that runs the hook functions attached to it.

It follows TransformerLens's ``HookPoint`` contract -- ``fn(activation, hook)``, a returned tensor replaces the
activation, backward hooks receive the gradient of the activation -- but dispatches its own list of functions
instead of going through ``nn.Module`` forward hooks, so a point with nothing attached costs one attribute test.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import HookShapeError

HookFn = Callable[..., "torch.Tensor | None"]


@dataclass(eq=False)
class HookHandle:
    """Returned by ``HookPoint.add_hook``; ``remove()`` detaches exactly that function."""

    point: "HookPoint"
    fn: HookFn
    dir: str
    is_permanent: bool = False

    def remove(self) -> None:
        hooks = self.point._fwd if self.dir == "fwd" else self.point._bwd
        if self in hooks:
            hooks.remove(self)


class FastCallModule(nn.Module):
    """A module whose call skips ``nn.Module.__call__``'s dispatch unless torch module hooks are registered on it.

    The traced graph calls hundreds of hook points and cores per forward; the generic call path costs about a
    microsecond each, which is most of what an unhooked point would cost. (Global module hooks registered with
    ``torch.nn.modules.module.register_module_forward_hook`` are not seen by these modules.)
    """

    def __call__(self, *args, **kwargs):
        if self._forward_hooks or self._forward_pre_hooks or self._backward_hooks or self._backward_pre_hooks:
            return nn.Module.__call__(self, *args, **kwargs)
        return self.forward(*args, **kwargs)


class HookPoint(FastCallModule):
    """Identity with hooks. ``name`` is its dotted name in the traced module (set when installed)."""

    def __init__(self, name: str = "", shape: tuple[str, ...] = (), made_by: str = "", hf_module: str = ""):
        super().__init__()
        self.name = name
        self.shape = shape  # symbolic dims, e.g. ("B", "S", "H", "dh")
        self.made_by = made_by  # the pass that created it
        self.hf_module = hf_module  # the HF module it sits in
        self._fwd: list[HookHandle] = []
        self._bwd: list[HookHandle] = []
        self.ctx: dict = {}  # TransformerLens's per-hook scratch space (kept across calls until cleared)

    def layer(self) -> int:
        """The block index of a per-layer hook point (``blocks.3.attn.hook_z`` -> 3), as TransformerLens."""
        parts = self.name.split(".")
        if len(parts) < 2 or parts[0] != "blocks" or not parts[1].isdigit():
            raise ValueError(f"hook point {self.name!r} is not inside a block, so it has no layer")
        return int(parts[1])

    def clear_context(self) -> None:
        self.ctx = {}

    @property
    def has_hooks(self) -> bool:
        """Whether anything runs here: fxbridge hooks, or torch forward hooks on the module (an attached SAE)."""
        return bool(self._fwd or self._bwd or self._forward_hooks)

    def add_hook(self, fn: HookFn, dir: str = "fwd", is_permanent: bool = False, prepend: bool = False) -> HookHandle:
        if dir not in ("fwd", "bwd"):
            raise ValueError(f"dir must be 'fwd' or 'bwd', got {dir!r}")
        handle = HookHandle(self, fn, dir, is_permanent)
        hooks = self._fwd if dir == "fwd" else self._bwd
        hooks.insert(0, handle) if prepend else hooks.append(handle)
        return handle

    def remove_hooks(self, dir: str = "both", including_permanent: bool = False) -> None:
        for d, hooks in (("fwd", self._fwd), ("bwd", self._bwd)):
            if dir in (d, "both"):
                hooks[:] = [h for h in hooks if h.is_permanent and not including_permanent]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._fwd and not self._bwd:
            return x  # nothing attached: one test
        if self._fwd and _needs_private_copy(x):
            x = x.clone()
        for handle in tuple(self._fwd):
            out = handle.fn(x, hook=self)
            if out is not None:
                _check_replacement(self.name, x, out)
                x = out
        if self._bwd and x.requires_grad:
            x = _BackwardHook.apply(x, self)
        return x

    def extra_repr(self) -> str:
        return f"{self.name!r}"


def _needs_private_copy(x: torch.Tensor) -> bool:
    """Whether forward hooks must get a copy of ``x`` so that editing it in place is safe (TransformerLens semantics).

    - Under autograd the activation may be a tensor the op that made it saved for backward (SDPA's output is
      ``hook_z`` on the fused path, softmax's output is ``hook_pattern``): an in-place edit would make
      ``backward()`` fail. A copy costs one activation, and only at hooked points while gradients are recorded.
    - An ``expand``-ed view (GPT-2's ``hook_pos_embed`` is [S,D] broadcast to [B,S,D]) refuses in-place writes.
    Downstream reads the copy, so in-place edits take effect exactly as a returned tensor does.
    """
    if x.requires_grad and torch.is_grad_enabled():
        return True
    return any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape))


def _check_replacement(name: str, old: torch.Tensor, new) -> None:
    if not isinstance(new, torch.Tensor):
        raise HookShapeError(name, f"a tensor of shape {tuple(old.shape)}", f"an object of type {type(new).__name__}")
    if new.shape != old.shape:
        raise HookShapeError(name, f"shape {tuple(old.shape)}", f"shape {tuple(new.shape)}")
    if new.dtype != old.dtype:  # an int64 tensor would silently truncate the residual stream
        raise HookShapeError(name, f"dtype {_short(old.dtype)}", f"dtype {_short(new.dtype)}")
    if new.device != old.device:
        raise HookShapeError(name, f"on device {old.device}", f"a tensor on device {new.device}")


def _short(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


class _BackwardHook(torch.autograd.Function):
    """Identity whose backward runs the point's backward hooks on the gradient of the activation."""

    @staticmethod
    def forward(ctx, x, point):
        # The hooks attached *now* run in backward, even if run_with_hooks has removed them by then.
        ctx.point, ctx.handles = point, tuple(point._bwd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        point = ctx.point
        for handle in ctx.handles:
            out = handle.fn(grad, hook=point)
            if out is not None:
                _check_replacement(point.name, grad, out)
                grad = out
        return grad, None
