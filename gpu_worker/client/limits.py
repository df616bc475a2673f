"""Limits as people write them, checked once where they enter gpulab.

A size, a compute share, a GPU count or a burst flag arrives from a config trait, the command line, a
spawner profile, a tokens file or a REST body.  Each kind has one validator here that turns it into an
integer (burst: a bool) or raises :class:`LimitError`, whose text is a sentence naming the setting;
after that edge only checked values travel, so a bad value stops start-up or the request and never a
session.

Size grammar (docs/configuration.md, *Sizes*):

- an integer is bytes (``8589934592``); a float only when it is a whole number (``2**30 * 1.5``);
- a string is a number with a unit: ``B``, ``K``, ``M``, ``G`` or ``T``, each optionally followed by
  ``iB``/``B`` and case-insensitive (``8G``, ``512MiB``, ``1.5g``, ``100B``); units are binary
  (1K = 1024 bytes).  A bare numeric string (``"8"``) is refused: it is too often meant as 8 GiB;
- at least 1 byte and at most 1 PiB (2**50 bytes); no negatives, no inf or nan.
"""
from __future__ import annotations

import math
import re
from decimal import Decimal, InvalidOperation

from traitlets import TraitError, TraitType

MAX_SIZE = 1 << 50       # 1 PiB: far above any GPU, far below an int64 column
MAX_COUNT = 16           # GPUs one vGPU request may span (all on one worker)
MODES = ("local", "remote", "any")
QOS = ("low", "medium", "high")

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([KMGT])(?:I?B)?|B)\s*", re.IGNORECASE)
_NUMBER = re.compile(r"\s*[-+]?(\d+(?:\.\d*)?|\.\d+)\s*")
SIZE_HINT = "use a number with a unit, e.g. 8G or 512M"


class LimitError(ValueError):
    """A limit that is not one; ``str()`` is the sentence for the person who wrote it."""


def _shown(value) -> str:
    """The value as the person wrote it, cut short: a sentence must not echo a whole request body."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _whole(value) -> int | None:
    """An int from an int or a whole finite float (not bool); else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        return int(value)
    return None


def parse_size(value, setting: str = "size") -> int:
    """Bytes from a size as written in config, a profile, a tokens file or a request."""
    n = _whole(value)
    if n is None and isinstance(value, str):
        m = _SIZE.fullmatch(value)
        if m:
            try:
                n = int(Decimal(m.group(1)) * _UNITS[(m.group(2) or "").upper()])
            except InvalidOperation:  # pragma: no cover - the pattern admits only plain decimals
                n = None
        elif value.strip().startswith("-") and _SIZE.fullmatch(value.strip()[1:]):
            n = 0  # refused below, as a size that is not above zero
        elif _NUMBER.fullmatch(value) and not value.strip().startswith("-"):
            raise LimitError(f"{setting}: {_shown(value)} has no unit: {SIZE_HINT} "
                             f"(a bare number of bytes is written as an integer or with B, e.g. {value.strip()}B)")
    if n is None:
        raise LimitError(f"{setting}: {_shown(value)} is not a size: {SIZE_HINT}")
    if n < 1:
        raise LimitError(f"{setting}: {_shown(value)} is not a size above zero: {SIZE_HINT}")
    if n > MAX_SIZE:
        raise LimitError(f"{setting}: {_shown(value)} is larger than 1 PiB (1024T), the largest size gpulab "
                         "accepts")
    return n


def _small_whole(value, high: int, percent: bool = False) -> int | None:
    """A whole number 1..high, given as an integer or a short string (with "%" where ``percent``)."""
    n = _whole(value)
    if n is None and isinstance(value, str) and re.fullmatch(r"\s*\d{1,3}\s*%?\s*" if percent else r"\s*\d{1,3}\s*",
                                                            value):
        n = int(value.strip().rstrip("%"))
    return n if n is not None and 1 <= n <= high else None


def parse_share(value, setting: str = "compute") -> int:
    """A compute share: whole percent of one GPU, 1..100 (``25`` or ``"25%"``)."""
    n = _small_whole(value, 100, percent=True)
    if n is None:
        raise LimitError(f"{setting}: {_shown(value)} is not a compute share: use a whole percent of one GPU "
                         "from 1 to 100, e.g. 25")
    return n


