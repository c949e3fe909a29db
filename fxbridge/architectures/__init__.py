"""Architecture specs, keyed by HF ``config.model_type``. This file is the one place a family is registered."""
from __future__ import annotations

from ..errors import UnsupportedArchitecture
from . import (alibi, bigcode, dbrx, diffattn, falcon, fused_mlp, gemma, gemma4, gpt2, layernorm_bias, learned_pos, llama,
               llama4, mla, moe, parallel, postnorm, sinks)
from .spec import ArchSpec, dims_from_config

_ALL: tuple[ArchSpec, ...] = (*llama.SPECS, *gpt2.SPECS, *gemma.SPECS, *gemma4.SPECS, *bigcode.SPECS, *falcon.SPECS,
                              *parallel.SPECS, *fused_mlp.SPECS, *layernorm_bias.SPECS, *learned_pos.SPECS,
                              *alibi.SPECS, *postnorm.SPECS,
                              *moe.SPECS,
                              *mla.SPECS,
                              *sinks.SPECS,
                              *diffattn.SPECS,
                              *llama4.SPECS,
                              *dbrx.SPECS)
# Every spec fxbridge has. Those whose ``requires`` the installed transformers lacks are left out of
# supported_architectures() and refused by get_spec (checked at each call, not frozen at import).
REGISTRY: dict[str, ArchSpec] = {t: spec for spec in _ALL for t in spec.model_types}


def missing_from_transformers(spec: ArchSpec) -> tuple[str, ...]:
    """The names in ``spec.requires`` that the installed transformers does not export."""
    import transformers
    return tuple(name for name in spec.requires if not _exports(transformers, name))


def _exports(module, name: str) -> bool:
    try:
        return getattr(module, name, None) is not None
    except Exception:  # transformers' lazy import of the name failed: as good as absent
        return False


def supported_architectures() -> list[str]:
    """The HF model types fxbridge can trace with the installed transformers."""
    return sorted(t for t, spec in REGISTRY.items() if not missing_from_transformers(spec))


def get_spec(model_or_config) -> ArchSpec:
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    spec = REGISTRY.get(model_type)
    missing = missing_from_transformers(spec) if spec is not None else ()
    if spec is None and not missing:
        spec = _spec_of_class(model_or_config, config, model_type)
        if spec is not None:
            return spec.for_config(config)
    if spec is None or missing:
        import transformers
        raise UnsupportedArchitecture(str(model_type), supported_architectures(), family=spec and spec.family,
                                      missing=missing, transformers_version=transformers.__version__)
    return spec.for_config(config)


def infer_spec(model) -> ArchSpec:
    """An ArchSpec inferred from ``model``'s module tree and captured graph (see infer.py); not yet verified --
    ``fxbridge.trace(model, spec=infer_spec(model))`` verifies it against the model before using it."""
    from .infer import infer_spec as infer
    return infer(model)


def _spec_of_class(model_or_config, config, model_type) -> ArchSpec | None:
    """Route 1 for an unregistered model_type: the registered spec whose causal-LM class the model is (EXAONE and
    InternLM3 checkpoints load as LlamaForCausalLM), with an InferredSpecWarning. Spec inference (route 2, which
    needs the model) is ``trace``'s, see infer.py."""
    import warnings

    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as names
    if model_or_config is config:  # a config: the class transformers builds for its model_type
        cls = _exports(transformers, names.get(model_type) or "") and getattr(transformers, names[model_type])
    else:
        cls = type(model_or_config)
    for spec in REGISTRY.values():
        name = names.get(spec.model_type)
        if cls and name == cls.__name__ and _exports(transformers, name) and getattr(transformers, name) is cls \
                and not missing_from_transformers(spec):
            from ..errors import InferredSpecWarning
            warnings.warn(InferredSpecWarning(
                f"fxbridge has no spec for model_type={model_type!r}; its class {name} is {spec.family}'s "
                f"(model_type {spec.model_type!r}): using the {spec.family} spec"), stacklevel=3)
            return spec
    return None


__all__ = ["ArchSpec", "REGISTRY", "dims_from_config", "get_spec", "infer_spec", "missing_from_transformers",
           "supported_architectures"]
