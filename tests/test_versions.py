"""A family newer than the installed transformers is neither listed nor traced (UnsupportedArchitecture says what
transformers lacks)."""
import sys
import types

import pytest
import transformers as tf

import fxbridge as bridge
from fxbridge.architectures import REGISTRY, get_spec, missing_from_transformers
from tiny import build, missing_config_class


def test_a_family_is_listed_exactly_where_transformers_has_what_it_requires():
    listed = set(bridge.supported_architectures())
    for model_type, spec in REGISTRY.items():
        assert (model_type in listed) == all(hasattr(tf, name) for name in spec.requires), model_type
    assert REGISTRY["gemma4_text"].requires == ("Gemma4TextConfig",)
    assert ("gemma4_text" in listed) == (missing_config_class("gemma4_text") is None)


class _TransformersWithout(types.ModuleType):
    """The transformers module with some names missing, as on a release older than the family."""

    def __init__(self, real, hidden):
        super().__init__(real.__name__)
        self._real, self._hidden = real, set(hidden)

    def __getattr__(self, name):
        if name in self._hidden:
            raise AttributeError(f"module 'transformers' has no attribute {name!r}")
        return getattr(self._real, name)


def _gemma4_model():
    """A gemma4_text model: a real one where this transformers has Gemma 4, else a Llama that reports that type."""
    if missing_config_class("gemma4_text") is None:
        return build("gemma4_text")
    model = build("llama")
    model.config.model_type = "gemma4_text"
    return model


def test_without_the_config_class_the_family_is_not_listed_and_trace_says_why(monkeypatch):
    model = _gemma4_model()
    monkeypatch.setitem(sys.modules, "transformers", _TransformersWithout(tf, {"Gemma4TextConfig"}))
    assert missing_from_transformers(REGISTRY["gemma4_text"]) == ("Gemma4TextConfig",)
    listed = bridge.supported_architectures()
    assert "gemma4_text" not in listed and {"gemma3_text", "llama", "falcon"} <= set(listed)
    with pytest.raises(bridge.UnsupportedArchitecture) as info:
        bridge.trace(model)
    err = info.value
    assert err.model_type == "gemma4_text" and err.missing == ("Gemma4TextConfig",)
    assert "gemma4_text" not in err.supported
    msg = str(err)
    assert f"installed transformers {tf.__version__} lacks Gemma4TextConfig" in msg and "upgrade transformers" in msg
    assert "Gemma 4 (text)" in msg and "gemma3_text" in msg
    monkeypatch.undo()
    if missing_config_class("gemma4_text") is None:  # the real module again: listed, and the spec is found
        assert "gemma4_text" in bridge.supported_architectures()
        assert get_spec(model).model_type == "gemma4_text"
