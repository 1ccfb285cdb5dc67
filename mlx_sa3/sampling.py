"""Timestep schedules and the rectified-flow samplers of Stable Audio 3.

Conventions (official ``stable_audio_3/inference``): t = 1 is pure noise, t = 0 is data, the model predicts the
velocity v and the denoised estimate is ``x0 = x - t * v``. Samplers are generators that yield after every step,
so progress bars, cancellation and streaming need no extra machinery.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

SAMPLERS = ("pingpong", "euler", "dpmpp")


class NonFiniteError(FloatingPointError):
    """Sampling produced NaN or infinite latents."""


# ---------------------------------------------------------------------------------------------------------------
# Schedules


def logsnr_shift(t: np.ndarray, seq_len: int, anchor_length=2000, anchor_logsnr=-6.2, rate=1.0, logsnr_end=2.0):
    """Space ``t`` uniformly in log-SNR between logsnr_end and a length-dependent start (endpoints kept exact)."""
    start = anchor_logsnr - rate * math.log2(seq_len / anchor_length)
    logsnr = logsnr_end - t * (logsnr_end - start)
    out = 1.0 / (1.0 + np.exp(logsnr))  # sigmoid(-logsnr)
    return np.where(t <= 0, 0.0, np.where(t >= 1, 1.0, out))


def full_shift(
    t: np.ndarray, seq_len: int, base_shift=0.5, max_shift=1.15, max_length=4096, min_length=256, use_sine=False
):
    """The training-time "full" shift: a length-dependent logistic warp of t."""
    seq_len = min(max(seq_len, min_length), max_length)
    mu = -(base_shift + (max_shift - base_shift) * (seq_len - min_length) / (max_length - min_length))
    with np.errstate(divide="ignore"):
        out = 1 - math.exp(mu) / (math.exp(mu) + (1 / (1 - t) - 1))
    return np.sin(out * math.pi / 2) if use_sine else out


def flux_shift(t: np.ndarray, seq_len: int, min_length=256, max_length=4096, alpha_min=1.0, alpha_max=1.0):
    """Flux/SD3 shift ``a t / (1 + (a - 1) t)`` with a interpolated log-linearly in the sequence length."""
    log_min, log_max = math.log(min_length), math.log(max_length)
    if log_max == log_min:
        log_max += 1e-8
    frac = (math.log(min(max(seq_len, min_length), max_length)) - log_min) / (log_max - log_min)
    alpha = math.exp(
        math.log(max(alpha_min, 1e-8)) + frac * (math.log(max(alpha_max, 1e-8)) - math.log(max(alpha_min, 1e-8)))
    )
    return alpha * t / (1 + (alpha - 1.0) * t)


# The official default when the config has no `sampling_distribution_shift_options`: a length-independent
# log-SNR spacing (rate 0).
DEFAULT_SHIFT = {"type": "logsnr", "rate": 0.0, "anchor_logsnr": -6.2, "logsnr_end": 2.0}
_SHIFTS = {"logsnr": logsnr_shift, "full": full_shift, "flux": flux_shift, "none": lambda t, seq_len: t}


def build_schedule(steps: int, sigma_max: float = 1.0, seq_len: int = 1, shift: dict | None = None) -> np.ndarray:
    """``steps + 1`` noise levels from ``sigma_max`` down to 0, as the official ``build_schedule``.

    The shift is applied to ``linspace(sigma_max, 0)`` and then only the first value is reset to ``sigma_max``. For
    sigma_max < 1 the second value can therefore lie *above* sigma_max; the official code does this and the
    checkpoints were tuned with it, so it is reproduced on purpose.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    if not 0.0 < sigma_max <= 1.0:
        raise ValueError(f"sigma_max (init noise level) must be in (0, 1], got {sigma_max}")
    options = dict(DEFAULT_SHIFT if shift is None else shift)
    kind = options.pop("type", "full")
    if kind not in _SHIFTS:
        raise ValueError(f"unknown distribution shift type {kind!r}")
    # float32 linspace as torch builds it, the warp in float64, the result rounded back to float32
    t = np.linspace(sigma_max, 0, steps + 1, dtype=np.float32).astype(np.float64)
    t = np.asarray(_SHIFTS[kind](t, max(int(seq_len), 1), **options), dtype=np.float64)
    t[0] = sigma_max
    return t.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Samplers


@dataclass
class Step:
    """One finished sampling step: ``x`` is the latent after step ``index`` (0-based) of ``total``."""

    index: int
    total: int
    t: float
    x: mx.array
    denoised: mx.array


Velocity = Callable[[mx.array, float], mx.array]
NoiseFn = Callable[[int, tuple], mx.array]


def gaussian_noise(key: mx.array) -> NoiseFn:
    """Fresh N(0, 1) noise per step, reproducible from ``key`` (used by the ping-pong sampler)."""

    def draw(index: int, shape: tuple) -> mx.array:
        return mx.random.normal(shape, key=mx.random.split(key, index + 1)[index])

    return draw


def euler_update(x, v, t, t_next):
    return x + (t_next - t) * v


def pingpong_update(denoised, t_next, eps):
    """Jump to the denoised estimate and re-noise to the next level with fresh noise."""
    return (1 - t_next) * denoised + t_next * eps


def dpmpp_update(x, denoised, t, t_next, t_prev=None, old_denoised=None):
    """DPM-Solver++(2M) for rectified flow; first order on the first step and when ``t_next == 0``."""
    coeff = (t_next - t) / (max(1 - t_next, 1e-10) * max(t, 1e-10))
    target = denoised
    if old_denoised is not None and t_next != 0:
        h = _lambda(t_next) - _lambda(t)
        h_last = _lambda(t) - _lambda(t_prev)
        r = h_last / h
        target = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
    return (t_next / max(t, 1e-10)) * x - (1 - t_next) * coeff * target


def _lambda(t: float) -> float:
    """log-SNR of rectified flow, log((1 - t) / t), clamped as the official code does."""
    return math.log(max(1 - t, 1e-10) / max(t, 1e-10))


def sample_iter(
    velocity: Velocity, x: mx.array, sigmas, sampler: str = "euler", noise_fn: NoiseFn | None = None
) -> Iterator[Step]:
    """Run ``sampler`` over ``sigmas`` from the start latent ``x``, yielding a :class:`Step` after each step.

    ``velocity(x, t)`` returns the model's v for the whole batch at scalar time t. Each step is evaluated before it
    is yielded (so memory stays bounded and a consumer can stop at any step), and non-finite latents raise
    :class:`NonFiniteError` at the step that produced them.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if sampler == "pingpong" and noise_fn is None:
        raise ValueError("the pingpong sampler needs a noise_fn (e.g. gaussian_noise(key))")
    sigmas = [float(s) for s in np.asarray(sigmas)]
    total = len(sigmas) - 1
    old_denoised = None
    for i in range(total):
        t, t_next = sigmas[i], sigmas[i + 1]
        v = velocity(x, t)
        denoised = x - t * v
        if sampler == "euler":
            x = euler_update(x, v, t, t_next)
        elif sampler == "pingpong":
            x = pingpong_update(denoised, t_next, noise_fn(i, x.shape).astype(x.dtype))
        else:
            x = dpmpp_update(x, denoised, t, t_next, sigmas[i - 1] if i else None, old_denoised)
            old_denoised = denoised
        mx.eval(x, denoised)
        if not mx.all(mx.isfinite(x)).item():
            raise NonFiniteError(
                f"sampling produced non-finite latents at step {i + 1}/{total} (t={t:.4f}); "
                "try float32 (--dtype float32) or fewer guidance"
            )
        yield Step(i, total, t, x, denoised)
