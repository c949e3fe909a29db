"""ActivationCache: name -> tensor, with TransformerLens's shorthand keys (``cache["pattern", 3]``)."""
from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

from ..errors import unknown_hook_error
from .names import get_act_name

class ActivationCache(Mapping):
    """Activations from ``run_with_cache``, one entry per hook point; read-only mapping."""

    def __init__(self, cache_dict: dict[str, torch.Tensor], n_layers: int, has_batch_dim: bool = True,
                 aliases: dict[str, str] | None = None, model=None):
        self.cache_dict = cache_dict
        self.model = model  # the traced module (weights and cfg for the analysis methods); None for a bare cache
        self.n_layers = n_layers
        self.has_batch_dim = has_batch_dim
        self.aliases = dict(aliases or {})  # TransformerBridge-style alias -> canonical name (as gm.resolve)

    def _key(self, key) -> str:
        if isinstance(key, str):
            return key if key in self.cache_dict else self.aliases.get(key, key)
        if isinstance(key, tuple) and 1 <= len(key) <= 3:
            name, layer, *rest = (*key, None) if len(key) == 1 else key
            if isinstance(layer, int) and layer < 0:
                layer += self.n_layers
            return get_act_name(name, layer, rest[0] if rest else None)
        raise TypeError(f"cache keys are hook names or (name, layer[, layer_type]) tuples, got {key!r}")

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        try:
            return self.cache_dict[name]
        except KeyError:
            raise unknown_hook_error(name, self.cache_dict) from None

    def __contains__(self, key) -> bool:
        try:
            return self._key(key) in self.cache_dict
        except TypeError:
            return False

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def __len__(self) -> int:
        return len(self.cache_dict)

    def to(self, device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.cache_dict.items()}, self.n_layers, self.has_batch_dim,
                               self.aliases, self.model)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for value in self.cache_dict.values():
            if value.shape[0] != 1:
                raise ValueError(f"remove_batch_dim needs batch size 1, got {value.shape[0]}")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.n_layers, False, self.aliases, self.model)

    def stack_activation(self, name: str) -> torch.Tensor:
        """One activation across layers, stacked on a new leading dim: ``stack_activation("resid_post")``."""
        return torch.stack([self[name, layer] for layer in range(self.n_layers) if (name, layer) in self])

    def __repr__(self) -> str:
        return f"ActivationCache with {len(self)} entries: {list(self.cache_dict)[:8]}{'...' if len(self) > 8 else ''}"
