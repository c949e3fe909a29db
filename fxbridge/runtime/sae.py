"""Sparse-autoencoder splicing in HookedSAETransformer's API (SAELens), duck-typed on SAELens's ``SAE`` objects.

An attached SAE replaces the activation at its hook point ``H`` with the SAE's output, through hooks, not by
swapping a module (the traced graph calls the modules it captured; a module swapped in later is never called):
- a torch forward hook on the fxbridge hook point ``H`` runs after the fxbridge hooks at ``H`` (so those see the
  model's activation, the SAE's input) and returns ``sae.decode(sae.encode(x))`` (+ the error term);
- fxbridge hook points ``H.hook_sae_input``, ``H.hook_sae_acts_pre``, ``H.hook_sae_acts_post``, ``H.hook_sae_recons``
  (fed by torch forward hooks on the SAE's own hook-point submodules, so an edit there takes effect) and
  ``H.hook_sae_error``, ``H.hook_sae_output`` (called by the splice, as SAELens's wrapper does) are listed in
  ``gm.hook_dict`` after ``H`` while the SAE is attached: ``run_with_cache``, ``names_filter``, ``add_hook`` and
  ``run_with_hooks`` reach them by name.
What fxbridge needs of an SAE: ``cfg.metadata.hook_name`` (SAELens 6) or ``cfg.hook_name`` (older),
``cfg.metadata.hook_name_out`` for a transcoder, ``use_error_term``, ``encode`` and ``decode``, and optionally the
six ``hook_sae_*`` submodules.
"""
from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..errors import HookShapeError, UsageError
from .hook_point import HookPoint

# The SAE's own hook points that its encode / decode call; fxbridge forwards their values through its points.
SAE_INNER_POINTS = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons")
# The splice's own points (SAELens's wrapper makes these itself rather than using the SAE's).
SAE_OUTER_POINTS = ("hook_sae_error", "hook_sae_output")
SAE_POINTS = SAE_INNER_POINTS[:3] + SAE_OUTER_POINTS[1:] + SAE_INNER_POINTS[3:] + SAE_OUTER_POINTS[:1]


def sae_hook_names(sae) -> tuple[str, str]:
    """(input hook, output hook) an SAE is trained on: ``cfg.metadata.hook_name`` (SAELens 6), else ``cfg.hook_name``;
    the output hook is ``hook_name_out`` for a transcoder, else the input hook."""
    cfg = getattr(sae, "cfg", None)
    meta = getattr(cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) or getattr(cfg, "hook_name", None)
    if not isinstance(name, str) or not name:
        raise UsageError(f"{type(sae).__name__} has no hook name: add_sae reads sae.cfg.metadata.hook_name (SAELens 6) "
                         f"or sae.cfg.hook_name, and found {name!r}. Set it to the hook point the SAE was trained on, "
                         "e.g. 'blocks.0.hook_resid_pre'.")
    out = getattr(meta, "hook_name_out", None) or getattr(cfg, "hook_name_out", None)
    return name, out if isinstance(out, str) and out else name


@contextlib.contextmanager
def _hooks_disabled(sae):
    """The SAE's hook-point submodules swapped for identities (as SAELens's ``_disable_hooks``): the error term
    is computed from the SAE's clean reconstruction, unaffected by edits made through its hooks."""
    names = [n for n in getattr(sae, "hook_dict", None) or SAE_POINTS if isinstance(getattr(sae, n, None), nn.Module)]
    saved = {n: getattr(sae, n) for n in names}
    try:
        for n in names:
            setattr(sae, n, nn.Identity())
        yield
    finally:
        for n, module in saved.items():
            setattr(sae, n, module)


class _ModelHook:
    """A torch forward hook on one of the model's hook points. ``copy.deepcopy(gm)`` copies the hook points with
    their torch hooks; the copy's is a no-op, so a copied module never runs an SAE it does not list."""

    def __init__(self, fn=None):
        self.fn = fn

    def __call__(self, module, args, output):
        return None if self.fn is None else self.fn(module, args, output)

    def __deepcopy__(self, memo):
        return _ModelHook()


