"""Load a causal LM for the command line: a hub id, a local checkpoint directory, or a ``config.json``.

- ``config.json`` (a file): the architecture only, random weights from a fixed seed, no download. Fast; this is
  what the tests and the demo use. ``meta=True`` builds it on the meta device (no memory for weights; tracing,
  inspecting and exporting work, running it does not).
- A directory with weights, or a hub id (``org/name``): real weights through ``AutoModelForCausalLM.from_pretrained``
  (a hub id needs network access or the local HF cache).

Failures raise ``ModelLoadError`` with one line naming the source and the reason.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .errors import ModelLoadError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def model_from_config(config, *, device: str | torch.device = "cpu", dtype=None, meta: bool = False,
                      seed: int = 0) -> torch.nn.Module:
    """A random-weight ``*ForCausalLM`` for an HF config object (fixed seed), in eval mode; on meta if ``meta``."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta" if meta else device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32).eval()


def build_from_config(path: str | Path, seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32,
                      meta: bool = False):
    """A random-weight ``*ForCausalLM`` from a config.json (no download); on the meta device if ``meta``."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path))
    except Exception as exc:  # JSON errors, unknown model_type, ... : one line naming the file
        raise ModelLoadError(f"cannot read a model config from {str(path)!r}: {_first_line(exc)}") from exc
    try:
        return model_from_config(config, device=device, dtype=dtype, meta=meta, seed=seed)
    except ValueError as exc:  # e.g. a config with no causal-LM class
        raise ModelLoadError(f"{str(path)!r} does not describe a causal LM: {_first_line(exc)}") from exc


def load_model(source: str | Path, *, device: str | torch.device = "cpu", dtype=None, meta: bool = False,
               seed: int = 0) -> torch.nn.Module:
    """A ``*ForCausalLM`` in eval mode from a config.json (random weights), a checkpoint directory or a hub id."""
    dtype = parse_dtype(dtype)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return build_from_config(path, seed=seed, device=device, dtype=dtype, meta=meta)
    if path.is_dir():
        if meta and (path / "config.json").is_file():  # the structure is all a meta model needs
            return build_from_config(path / "config.json", seed=seed, dtype=dtype, meta=True)
        if not any(next(path.glob(p), None) for p in _WEIGHTS):
            if (path / "config.json").is_file():
                raise ModelLoadError(f"{text!r} has a config.json but no weights; pass {str(path / 'config.json')!r} "
                                     "for a random-weight model of that architecture")
            raise ModelLoadError(f"{text!r} is a directory with neither weights nor a config.json")
        return _from_pretrained(text, device, dtype, hub=False)
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelLoadError(f"no such file or directory: {text!r} (expected a config.json, a checkpoint "
                             "directory or a hub id like 'org/name')")
    if meta:
        return _meta_from_hub(text, dtype)
    return _from_pretrained(text, device, dtype, hub=True)


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".json") or "\\" in text or text.count("/") > 1


def _from_pretrained(source: str, device, dtype, hub: bool):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype or "auto")
    except Exception as exc:  # OSError offline / 404, ValueError for non-causal-LM configs, ...
        where = "from the Hugging Face hub (offline, a typo, or a gated model?)" if hub else "from the directory"
        raise ModelLoadError(f"could not load {source!r} {where}: {_first_line(exc)}") from exc
    return model.to(device).eval()


def _meta_from_hub(source: str, dtype):
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source)
    except Exception as exc:
        raise ModelLoadError(f"could not load the config of {source!r} from the Hugging Face hub "
                             f"(offline or a typo?): {_first_line(exc)}") from exc
    return model_from_config(config, dtype=dtype, meta=True)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
