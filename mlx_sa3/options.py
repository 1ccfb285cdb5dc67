"""The official guidance and schedule options: their defaults, ranges and validation (pure functions).

Names and defaults are those of the official ``StableAudio3.generate`` / ``DiffusionTransformer.forward`` and the
official gradio (``stable_audio_3/interface/diffusion_cond.py``):

========================  =========  ==========================================================================
option                    default    meaning
========================  =========  ==========================================================================
``cfg_interval``          (0, 1)     guidance only at steps with ``lo <= t <= hi`` (0 <= lo <= hi <= 1)
``scale_phi``             0          CFG rescale towards the conditional prediction's per-frame std, in [0, 1]
``cfg_norm_threshold``    0          cap on the L2 norm of the guidance difference; 0 (or inf) = no cap
``apg_scale``             1          1 = adaptive projected guidance, 0 = plain CFG, in between a blend
``sigma_max``             1          starting noise level of the schedule, in (0, 1]
``duration_padding_sec``  6          seconds of headroom generated past the requested duration, >= 0
``dist_shift``            None       schedule shift; None = the checkpoint's ``sampling_distribution_shift_options``
========================  =========  ==========================================================================

Every validator returns the normalised value or raises :class:`OptionError` (a ValueError) with a one-line message
that names the library argument and the CLI flag, so the CLI can refuse bad values before loading a model.
"""

from __future__ import annotations

import inspect
import math
import operator

DEFAULT_CFG_INTERVAL = (0.0, 1.0)
DEFAULT_SCALE_PHI = 0.0
DEFAULT_CFG_NORM_THRESHOLD = 0.0
DEFAULT_APG_SCALE = 1.0
DEFAULT_SIGMA_MAX = 1.0
DEFAULT_DURATION_PADDING_SEC = 6.0
#: most variations of one request at once: beyond any machine's memory for one DiT batch (and [prompt] * 10**20
#: is an OverflowError); more is several calls
MAX_BATCH_SIZE = 1024
#: audio-to-audio: how far from the init audio the sampling starts (the official default)
DEFAULT_INIT_NOISE_LEVEL = 0.9

# The shift types of ``sampling_distribution_shift_options`` (official diffusion.py ``_create_dist_shift``) with the
# parameters the official gradio starts from for each ("LogSNR", "Flux", "Full", "None" in its dropdown). The
# checkpoints' default (no options in the config) is LogSNR with rate 0, the first entry.
DIST_SHIFT_DEFAULTS = {
    "logsnr": {"anchor_length": 2000, "anchor_logsnr": -6.2, "rate": 0.0, "logsnr_end": 2.0},
    "flux": {"min_length": 256, "max_length": 4096, "alpha_min": 6.93, "alpha_max": 6.93},
    "full": {"base_shift": 0.5, "max_shift": 1.15, "min_length": 256, "max_length": 4096},
    "none": {},
}
DIST_SHIFT_TYPES = tuple(DIST_SHIFT_DEFAULTS)
_INTEGER_PARAMS = ("anchor_length", "min_length", "max_length")


class OptionError(ValueError):
    """A generation option outside its official range."""


def check_batch_size(value) -> int:
    """A batch size: a whole number in 1..MAX_BATCH_SIZE."""
    size = whole_number(value, "batch size")
    if not 1 <= size <= MAX_BATCH_SIZE:
        raise ValueError(f"batch size must be 1..{MAX_BATCH_SIZE}, got {size}")
    return size


def at_least(value, low: int, what: str) -> int:
    """:func:`whole_number`, and at least ``low``."""
    number = whole_number(value, what)
    if number < low:
        raise ValueError(f"{what} must be at least {low}, got {number}")
    return number


def whole_number(value, what: str) -> int:
    """``value`` as an int: an integer (numpy's too) or a float without a fraction (as JSON may give); a ValueError
    naming ``what`` for anything else (2.7, "3", True), never a silent truncation."""
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            if isinstance(value, float) and value.is_integer():
                return int(value)
    raise ValueError(f"{what} must be an integer, got {value!r}")


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool", "bool_")  # numpy's bool too


def flag(value, what: str) -> bool:
    """``value`` as a bool: True or False (numpy's too); a ValueError for "no", None, 0 ..., which truthiness would
    read as on or off."""
    if _is_bool(value):
        return bool(value)
    raise ValueError(f"{what} must be True or False, got {value!r}")


def real_number(value, what: str) -> float:
    """``value`` as a float: any number (numpy's and 0-d arrays too, inf and NaN included: callers check ranges); a
    ValueError naming ``what`` for a bool, a string or anything else, never a silent True -> 1.0 or "2" -> 2.0."""
    if not isinstance(value, (str, bytes)) and not _is_bool(value):
        try:
            return float(value)
        except (TypeError, ValueError):
            pass
    raise ValueError(f"{what} must be a number, got {value!r}")


def _number(value, name: str, flag: str) -> float:
    try:
        number = real_number(value, f"{name} ({flag})")
    except ValueError as err:
        raise OptionError(str(err)) from None
    if math.isnan(number):
        raise OptionError(f"{name} ({flag}) must be a number, got nan")
    return number