class _Splice:
    """One attached SAE: its fxbridge hook points and the torch hooks that run it at its output hook point."""

    def __init__(self, sae, in_name: str, out_name: str, use_error_term: bool, shape: tuple[str, ...],
                 exclude: list[int] | None = None):
        self.sae, self.in_name, self.out_name, self.use_error_term = sae, in_name, out_name, bool(use_error_term)
        self.exclude = exclude  # token ids at which the SAE is bypassed (exclude_special_tokens), or None
        self.mask: torch.Tensor | None = None  # [B,S] True where bypassed, set for each forward
        self.points = {f"{out_name}.{p}": HookPoint(name=f"{out_name}.{p}", shape=_point_shape(p, out_name, shape),
                                                     made_by="sae", hf_module="") for p in SAE_POINTS}
        self.handles: list = []
        self.active = False  # True while this splice runs the SAE: its inner torch hooks act only then
        self.captured: torch.Tensor | None = None  # a transcoder's input, taken at its input hook

    def point(self, short: str) -> HookPoint:
        return self.points[f"{self.out_name}.{short}"]

    def attach(self, gm) -> None:
        try:
            for short in SAE_INNER_POINTS:
                module = getattr(self.sae, short, None)
                if isinstance(module, nn.Module):
                    self.handles.append(module.register_forward_hook(self._inner(self.point(short))))
            if self.in_name != self.out_name:
                self.handles.append(gm.hook_dict[self.in_name].register_forward_hook(_ModelHook(self._capture)))
            self.handles.append(gm.hook_dict[self.out_name].register_forward_hook(_ModelHook(self._run)))
        except BaseException:
            self.detach()
            raise

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _inner(self, point: HookPoint):
        def forward_through(module, args, output):
            return point(output) if self.active and isinstance(output, torch.Tensor) else None
        return forward_through

    def _capture(self, module, args, output):
        self.captured = output

    def _run(self, module, args, output):
        """The torch forward hook at the output hook point: the SAE's output replaces the activation."""
        if not isinstance(output, torch.Tensor):
            return None
        sae_in = self.captured if self.captured is not None else output
        self.captured = None
        self.active = True
        try:
            out = self.sae.decode(self.sae.encode(sae_in))
            mask = self._mask_for(output)
            if self.use_error_term:
                with torch.no_grad(), _hooks_disabled(self.sae):
                    error = output - self.sae.decode(self.sae.encode(sae_in))
                    if mask is not None:  # bypassed positions keep the activation: no error there
                        error = torch.where(mask, torch.zeros_like(error), error)
                    error = self.point("hook_sae_error")(error)
                out = out + error
            if mask is not None:
                out = torch.where(mask, output.to(out.dtype), out)
            out = self.point("hook_sae_output")(out)
        finally:
            self.active = False
        if not isinstance(out, torch.Tensor) or out.shape != output.shape:
            got = f"shape {tuple(out.shape)}" if isinstance(out, torch.Tensor) else f"a {type(out).__name__}"
            raise HookShapeError(self.out_name, f"an SAE output of shape {tuple(output.shape)}",
                                 f"{got} from {type(self.sae).__name__}")
        return out.to(output.dtype)

    def _mask_for(self, output: torch.Tensor) -> torch.Tensor | None:
        mask = self.mask
        if mask is None:
            return None
        if mask.shape != output.shape[:mask.dim()]:
            raise UsageError(f"exclude_special_tokens: the SAE at {self.out_name!r} sees an activation of shape "
                             f"{tuple(output.shape)}, whose leading dims are not the tokens' {tuple(mask.shape)}")
        return mask.to(output.device).view(*mask.shape, *[1] * (output.dim() - mask.dim()))


def _point_shape(short: str, hook: str, shape: tuple[str, ...]) -> tuple[str, ...]:
    if not shape:
        return ()
    if hook.endswith("hook_z") and short in ("hook_sae_input", "hook_sae_recons"):
        shape = (*shape[:-2], "H*dh")  # SAELens flattens heads for a hook_z SAE
    return (*shape[:-1], "d_sae") if short in ("hook_sae_acts_pre", "hook_sae_acts_post") else shape


def _set_token_masks(gm, args, kwargs) -> None:
    splices = [s for s in gm._fxb_splices.values() if s.exclude is not None]
    value = args[0] if args else next((kwargs[k] for k in ("input", "input_ids", "tokens") if k in kwargs), None)
    if isinstance(value, torch.Tensor):
        tokens = value if value.dim() > 1 else value.unsqueeze(0)
    elif value is None:
        return
    else:  # strings: tokenized as the forward will tokenize them
        tokens = gm.to_tokens(value, prepend_bos=kwargs.get("prepend_bos"), padding_side=kwargs.get("padding_side"),
                              move_to_device=True, truncate=True)
    for splice in splices:
        splice.mask = torch.isin(tokens, torch.tensor(splice.exclude, dtype=tokens.dtype, device=tokens.device))


