"""Typed errors. Each names what was found and what to do about it (DESIGN.md principle 6)."""
from __future__ import annotations

import difflib
from collections.abc import Iterable


class FxBridgeError(Exception):
    """Base class of every error fxbridge raises on purpose."""


class UnsupportedArchitecture(FxBridgeError, ValueError):
    """The model's ``config.model_type`` has no architecture spec, or its family needs a newer transformers."""

    def __init__(self, model_type: str, supported: Iterable[str], *, family: str | None = None,
                 missing: Iterable[str] = (), transformers_version: str | None = None,
                 inferred_from: str | None = None, reason: str | None = None):
        self.model_type = model_type
        self.supported = sorted(supported)
        self.missing = tuple(missing)  # what the installed transformers lacks, where fxbridge has the spec
        self.reason = reason  # why no spec could be inferred from the model (architectures/infer.py)
        listed = ", ".join(self.supported)
        if reason is not None:
            msg = (f"fxbridge has no architecture spec for model_type={model_type!r} and none could be inferred "
                   f"from {inferred_from}: {reason}. Supported model types: {listed}. Adding one is a small spec "
                   "in fxbridge/architectures/ (see architectures/README.md).")
        elif self.missing:
            msg = (f"fxbridge supports model_type={model_type!r} ({family}), but the installed transformers "
                   f"{transformers_version} lacks {', '.join(self.missing)}: upgrade transformers "
                   f"(pip install -U transformers). Model types supported with this transformers: {listed}.")
        else:
            msg = (f"fxbridge has no architecture spec for model_type={model_type!r}. Supported model types: {listed}. "
                   "Adding one is a small spec in fxbridge/architectures/ (see architectures/README.md).")
        super().__init__(msg)


class InferredSpecWarning(UserWarning):
    """``trace`` used a spec fxbridge inferred (and verified) for an unregistered ``model_type``, or the spec of the
    registered family whose class the model is; ``gm.report`` shows it."""


class CaptureError(FxBridgeError, RuntimeError):
    """torch.export could not capture the model."""


class PatternNotFound(FxBridgeError, RuntimeError):
    """A pass did not find the pattern it rewrites: where it looked, what it expected there, what it found."""

    def __init__(self, pass_name: str, where: str, expected: str, found: str, before: Iterable[str] = ()):
        self.pass_name, self.where, self.expected, self.found = pass_name, where, expected, found
        ran = ", ".join(before) or "none"
        super().__init__(
            f"pass {pass_name!r} in {where}: expected {expected}, found {found} (passes run before it: {ran}). "
            "Check what the spec names there (module paths, layout) against the HF model; if they are right, the "
            "model computes this in a form the pass does not recognise."
        )


class PassOrderError(FxBridgeError, ValueError):
    """A pass list breaks a pass's declared order (``requires`` / ``before``); found before any pass runs."""

    def __init__(self, problems: Iterable[str], order: Iterable[str]):
        self.problems = list(problems)
        super().__init__(f"pass order: {'; '.join(self.problems)} (order given: {', '.join(order)})")


class HookShapeError(FxBridgeError, ValueError):
    """A hook returned something other than a tensor of the activation's shape, dtype and device."""

    def __init__(self, hook_name: str, expected, got):
        self.hook_name, self.expected, self.got = hook_name, expected, got
        super().__init__(
            f"hook {hook_name!r} returned {got}, but the activation it replaces is {expected}. "
            "Return None to keep the activation (in-place edits count), or a tensor of the same shape, dtype and "
            "device (e.g. `new.to(activation.dtype)`)."
        )


class NotTracedError(FxBridgeError, TypeError):
    """An fxbridge function was given something that ``fxbridge.trace`` did not produce."""


class MissingDependency(FxBridgeError, RuntimeError):
    """An optional tool or package (Graphviz for SVG/PNG export) is missing; the message says how to install it."""


class UnsupportedModel(FxBridgeError, TypeError):
    """``trace()`` was given something that is not a transformers causal LM (names what it got and what to pass)."""


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