def _from_text(text: str, name: str, flag: str) -> float:
    """A number in CLI text ("0.2" in "0.2,0.8"): the one place where a string is a number."""
    try:
        return float(text)
    except ValueError:
        raise OptionError(f"{name} ({flag}) must be a number, got {text!r}") from None


def _in_unit_interval(value, name: str, flag: str) -> float:
    number = _number(value, name, flag)
    if not 0.0 <= number <= 1.0:
        raise OptionError(f"{name} ({flag}) must be in [0, 1], got {number:g}")
    return number


def validate_cfg_interval(value=DEFAULT_CFG_INTERVAL) -> tuple[float, float]:
    """``(lo, hi)`` or the CLI text ``"LO,HI"``, with 0 <= lo <= hi <= 1."""
    if value is None:
        return DEFAULT_CFG_INTERVAL
    text = isinstance(value, str)
    parts = value.split(",") if text else value
    try:
        lo, hi = parts
    except (TypeError, ValueError):
        raise OptionError(f"cfg_interval (--cfg-interval) must be two numbers LO,HI, got {value!r}") from None
    if text:
        lo, hi = (_from_text(part, "cfg_interval", "--cfg-interval") for part in (lo, hi))
    lo = _number(lo, "cfg_interval", "--cfg-interval")
    hi = _number(hi, "cfg_interval", "--cfg-interval")
    if not 0.0 <= lo <= hi <= 1.0:
        raise OptionError(f"cfg_interval (--cfg-interval) must satisfy 0 <= lo <= hi <= 1, got {lo:g},{hi:g}")
    return lo, hi


def validate_scale_phi(value=DEFAULT_SCALE_PHI) -> float:
    """CFG rescale amount in [0, 1] (the gradio slider's range; 0 = off)."""
    return _in_unit_interval(DEFAULT_SCALE_PHI if value is None else value, "scale_phi", "--cfg-rescale")


def validate_cfg_norm_threshold(value=DEFAULT_CFG_NORM_THRESHOLD) -> float:
    """>= 0; 0 is the official "off" and inf is accepted as "no cap" too (both leave the guidance unchanged)."""
    number = _number(
        DEFAULT_CFG_NORM_THRESHOLD if value is None else value, "cfg_norm_threshold", "--cfg-norm-threshold"
    )
    if number < 0:
        raise OptionError(f"cfg_norm_threshold (--cfg-norm-threshold) must be >= 0 (0 = off), got {number:g}")
    return number


def validate_cfg_scale(value=None) -> float:
    """The guidance scale: any finite number (None: 1, guidance off). A NaN or infinite scale would only show as
    non-finite latents after the first step, so it is refused up front."""
    number = 1.0 if value is None else _number(value, "cfg_scale", "--cfg-scale")
    if not math.isfinite(number):
        raise OptionError(f"cfg_scale (--cfg-scale) must be a finite number, got {number:g}")
    return number


def validate_apg_scale(value=DEFAULT_APG_SCALE) -> float:
    """Blend between plain CFG (0) and adaptive projected guidance (1)."""
    return _in_unit_interval(DEFAULT_APG_SCALE if value is None else value, "apg_scale", "--apg-scale")


def validate_sigma_max(value=DEFAULT_SIGMA_MAX) -> float:
    """The schedule's starting noise level, in (0, 1] (as ``build_schedule``)."""
    number = _number(DEFAULT_SIGMA_MAX if value is None else value, "sigma_max", "--sigma-max")
    if not 0.0 < number <= 1.0:
        raise OptionError(f"sigma_max (--sigma-max) must be in (0, 1], got {number:g}")
    return number


def validate_duration_padding_sec(value=DEFAULT_DURATION_PADDING_SEC) -> float:
    """Headroom in seconds, finite and >= 0 (0 gives the official MLX runtime's canvas without headroom)."""
    number = _number(DEFAULT_DURATION_PADDING_SEC if value is None else value, "duration_padding_sec", "--headroom")
    if not (math.isfinite(number) and number >= 0):
        raise OptionError(f"duration_padding_sec (--headroom) must be a finite number of seconds >= 0, got {number:g}")
    return number


def headroom_latents(duration_padding_sec: float, sample_rate: int = 44100, downsampling_ratio: int = 4096) -> int:
    """Latent frames of headroom past the requested end, ``int(sec * sr / ratio)`` as the official padding mask."""
    return int(validate_duration_padding_sec(duration_padding_sec) * sample_rate / downsampling_ratio)


