"""Sampling settings: the reference's defaults (the one place they are written), their validation,
and how a checkpoint's ``generation_config.json`` maps onto them.

Pure Python (no MLX), so the command line can show the defaults in ``--help`` and reject a bad
value before it imports or loads the model.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Optional

from .errors import DGemmaError

# The reference's defaults (transformers' DiffusionGemmaGenerationConfig), in the form of a
# ``generation_config.json``: written by ``dgemma convert`` for sources without one.
REFERENCE_GENERATION_CONFIG: dict[str, Any] = {
    "max_denoising_steps": 48,
    "t_max": 0.8,
    "t_min": 0.4,
    "sampler_config": {"_cls_name": "EntropyBoundSamplerConfig", "entropy_bound": 0.1},
    "stability_threshold": 1,
    "confidence_threshold": 0.005,
    "max_new_tokens": 256,
}
_CONFIG_NAMES = {  # generation_config.json key -> GenerationSettings field
    "max_new_tokens": "max_new_tokens",
    "max_denoising_steps": "steps",
    "t_min": "t_min",
    "t_max": "t_max",
    "stability_threshold": "stability_threshold",
    "confidence_threshold": "confidence_threshold",
}

RANDOM_SEED = -1
"""The seed value that asks for a random seed (as in llama.cpp)."""
SEED_LIMIT = 2**64
"""Seeds are ``0 <= seed < SEED_LIMIT``: ``mx.random.key`` takes an unsigned 64-bit integer."""


class SettingError(DGemmaError):
    """A bad value for one sampling setting; ``field`` names it."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, str):
        value = value.strip()
    if isinstance(value, bool):
        raise SettingError(name, f"bad value for {name}: {value!r} (expected an integer)")
    if isinstance(value, float):
        if not value.is_integer():
            raise SettingError(name, f"bad value for {name}: {value!r} (expected an integer)")
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        raise SettingError(name, f"bad value for {name}: {value!r} (expected an integer)")


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool):
        raise SettingError(name, f"bad value for {name}: {value!r} (expected a number)")
    try:
        number = float(value.strip() if isinstance(value, str) else value)
    except (TypeError, ValueError, OverflowError):
        raise SettingError(name, f"bad value for {name}: {value!r} (expected a number)")
    if not math.isfinite(number):
        raise SettingError(name, f"bad value for {name}: {value!r} (expected a finite number)")
    return number


