"""Architecture specs, keyed by HF ``config.model_type``. This file is the one place a family is registered."""
from __future__ import annotations

from ..errors import UnsupportedArchitecture
from . import gemma, gemma4, gpt2, llama, bigcode, falcon
from .spec import ArchSpec, dims_from_config

_ALL: tuple[ArchSpec, ...] = (*llama.SPECS, *gpt2.SPECS, *gemma.SPECS, *gemma4.SPECS, *bigcode.SPECS, *falcon.SPECS)
REGISTRY: dict[str, ArchSpec] = {t: spec for spec in _ALL for t in spec.model_types}


def supported_architectures() -> list[str]:
    """The HF model types fxbridge can trace."""
    return sorted(REGISTRY)


def get_spec(model_or_config) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in REGISTRY:
        raise UnsupportedArchitecture(str(model_type), REGISTRY)
    return REGISTRY[model_type].for_config(config)


__all__ = ["ArchSpec", "REGISTRY", "dims_from_config", "get_spec", "supported_architectures"]