def validate_dist_shift(value=None) -> dict | None:
    """A schedule shift as ``mlx_sa3.sampling.build_schedule`` takes it (``{"type": ..., params}``), or None.

    Accepts None (the checkpoint's own shift), a dict in the ``sampling_distribution_shift_options`` format, a type
    name (``"logsnr"``, ``"flux"``, ``"full"``, ``"none"``; parameters from the official gradio defaults) or the CLI
    text ``"TYPE"`` / ``"TYPE:key=value,key=value"``. Unknown types or parameters and non-finite values are refused.
    """
    if value is None:
        return None
    if isinstance(value, str):
        kind, _, rest = value.partition(":")
        params = {}
        for item in filter(None, (p.strip() for p in rest.split(","))):
            key, sep, number = item.partition("=")
            if not sep:
                raise OptionError(f"dist_shift (--dist-shift) parameters are key=value, got {item!r}")
            params[key.strip()] = (
                number if key.strip() == "use_sine" else _from_text(number, f"dist_shift {key.strip()}", "--dist-shift")
            )
        kind = kind.strip().lower()
        value = {"type": kind, **DIST_SHIFT_DEFAULTS.get(kind, {}), **params}
    if not isinstance(value, dict):
        raise OptionError(f"dist_shift (--dist-shift) must be a shift type name or dict, got {type(value).__name__}")
    options = dict(value)
    kind = str(options.pop("type", "full")).lower()  # the official default type when the key is missing
    if kind not in DIST_SHIFT_TYPES:
        raise OptionError(f"dist_shift (--dist-shift) type must be one of {', '.join(DIST_SHIFT_TYPES)}, got {kind!r}")
    from .sampling import _SHIFTS

    accepted = [p for p in inspect.signature(_SHIFTS[kind]).parameters if p not in ("t", "seq_len")]
    out = {"type": kind}
    for key, raw in options.items():
        if key not in accepted:
            names = ", ".join(accepted) or "none"
            raise OptionError(f"dist_shift (--dist-shift) type {kind!r} has no parameter {key!r} (takes: {names})")
        if key == "use_sine":
            out[key] = raw if isinstance(raw, bool) else str(raw).lower() in ("1", "true", "yes")
            continue
        number = _number(raw, f"dist_shift {key}", "--dist-shift")
        if not math.isfinite(number):
            raise OptionError(f"dist_shift (--dist-shift) {key} must be finite, got {number:g}")
        if key in _INTEGER_PARAMS:
            if number < 1 or number != int(number):
                raise OptionError(f"dist_shift (--dist-shift) {key} must be a positive whole number, got {number:g}")
            number = int(number)
        out[key] = number
    if out.get("min_length", 1) > out.get("max_length", math.inf):
        raise OptionError(
            f"dist_shift (--dist-shift) needs min_length <= max_length, got {out['min_length']} > {out['max_length']}"
        )
    return out


def validate_guidance(
    cfg_interval=DEFAULT_CFG_INTERVAL,
    scale_phi=DEFAULT_SCALE_PHI,
    cfg_norm_threshold=DEFAULT_CFG_NORM_THRESHOLD,
    apg_scale=DEFAULT_APG_SCALE,
) -> dict:
    """All the guidance options at once, normalised, as keyword arguments of ``DiT.step``."""
    return {
        "cfg_interval": validate_cfg_interval(cfg_interval),
        "scale_phi": validate_scale_phi(scale_phi),
        "cfg_norm_threshold": validate_cfg_norm_threshold(cfg_norm_threshold),
        "apg_scale": validate_apg_scale(apg_scale),
    }


def validate_inpaint_regions(regions, source_seconds: float, duration: float) -> list:
    """The (start, end) pairs in seconds to regenerate; none given means continue the clip past its end.

    ``source_seconds`` is the length of the inpaint audio: with no regions the duration must extend it. The CLI and
    the job runner call this before a model loads, the pipeline when it generates.
    """
    if not regions:
        if duration <= source_seconds:
            raise ValueError(
                f"inpaint audio is {source_seconds:.2f} s and the duration {duration:g} s does not extend it: "
                "give inpaint regions (start, end) to regenerate, or a longer duration to continue the clip"
            )
        return [(source_seconds, duration)]
    out = []
    for region in regions:
        try:
            start, end = (real_number(v, "an inpaint region's start and end") for v in region)
        except (TypeError, ValueError):
            raise ValueError(f"an inpaint region is (start, end) in seconds, got {region!r}") from None
        if not (0 <= start < end):
            raise ValueError(f"inpaint region ({start:g}, {end:g}) must satisfy 0 <= start < end")
        if start >= duration or end > duration + 1e-9:
            raise ValueError(f"inpaint region ({start:g}, {end:g}) lies outside the {duration:g} s output")
        out.append((start, end))
    return out


__all__ = [
    "DEFAULT_APG_SCALE",
    "DEFAULT_CFG_INTERVAL",
    "DEFAULT_CFG_NORM_THRESHOLD",
    "DEFAULT_DURATION_PADDING_SEC",
    "DEFAULT_INIT_NOISE_LEVEL",
    "DEFAULT_SCALE_PHI",
    "DEFAULT_SIGMA_MAX",
    "MAX_BATCH_SIZE",
    "DIST_SHIFT_DEFAULTS",
    "DIST_SHIFT_TYPES",
    "OptionError",
    "headroom_latents",
    "validate_apg_scale",
    "validate_cfg_scale",
    "validate_cfg_interval",
    "validate_cfg_norm_threshold",
    "validate_dist_shift",
    "validate_duration_padding_sec",
    "validate_guidance",
    "validate_inpaint_regions",
    "validate_scale_phi",
    "validate_sigma_max",
    "at_least",
    "flag",
    "real_number",
    "whole_number",
]
