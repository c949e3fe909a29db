"""Typed errors. Each names what was found and what to do about it (DESIGN.md principle 6)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class FxBridgeError(Exception):
    """Base class of every error fxbridge raises on purpose."""


class UnsupportedArchitecture(FxBridgeError, ValueError):
    """The model's ``config.model_type`` has no architecture spec, or its family needs a newer transformers."""

    def __init__(self, model_type: str, supported: Iterable[str], *, family: str | None = None,
                 missing: Iterable[str] = (), transformers_version: str | None = None):
        self.model_type = model_type
        self.supported = sorted(supported)
        self.missing = tuple(missing)  # what the installed transformers lacks, where fxbridge has the spec
        listed = ", ".join(self.supported)
        if self.missing:
            msg = (f"fxbridge supports model_type={model_type!r} ({family}), but the installed transformers "
                   f"{transformers_version} lacks {', '.join(self.missing)}: upgrade transformers "
                   f"(pip install -U transformers). Model types supported with this transformers: {listed}.")
        else:
            msg = (f"fxbridge has no architecture spec for model_type={model_type!r}. Supported model types: {listed}. "
                   "Adding one is a small spec in fxbridge/architectures/ (see architectures/README.md).")
        super().__init__(msg)


class CaptureError(FxBridgeError, RuntimeError):
    """torch.export could not capture the model."""


class PatternNotFound(FxBridgeError, RuntimeError):
    """A pass expected to rewrite something and found a different number of matches."""

    def __init__(self, pass_name: str, expected: int, found: int, detail: str = "", before: Iterable[str] = ()):
        self.pass_name, self.expected, self.found = pass_name, expected, found
        ran = ", ".join(before) or "none"
        msg = f"pass {pass_name!r} expected {expected} match(es) but found {found}"
        if detail:
            msg += f": {detail}"
        msg += f" (passes run before it: {ran}). The HF modeling code probably changed shape; please report it."
        super().__init__(msg)


class HookShapeError(FxBridgeError, ValueError):
    """A hook returned a tensor whose shape (or type) differs from the activation it replaces."""

    def __init__(self, hook_name: str, expected, got):
        self.hook_name, self.expected, self.got = hook_name, expected, got
        super().__init__(
            f"hook {hook_name!r} returned {got}, but the activation it replaces is {expected}. "
            "Return None to keep the activation, or a tensor of the same shape."
        )


class NotTracedError(FxBridgeError, TypeError):
    """An fxbridge function was given something that ``fxbridge.trace`` did not produce."""


class MissingDependency(FxBridgeError, RuntimeError):
    """An optional tool or package (Graphviz for SVG/PNG export) is missing; the message says how to install it."""


class UsageError(FxBridgeError, ValueError):
    """A bad argument a user can fix (an unknown export format, view or layer; verify on a meta model)."""


class ModelLoadError(FxBridgeError, OSError):
    """A model source (hub id, checkpoint directory, config.json) could not be loaded; names it and why."""


class VerificationError(FxBridgeError, AssertionError):
    """``trace(..., verify=True)``: the traced module disagrees with HF; names the first diverging point."""

    def __init__(self, where: str, max_diff: float, tolerance: float, details: list[str] | None = None):
        self.where, self.max_diff, self.tolerance = where, max_diff, tolerance
        self.details = list(details or [])
        msg = (f"traced module diverges from the HF model first at {where}: max |traced - HF| = {max_diff:.3e} "
               f"> tolerance {tolerance:.1e}")
        if self.details:
            msg += " (" + "; ".join(self.details) + ")"
        msg += ". Hooks attached with is_permanent=True change the output; otherwise please report it."
        super().__init__(msg)


def unknown_hook_error(name: str, known: Iterable[str]) -> KeyError:
    """A KeyError naming the closest known hook names."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" There are {len(known)} hook points; see gm.hook_dict."
    return KeyError(f"unknown hook name {name!r}.{hint}")