def _as_bool(name: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise SettingError(name, f"bad value for {name}: {value!r} (expected true or false)")


def _as_seed(value: Any) -> Optional[int]:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null", "random")):
        return None
    seed = _as_int("seed", value)
    if seed == RANDOM_SEED:
        return None
    if not 0 <= seed < SEED_LIMIT:
        raise SettingError("seed", f"seed must be -1 (random) or 0 <= seed < 2**64 (got {seed})")
    return seed


# Opt-in sampling presets (``--preset``): overrides applied before the user's own flags. The
# default stays the reference's sampler. Fewer passes per block is the largest speed lever; what
# each preset costs in quality is measured on the bundled models (README, "Sampling presets").
PRESETS: dict[str, dict[str, Any]] = {
    "reference": {},
    "fast": {"steps": 16},
    "faster": {"steps": 8},
}


@dataclass(frozen=True)
class GenerationSettings:
    """Sampling settings, checked when made. Defaults are the reference's; a checkpoint's
    ``generation_config.json`` overrides them (:meth:`from_generation_config`) and the caller
    overrides both (:meth:`update`).

    Attributes:
        max_new_tokens: tokens to generate at most.
        steps: maximum denoising passes per block.
        entropy_bound: entropy budget of the positions accepted per pass.
        t_min, t_max: the temperature falls linearly from ``t_max`` (first pass) to ``t_min``
            (last pass); ``t_min < t_max``, as the reference requires.
        temp: a constant temperature instead (None: the falling schedule); when set, ``t_min``
            and ``t_max`` both equal it.
        stability_threshold, confidence_threshold: the stable-and-confident stopping criterion.
        seed: None for a random seed (``-1`` is accepted and means the same), else
            ``0 <= seed < 2**64``.
        freeze_accepted: opt-in fast sampling (not the reference's): a position accepted once
            keeps its token for the rest of the block, like a pinned one; the model's LM head and
            the sampler then run on the remaining positions only, and with an EOS frozen, the free
            positions after it are frozen to EOS (the EOS-filled tail the model was trained on).
        top_k: opt-in fast sampling (not the reference's): the sampler's softmax, draws and
            entropies, and the next pass's self-conditioning, use each position's ``top_k``
            largest logits only (None: the whole vocabulary, as the reference does).
        short_canvas: opt-in fast sampling (not the reference's): when fewer tokens than a canvas
            remain to be generated (``max_new_tokens`` below the canvas length, or not a multiple
            of it), the last block's canvas holds only those positions instead of a whole canvas
            whose tail is cut off afterwards; its passes compute that many positions.
    """

    max_new_tokens: int = REFERENCE_GENERATION_CONFIG["max_new_tokens"]
    steps: int = REFERENCE_GENERATION_CONFIG["max_denoising_steps"]
    entropy_bound: float = REFERENCE_GENERATION_CONFIG["sampler_config"]["entropy_bound"]
    t_min: float = REFERENCE_GENERATION_CONFIG["t_min"]
    t_max: float = REFERENCE_GENERATION_CONFIG["t_max"]
    stability_threshold: int = REFERENCE_GENERATION_CONFIG["stability_threshold"]
    confidence_threshold: float = REFERENCE_GENERATION_CONFIG["confidence_threshold"]
    seed: Optional[int] = None
    temp: Optional[float] = None
    freeze_accepted: bool = False
    top_k: Optional[int] = None
    short_canvas: bool = False

    def __post_init__(self) -> None:
        for name in ("max_new_tokens", "steps", "stability_threshold"):
            object.__setattr__(self, name, _as_int(name, getattr(self, name)))
        for name in ("entropy_bound", "t_min", "t_max", "confidence_threshold"):
            object.__setattr__(self, name, _as_float(name, getattr(self, name)))
        object.__setattr__(self, "seed", _as_seed(self.seed))
        object.__setattr__(self, "freeze_accepted", _as_bool("freeze_accepted", self.freeze_accepted))
        object.__setattr__(self, "short_canvas", _as_bool("short_canvas", self.short_canvas))
        if self.top_k is not None:
            object.__setattr__(self, "top_k", _as_int("top_k", self.top_k))
        if self.temp is not None:
            temp = _as_float("temp", self.temp)
            for name in ("temp", "t_min", "t_max"):
                object.__setattr__(self, name, temp)
        self.validate()

    @classmethod
    def from_generation_config(cls, config: Optional[dict[str, Any]]) -> "GenerationSettings":
        """Settings from a ``generation_config.json`` (missing or null entries keep the defaults)."""
        config = config or {}
        found = {dst: config[src] for src, dst in _CONFIG_NAMES.items() if config.get(src) is not None}
        sampler = config.get("sampler_config")
        if isinstance(sampler, dict) and sampler.get("entropy_bound") is not None:
            found["entropy_bound"] = sampler["entropy_bound"]
        return cls().update(**found)

    def update(self, **overrides: Any) -> "GenerationSettings":
        """A copy with the non-None ``overrides`` applied and checked. Values may be strings
        (``steps="16"``). Setting ``t_min`` or ``t_max`` ends a constant ``temp``. Raises
        :class:`SettingError` naming the first bad setting."""
        known = {f.name for f in fields(self)}
        for name in overrides:
            if name not in known:
                raise SettingError(name, f"unknown generation setting '{name}' (settings: {', '.join(sorted(known))})")
        values = {k: v for k, v in overrides.items() if v is not None}
        if "t_min" in values or "t_max" in values:
            if "temp" in values:
                raise SettingError("temp", "give either temp (a constant temperature) or t-min/t-max, not both")
            values["temp"] = None
        return replace(self, **values)

    def validate(self) -> None:
        """Raise :class:`SettingError` when a value is out of range."""
        if self.steps <= 0:
            raise SettingError("steps", f"steps must be at least 1 (got {self.steps})")
        if self.max_new_tokens <= 0:
            raise SettingError("max_new_tokens", f"max-tokens must be at least 1 (got {self.max_new_tokens})")
        if self.top_k is not None and self.top_k < 1:
            raise SettingError("top_k", f"top-k must be at least 1 (got {self.top_k})")
        if self.entropy_bound <= 0:
            raise SettingError("entropy_bound", f"entropy-bound must be positive (got {self.entropy_bound})")
        if self.temp is not None and self.temp <= 0:  # the schedule never reaches t_min; temp is every pass
            raise SettingError("temp", f"temp must be positive (got {self.temp}); the sampler has no greedy mode, but a low --temp comes close")
        if self.temp is None and (self.t_min < 0 or self.t_max <= self.t_min):
            raise SettingError(
                "t_min",
                f"temperatures need 0 <= t-min < t-max (got t-min {self.t_min}, t-max {self.t_max}); "
                "for a constant temperature set temp",
            )
        if self.stability_threshold < 0:
            raise SettingError(
                "stability_threshold", f"stability-threshold must be >= 0 (got {self.stability_threshold})"
            )
        if self.confidence_threshold <= 0:
            raise SettingError(
                "confidence_threshold", f"confidence-threshold must be positive (got {self.confidence_threshold})"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULTS = GenerationSettings()
"""The reference's settings (what a checkpoint without ``generation_config.json`` gets)."""