def _clear_token_masks(gm, args, output) -> None:
    for splice in gm._fxb_splices.values():
        splice.mask = None


class SAEMixin:
    """``add_sae`` / ``reset_saes`` / ``run_with_saes`` / ``saes()`` on a traced module, built on its hook points."""

    @property
    def _fxb_splices(self) -> dict[str, _Splice]:
        splices = self.__dict__.get("_fxb_sae_splices")
        if splices is None:
            splices = self.__dict__["_fxb_sae_splices"] = {}
        return splices

    @property
    def acts_to_saes(self) -> dict[str, Any]:
        """Hook name -> the SAE attached there (as HookedSAETransformer's ``acts_to_saes``)."""
        return {name: splice.sae for name, splice in self._fxb_splices.items()}

    def add_sae(self, sae, use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False):
        """Attach ``sae`` at its hook point until ``reset_saes``; an SAE already there is replaced.
        ``use_error_term=None`` keeps the SAE's own ``use_error_term``; True adds the SAE's error (input minus its
        clean reconstruction), so the model's output is unchanged while the SAE's hooks can be read and edited.
        ``exclude_special_tokens``: True (the tokenizer's special ids) or a list of ids at whose positions the SAE is
        bypassed (the activation passes unchanged)."""
        exclude = self._special_token_ids(exclude_special_tokens)
        in_hook, out_hook = sae_hook_names(sae)
        in_name, out_name = self.resolve(in_hook), self.resolve(out_hook)  # KeyError with close matches
        if use_error_term is None:
            use_error_term = bool(getattr(sae, "use_error_term", False))
        if in_name in self._fxb_splices:
            self._detach_sae(in_name)
        busy = [s.in_name for s in self._fxb_splices.values() if s.out_name == out_name]
        if busy:
            raise UsageError(f"the output of hook point {out_name!r} is already replaced by the transcoder attached at "
                             f"{busy[0]!r}; reset_saes({busy[0]!r}) first")
        splice = _Splice(sae, in_name, out_name, use_error_term, tuple(self.hook_dict[out_name].shape or ()), exclude)
        splice.attach(self)
        self._fxb_splices[in_name] = splice
        self._update_mask_hooks()
        self._list_points(splice, add=True)
        for spelling, canonical in ((out_hook, out_name), (in_hook, in_name)):
            if spelling != canonical:  # the SAE names a TransformerBridge alias: its point names answer to it too
                self.aliases.update({f"{spelling}.{p}": f"{out_name}.{p}" for p in SAE_POINTS})

    def reset_saes(self, act_names: str | Iterable[str] | None = None, prev_saes: Iterable | None = None) -> None:
        """Detach the SAEs at ``act_names`` (all when None). ``prev_saes`` (older SAELens): one SAE or None per
        name, attached again in its place."""
        names = [act_names] if isinstance(act_names, str) else list(self._fxb_splices if act_names is None else act_names)
        prev = [None] * len(names) if prev_saes is None else list(prev_saes)
        if len(prev) != len(names):
            raise ValueError(f"reset_saes got {len(names)} act_names and {len(prev)} prev_saes; give one per name")
        for name, sae in zip(names, prev):
            key = self.resolve(name) if name not in self._fxb_splices else name
            if key not in self._fxb_splices:
                warnings.warn(f"no SAE is attached to {name!r}; nothing to reset", stacklevel=2)
            else:
                self._detach_sae(key)
            if sae is not None:
                self.add_sae(sae)

    def _detach_sae(self, name: str) -> None:
        splice = self._fxb_splices.pop(name)
        splice.detach()
        self._update_mask_hooks()
        self._list_points(splice, add=False)
        for point in splice.points.values():  # hooks added to the SAE's points go with it
            point.remove_hooks("both", including_permanent=True)

    def _special_token_ids(self, exclude) -> list[int] | None:
        """exclude_special_tokens as token ids: a list as given; True: the tokenizer's BOS, EOS, PAD, SEP and
        decoder-start ids (SAELens's ``get_special_token_ids``); False / None: no bypass."""
        if exclude is None or exclude is False:
            return None
        if exclude is True:
            tokenizer = getattr(self, "tokenizer", None)
            if tokenizer is None:
                raise UsageError("add_sae(exclude_special_tokens=True) reads the special token ids from the "
                                 "tokenizer, and this module has none: trace(model, tokenizer=tok), "
                                 "gm.set_tokenizer(tok), or pass the ids: exclude_special_tokens=[0, 2]")
            ids = {getattr(tokenizer, attr, None) for attr in ("bos_token_id", "eos_token_id", "pad_token_id",
                                                                "sep_token_id", "decoder_start_token_id")}
            return sorted(i for i in ids if i is not None)
        return [int(i) for i in exclude]

    def _update_mask_hooks(self) -> None:
        """While an attached SAE bypasses special tokens, torch hooks on the module's own call compute each
        forward's token mask (from its input) before the graph runs, and clear it after."""
        needed = any(s.exclude is not None for s in self._fxb_splices.values())
        handles = self.__dict__.get("_fxb_sae_mask_handles")
        if needed and handles is None:
            self.__dict__["_fxb_sae_mask_handles"] = (
                self.register_forward_pre_hook(_set_token_masks, with_kwargs=True),
                self.register_forward_hook(_clear_token_masks, always_call=True))
        elif not needed and handles is not None:
            for handle in self.__dict__.pop("_fxb_sae_mask_handles"):
                handle.remove()

    def _list_points(self, splice: _Splice, add: bool) -> None:
        """The splice's points into ``hook_dict`` right after its output hook (firing order), or out of it."""
        ordered: dict[str, HookPoint] = {}
        for name, point in self.hook_dict.items():
            if name not in splice.points:
                ordered[name] = point
            if add and name == splice.out_name:
                ordered.update(splice.points)
        self.hook_dict = ordered
        if not add:
            self.aliases = {a: c for a, c in self.aliases.items() if c not in splice.points}

    @contextlib.contextmanager
    def saes(self, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
             exclude_special_tokens: bool | list[int] = False):
        """Attach ``saes`` (one SAE or a list) for the ``with`` block; at its end they are removed and the SAEs
        they displaced attached again, also when something raises."""
        saes = list(saes) if isinstance(saes, (list, tuple)) else [saes]
        restore: list[tuple[str, _Splice | None]] = []
        try:
            for sae in saes:
                name = self.resolve(sae_hook_names(sae)[0])
                restore.append((name, self._fxb_splices.get(name)))
                self.add_sae(sae, use_error_term=use_error_term, exclude_special_tokens=exclude_special_tokens)
            yield self
        finally:
            if reset_saes_end:
                for name, prev in reversed(restore):
                    if name in self._fxb_splices:
                        self._detach_sae(name)
                    if prev is not None:
                        self.add_sae(prev.sae, use_error_term=prev.use_error_term,
                                     exclude_special_tokens=prev.exclude if prev.exclude is not None else False)

    def run_with_saes(self, *args, saes: Any = (), reset_saes_end: bool = True, use_error_term: bool | None = None,
                      exclude_special_tokens: bool | list[int] = False, **kwargs):
        """Forward with ``saes`` attached for this call (HookedSAETransformer.run_with_saes)."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self(*args, **kwargs)

    def run_with_cache_with_saes(self, *args, saes: Any = (), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, exclude_special_tokens: bool | list[int] = False,
                                 **kwargs):
        """``run_with_cache`` with ``saes`` attached; the cache holds their ``<hook>.hook_sae_*`` points too."""
        with self.saes(saes, reset_saes_end, use_error_term, exclude_special_tokens):
            return self.run_with_cache(*args, **kwargs)

    def run_with_hooks_with_saes(self, *args, saes: Any = (), reset_saes_end: bool = True,
                                 exclude_special_tokens: bool | list[int] = False, fwd_hooks=(), bwd_hooks=(),
                                 reset_hooks_end: bool = True, clear_contexts: bool = False, **kwargs):
        """``run_with_hooks`` with ``saes`` attached; ``fwd_hooks`` may name their ``<hook>.hook_sae_*`` points."""
        with self.saes(saes, reset_saes_end, exclude_special_tokens=exclude_special_tokens):
            return self.run_with_hooks(*args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks,
                                       reset_hooks_end=reset_hooks_end, clear_contexts=clear_contexts, **kwargs)
