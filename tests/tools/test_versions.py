"""Version bounds: the lowest declared versions are the ones `make test-lowest` installs, and a family newer than
the installed transformers is neither listed nor traced (UnsupportedArchitecture says what transformers lacks)."""
import os
import re
import sys
import tomllib
import types
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import pytest
import transformers as tf
from packaging.requirements import Requirement
from packaging.version import Version

import fxbridge as bridge
from fxbridge.architectures import REGISTRY, get_spec, missing_from_transformers
from tiny import build, missing_config_class

ROOT = Path(__file__).resolve().parents[2]
needs_checkout = pytest.mark.skipif(not (ROOT / "pyproject.toml").exists(), reason="needs the source checkout")


def _pins(path: Path) -> dict[str, Requirement]:
    lines = (line.split("#")[0].strip() for line in path.read_text().splitlines())
    return {req.name.lower(): req for req in map(Requirement, filter(None, lines))}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


@needs_checkout
def test_lowest_constraints_pin_exactly_the_declared_lower_bounds():
    project = _project()
    declared = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    lowest = {req.name.lower(): next(s.version for s in req.specifier if s.operator == ">=") for req in declared}
    pins = _pins(ROOT / "constraints-lowest.txt")
    assert sorted(pins) == sorted(lowest)
    for name, req in pins.items():
        (spec,) = req.specifier
        assert spec.operator == "==" and Version(spec.version) == Version(lowest[name]), (name, str(req), lowest[name])


@needs_checkout
def test_make_test_lowest_uses_the_lowest_declared_python():
    floor = re.fullmatch(r">=\s*(\d+\.\d+)", _project()["requires-python"]).group(1)
    make = re.search(r"^PYTHON_LOWEST \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert make == f"python{floor}"
    assert sys.version_info >= tuple(map(int, floor.split(".")))


@pytest.mark.skipif("FXBRIDGE_CONSTRAINTS" not in os.environ, reason="only under `make test` / `make test-lowest`")
def test_the_installed_versions_are_the_constrained_ones():
    """`make test-lowest` really runs on the pinned lowest versions (and `make test` on torch < 2.14)."""
    for name, req in _pins(ROOT / os.environ["FXBRIDGE_CONSTRAINTS"]).items():
        try:
            installed = version(name)
        except PackageNotFoundError:
            pytest.fail(f"{name} is constrained but not installed")
        assert req.specifier.contains(installed, prereleases=True), f"{name} {installed} does not satisfy {req}"


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
