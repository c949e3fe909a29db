"""Load a causal LM for the command line: a hub id, a local checkpoint directory, or a ``config.json``.

- ``config.json`` (a file): the architecture only, random weights from a fixed seed, no download. Fast; this is
  what the tests and the demo use. ``meta=True`` builds it on the meta device (no memory for weights; tracing,
  inspecting and exporting work, running it does not).
- A directory with weights, or a hub id (``org/name``): real weights through ``AutoModelForCausalLM.from_pretrained``
  (a hub id needs network access or the local HF cache).

The config is read first and its architecture checked (``UnsupportedArchitecture``) before any weight is built,
loaded or downloaded. Failures raise ``ModelLoadError`` with one line naming the source and the reason; a bad
``device`` raises ``UsageError``.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path

import torch

from .errors import ModelLoadError, UsageError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}
DEVICE_TYPES = ("cpu", "cuda", "mps", "xpu", "meta")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.pth")


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def parse_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device`` that exists here; ``UsageError`` for a typo or a backend this torch lacks."""
    try:
        parsed = device if isinstance(device, torch.device) else torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        parsed = None
    if parsed is None or parsed.type not in DEVICE_TYPES:
        raise UsageError(f"unknown device {str(device)!r}; use cpu, cuda, cuda:N, mps or xpu")
    if parsed.type in ("cpu", "meta"):
        return parsed
    count = _device_count(parsed.type)
    if count == 0:
        raise UsageError(f"device {str(device)!r} is not available: this torch ({torch.__version__}) sees no "
                         f"{parsed.type} device; use --device cpu")
    if parsed.index is not None and parsed.index >= count:
        raise UsageError(f"device {str(device)!r} does not exist: this machine has {count} {parsed.type} "
                         f"device(s), {parsed.type}:0 to {parsed.type}:{count - 1}; or use --device cpu")
    return parsed


def _device_count(kind: str) -> int:
    if kind == "cuda":
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    if kind == "mps":
        return int(torch.backends.mps.is_available())
    backend = getattr(torch, kind, None)  # xpu
    return backend.device_count() if backend is not None and backend.is_available() else 0


def model_from_config(config, *, device: str | torch.device = "cpu", dtype=None, meta: bool = False,
                      seed: int = 0) -> torch.nn.Module:
    """A random-weight ``*ForCausalLM`` for an HF config object (fixed seed), in eval mode; on meta if ``meta``.

    Builds whatever the config describes: check it first (``fxbridge.architectures.get_spec(config)``)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    with torch.device("meta" if meta else device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32).eval()


def build_from_config(path: str | Path, seed: int = 0, device: str | torch.device = "cpu", dtype=torch.float32,
                      meta: bool = False):
    """A random-weight ``*ForCausalLM`` from a config.json (no download); on the meta device if ``meta``."""
    from .architectures import get_spec

    config = _read_config("config", str(path))
    get_spec(config)
    return _random_weights(config, str(path), device=parse_device(device), dtype=parse_dtype(dtype), meta=meta,
                           seed=seed, progress=False)


def read_config(source: str | Path, *, meta: bool = False):
    """The HF config of a model source (what ``load_model`` would load), without building or loading weights."""
    return _read_config(*_locate(source, meta))


def load_model(source: str | Path, *, device: str | torch.device = "cpu", dtype=None, meta: bool = False,
               seed: int = 0, config=None, progress: bool = False) -> torch.nn.Module:
    """A ``*ForCausalLM`` in eval mode from a config.json (random weights), a checkpoint directory or a hub id.

    ``config``: the source's config when the caller has already read it (``read_config``). ``progress=True``
    prints a line to stderr while random weights are built (HF prints its own bar when it loads weights).
    """
    from .architectures import get_spec

    device = parse_device(device)
    dtype = parse_dtype(dtype)
    kind, where = _locate(source, meta)
    if config is None:
        config = _read_config(kind, where)
    get_spec(config)  # UnsupportedArchitecture now, before a single weight is allocated or downloaded
    if kind == "config" or meta:
        return _random_weights(config, where, device=device, dtype=dtype, meta=meta, seed=seed, progress=progress)
    return _from_pretrained(where, config, device, dtype, hub=kind == "hub")


def _locate(source: str | Path, meta: bool) -> tuple[str, str]:
    """("config", path to a config.json) | ("checkpoint", directory) | ("hub", id); ModelLoadError if none fits."""
    text = str(source)
    path = Path(text).expanduser()
    if path.is_file():
        return "config", str(path)
    if path.is_dir():
        if meta and (path / "config.json").is_file():  # the structure is all a meta model needs
            return "config", str(path / "config.json")
        if not any(next(path.glob(p), None) for p in _WEIGHTS):
            if (path / "config.json").is_file():
                raise ModelLoadError(f"{text!r} has a config.json but no weights; pass {str(path / 'config.json')!r} "
                                     "for a random-weight model of that architecture")
            raise ModelLoadError(f"{text!r} is a directory with neither weights nor a config.json")
        return "checkpoint", text
    if _looks_like_path(text) or not _HUB_ID.match(text):
        raise ModelLoadError(f"no such file or directory: {text!r} (expected a config.json, a checkpoint "
                             "directory or a hub id like 'org/name')")
    return "hub", text


def _read_config(kind: str, where: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(where)
    except Exception as exc:  # JSON errors, unknown model_type, offline, ... : one line naming the source
        if kind == "config":
            raise ModelLoadError(f"cannot read a model config from {where!r}: {_first_line(exc)}") from exc
        raise ModelLoadError(f"could not load {where!r} {_FROM[kind]}: {_first_line(exc)}") from exc


_FROM = {"hub": "from the Hugging Face hub (offline, a typo, or a gated model?)", "checkpoint": "from the directory"}


def _random_weights(config, where: str, *, device, dtype, meta: bool, seed: int, progress: bool):
    from .pipeline import _progress_printer

    say = _progress_printer(progress)
    if say:
        layers = getattr(config, "num_hidden_layers", "?")
        say(f"building {config.model_type} ({layers} layers) with random weights on "
            f"{'the meta device' if meta else device} ...")
    try:
        model = model_from_config(config, device=device, dtype=dtype, meta=meta, seed=seed)
    except ValueError as exc:  # e.g. a config with no causal-LM class
        raise ModelLoadError(f"{where!r} does not describe a causal LM: {_first_line(exc)}") from exc
    if say:
        say(f"built {type(model).__name__}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters")
    return model


def _looks_like_path(text: str) -> bool:
    return text.startswith((".", "/", "~")) or text.endswith(".json") or "\\" in text or text.count("/") > 1


def _from_pretrained(source: str, config, device, dtype, hub: bool):
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype or "auto")
    except Exception as exc:  # OSError offline / 404, ValueError for non-causal-LM configs, ...
        raise ModelLoadError(f"could not load {source!r} {_FROM['hub' if hub else 'checkpoint']}: "
                             f"{_first_line(exc)}") from exc
    return model.to(device).eval()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")