def parse_count(value, setting: str = "count") -> int:
    """GPUs per vGPU request: a whole number 1..MAX_COUNT."""
    n = _small_whole(value, MAX_COUNT)
    if n is None:
        raise LimitError(f"{setting}: {_shown(value)} is not a GPU count: use a whole number from 1 to {MAX_COUNT}")
    return n


def _one_of(value, options: tuple[str, ...], setting: str) -> str:
    if not isinstance(value, str) or value not in options:
        raise LimitError(f"{setting}: {_shown(value)} is not one of {', '.join(options)}")
    return value


def parse_burst(value, setting: str = "burst") -> bool:
    """Whether a vGPU may use idle GPU time beyond its compute share: JSON true or false only (a string
    such as "no" would be truthy, so it is refused rather than guessed)."""
    if not isinstance(value, bool):
        raise LimitError(f"{setting}: {_shown(value)} is not true or false: burst says whether the vGPU may use "
                         "idle GPU time beyond its compute share")
    return value


def default_burst(qos: str) -> bool:
    """Bursting by QoS where a request does not say: high and medium vGPUs may use idle time, low do not."""
    return qos != "low"


GPU_DEFAULTS = {"compute": 100, "count": 1, "mode": "any", "qos": "medium"}  # burst: default_burst(qos)
_GPU_PARSERS = {"vram": parse_size, "compute": parse_share, "count": parse_count,
                "mode": lambda v, s: _one_of(v, MODES, s), "qos": lambda v, s: _one_of(v, QOS, s),
                "burst": parse_burst}
GPU_KEYS = frozenset(_GPU_PARSERS)


def gpu_settings(gpu: dict, where: str = "gpu", partial: bool = False) -> dict:
    """A vGPU request ``{vram, compute, count, mode, qos, burst}`` checked key by key; with defaults filled
    in unless ``partial`` (a profile choice that overrides some keys).  Other keys are left to the caller."""
    if not isinstance(gpu, dict):
        raise LimitError(f"{where or 'gpu'}: {_shown(gpu)} is not a mapping of GPU settings "
                         "(vram, compute, count, mode, qos, burst)")
    out = {}
    for key, parse in _GPU_PARSERS.items():
        if key in gpu:
            out[key] = parse(gpu[key], f"{where}.{key}" if where else key)
        elif not partial:
            if key == "vram":
                raise LimitError(f"{where + ': ' if where else ''}no GPU memory size (vram): {SIZE_HINT}")
            out[key] = default_burst(out["qos"]) if key == "burst" else GPU_DEFAULTS[key]
    return out


def token_limits(entry, where: str) -> dict:
    """A session token's limits (tokens trait, tokens file or the pool): ``{}``/null means the worker's
    defaults; ``vram`` a size and ``compute`` a share when present.  Other keys (the pool's allocation
    id, user) pass through untouched."""
    if entry is None:
        return {}
    if not isinstance(entry, dict):
        raise LimitError(f"{where}: {_shown(entry)} is not a mapping of limits, e.g. {{\"vram\": \"8G\"}}")
    out = dict(entry)
    if entry.get("vram") is not None:
        out["vram"] = parse_size(entry["vram"], f"{where}.vram")
    if entry.get("compute") is not None:
        out["compute"] = parse_share(entry["compute"], f"{where}.compute")
    return out


class Size(TraitType):
    """Bytes, written as a size ('8G', '512M' or an int), like JupyterHub's ByteSpecification; checked
    when the config is loaded, so a bad value stops start-up with a sentence naming the setting.
    With ``allow_none``, '' (an empty command-line option) is None."""

    info_text = "a size with a unit, e.g. 8G or 512M"

    def validate(self, obj, value):
        if self.allow_none and (value is None or value == ""):
            return None
        try:
            return parse_size(value, f"c.{type(obj).__name__}.{self.name}")
        except LimitError as exc:
            raise TraitError(str(exc)) from None

    def from_string(self, s):
        return s  # validate() parses, with the setting's name in the sentence
