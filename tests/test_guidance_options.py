"""The official guidance/schedule options: validation, defaults, and each option's formula in ``mlx_sa3.dit``.

The numpy references below are written from the official ``DiffusionTransformer.forward`` (CFG branch:
``cond_denoised = x - v_c sigma``, ``diff = cond_denoised - uncond_denoised``, the norm threshold, ``apg_project``,
``cfg_denoised = cond_denoised + (cfg_scale - 1) cfg_diff``, ``v = (x - cfg_denoised) / sigma``, then the CFG rescale
with ``torch.std`` (unbiased) over channels), in float64.
"""

import math

from mlx_sa3 import options
from mlx_sa3.dit import guide, load_dit
from mlx_sa3.options import OptionError
from mlx_sa3.sampling import build_schedule, sample_iter

import mlx.core as mx
import numpy as np
import pytest

from .conftest import REF, rel_err

# float32 guidance arithmetic on O(1) values, a few dozen operations deep, compared with a float64 reference
TOL = 64 * np.finfo(np.float32).eps


# ------------------------------------------------------------------------------------------------- validation


def test_official_defaults():
    assert options.DEFAULT_CFG_INTERVAL == (0.0, 1.0)
    assert options.DEFAULT_SCALE_PHI == 0.0
    assert options.DEFAULT_CFG_NORM_THRESHOLD == 0.0
    assert options.DEFAULT_APG_SCALE == 1.0
    assert options.DEFAULT_SIGMA_MAX == 1.0
    assert options.DEFAULT_DURATION_PADDING_SEC == 6.0
    assert options.validate_guidance() == {
        "cfg_interval": (0.0, 1.0),
        "scale_phi": 0.0,
        "cfg_norm_threshold": 0.0,
        "apg_scale": 1.0,
    }
    # the checkpoints' default shift (config without sampling_distribution_shift_options) is LogSNR rate 0
    from mlx_sa3.sampling import DEFAULT_SHIFT

    logsnr = options.validate_dist_shift("logsnr")
    assert {k: logsnr[k] for k in DEFAULT_SHIFT} == DEFAULT_SHIFT


@pytest.mark.parametrize(
    "value, expected",
    [
        ("0.2,0.8", (0.2, 0.8)),
        ((0, 1), (0.0, 1.0)),
        ([0.5, 0.5], (0.5, 0.5)),
        (" 0 , 0.3 ", (0.0, 0.3)),
        (None, (0, 1)),
    ],
)
def test_cfg_interval_accepted(value, expected):
    assert options.validate_cfg_interval(value) == expected


@pytest.mark.parametrize(
    "value, message",
    [
        ("0.8,0.2", "lo <= hi"),
        ((-0.1, 0.5), "0 <= lo"),
        ((0.2, 1.5), "hi <= 1"),
        ("0.5", "two numbers"),
        ("a,b", "must be a number"),
        ((0.1, 0.2, 0.3), "two numbers"),
        ("nan,1", "got nan"),
    ],
)
def test_cfg_interval_refused(value, message):
    with pytest.raises(OptionError, match=message) as err:
        options.validate_cfg_interval(value)
    assert "--cfg-interval" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(
    "check, flag, good, bad",
    [
        (options.validate_scale_phi, "--cfg-rescale", [0, 0.7, 1], [-0.01, 1.01, math.inf]),
        (options.validate_apg_scale, "--apg-scale", [0, 0.3, 1], [-1, 2]),
        (options.validate_cfg_norm_threshold, "--cfg-norm-threshold", [0, 2.5, math.inf], [-0.5, -math.inf]),
        (options.validate_sigma_max, "--sigma-max", [1e-3, 0.5, 1], [0, -0.2, 1.1]),
        (options.validate_duration_padding_sec, "--headroom", [0, 0.5, 6, 30], [-1, math.inf]),
    ],
)
def test_ranges(check, flag, good, bad):
    for value in good:
        assert check(value) == float(value)
    for value in bad + [float("nan"), "x"]:
        with pytest.raises(OptionError, match=flag):
            check(value)


def test_headroom_latents_as_the_official_padding_mask():
    assert options.headroom_latents(6.0) == 64  # int(6 * 44100 / 4096)
    assert options.headroom_latents(0.0) == 0
    assert options.headroom_latents(1.0) == 10
    with pytest.raises(OptionError):
        options.headroom_latents(-1)


def test_dist_shift_forms_and_schedules():
    assert options.validate_dist_shift(None) is None
    flux = options.validate_dist_shift("flux:alpha_min=3,alpha_max=5")
    assert flux == {"type": "flux", "min_length": 256, "max_length": 4096, "alpha_min": 3.0, "alpha_max": 5.0}
    assert options.validate_dist_shift({"type": "Full", "max_shift": 2}) == {"type": "full", "max_shift": 2.0}
    assert options.validate_dist_shift({"base_shift": 1}) == {
        "type": "full",
        "base_shift": 1.0,
    }  # official default type
    assert options.validate_dist_shift("none") == {"type": "none"}
    # each validated form is something build_schedule runs: flux with alpha a gives a t / (1 + (a - 1) t)
    t = np.linspace(1, 0, 5, dtype=np.float32).astype(np.float64)
    sched = build_schedule(4, 1.0, 300, options.validate_dist_shift("flux:alpha_min=3,alpha_max=3"))
    np.testing.assert_allclose(sched, 3 * t / (1 + 2 * t), atol=1e-6)
    np.testing.assert_allclose(build_schedule(4, 1.0, 300, options.validate_dist_shift("none")), t, atol=1e-7)
    for name in options.DIST_SHIFT_TYPES:
        schedule = build_schedule(8, 1.0, 300, options.validate_dist_shift(name))
        assert schedule[0] == 1.0 and schedule[-1] == 0.0 and np.all(np.diff(schedule) < 0)


@pytest.mark.parametrize(
    "value, message",
    [
        ("cosine", "type must be one of"),
        ("flux:alpha=2", "no parameter 'alpha'"),
        ("flux:alpha_min", "key=value"),
        ("logsnr:rate=inf", "finite"),
        ("full:min_length=2.5", "whole number"),
        ({"type": "none", "rate": 1}, "no parameter"),
        ("flux:min_length=500,max_length=300", "min_length <= max_length"),
        (3, "type name or dict"),
    ],
)
def test_dist_shift_refused(value, message):
    with pytest.raises(OptionError, match=message):
        options.validate_dist_shift(value)


# ----------------------------------------------------------------------------------------- guidance formulas


def official_guide(x, vc, vu, sigma, cfg_scale, apg_scale, scale_phi, threshold):
    """Numpy float64 transcription of the official CFG branch for rectified flow (no padding mask)."""
    x, vc, vu = (np.asarray(a, np.float64) for a in (x, vc, vu))
    s = np.asarray(sigma, np.float64)[:, None, None]
    dc, du = x - vc * s, x - vu * s
    diff = dc - du
    if threshold > 0:
        diff = diff * np.minimum(1.0, threshold / np.linalg.norm(diff, axis=(1, 2), keepdims=True))
    unit = dc / np.maximum(np.linalg.norm(dc, axis=(1, 2), keepdims=True), 1e-12)
    orth = diff - np.sum(diff * unit, axis=(1, 2), keepdims=True) * unit
    cfg_diff = diff if apg_scale == 0 else orth if apg_scale == 1 else apg_scale * orth + (1 - apg_scale) * diff
    v = (x - (dc + (cfg_scale - 1) * cfg_diff)) / s
    if scale_phi != 0:
        ratio = vc.std(axis=1, ddof=1, keepdims=True) / v.std(axis=1, ddof=1, keepdims=True)
        v = scale_phi * v * ratio + (1 - scale_phi) * v
    return v


@pytest.fixture(scope="module")
def tensors():
    rng = np.random.default_rng(7)
    x, vc, vu = (rng.standard_normal((3, 8, 6)).astype(np.float32) for _ in range(3))
    return x, vc, vu, np.array([0.9, 0.5, 0.2], np.float32)


def _guide(tensors, cfg_scale=4.0, apg_scale=1.0, scale_phi=0.0, threshold=0.0):
    x, vc, vu, sigma = tensors
    out = guide(
        mx.array(x),
        mx.array(vc),
        mx.array(vu),
        mx.array(sigma),
        None,
        cfg_scale,
        apg_scale,
        scale_phi=scale_phi,
        cfg_norm_threshold=threshold,
    )
    return np.array(out)


@pytest.mark.parametrize("apg_scale", [0.0, 0.25, 1.0])
@pytest.mark.parametrize("scale_phi", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("threshold", [0.0, 0.5, 3.0])
def test_guide_matches_official_formula(tensors, apg_scale, scale_phi, threshold):
    x, vc, vu, sigma = tensors
    ref = official_guide(x, vc, vu, sigma, 4.0, apg_scale, scale_phi, threshold)
    assert rel_err(_guide(tensors, 4.0, apg_scale, scale_phi, threshold), ref) <= TOL


def test_apg_zero_is_plain_cfg_and_the_blend_is_linear(tensors):
    _, vc, vu, _ = tensors
    plain = _guide(tensors, 4.0, apg_scale=0.0)
    np.testing.assert_allclose(plain, vu + 4.0 * (vc - vu), rtol=0, atol=TOL * np.abs(vc - vu).max() * 4)
    full, blend = _guide(tensors, 4.0, apg_scale=1.0), _guide(tensors, 4.0, apg_scale=0.4)
    assert rel_err(blend, 0.4 * full + 0.6 * plain) <= TOL
    assert rel_err(full, plain) > 1e-2  # the projection does remove something here


def test_neutral_values_change_nothing(tensors):
    base = _guide(tensors, 4.0, 0.6)
    # scale_phi 0 and threshold 0 skip their branches; threshold inf caps nothing; a huge finite one neither
    np.testing.assert_array_equal(_guide(tensors, 4.0, 0.6, scale_phi=0.0, threshold=0.0), base)
    np.testing.assert_array_equal(_guide(tensors, 4.0, 0.6, threshold=math.inf), base)
    assert rel_err(_guide(tensors, 4.0, 0.6, threshold=1e9), base) <= TOL


def test_norm_threshold_caps_the_guidance_norm(tensors):
    _, vc, vu, sigma = tensors
    threshold = 0.3
    capped = _guide(tensors, 4.0, apg_scale=0.0, threshold=threshold)
    # plain CFG: v - v_c = (s - 1) (v_c - v_u) min(1, thr / ||diff||), diff = sigma (v_u - v_c)
    s = sigma[:, None, None].astype(np.float64)
    diff_norm = np.linalg.norm(s * (vu - vc), axis=(1, 2), keepdims=True)
    assert np.all(diff_norm > threshold)  # the cap is active for every item
    guidance = (capped - vc) * s / 3.0  # = the capped diff (sign flipped), whose norm must be the threshold
    np.testing.assert_allclose(np.linalg.norm(guidance, axis=(1, 2)), threshold, rtol=TOL)


def test_full_rescale_matches_the_conditional_std(tensors):
    vc = tensors[1]
    rescaled = _guide(tensors, 4.0, 1.0, scale_phi=1.0)
    np.testing.assert_allclose(rescaled.std(axis=1, ddof=1), vc.std(axis=1, ddof=1), rtol=TOL)
    half = _guide(tensors, 4.0, 1.0, scale_phi=0.5)
    assert rel_err(half, 0.5 * rescaled + 0.5 * _guide(tensors, 4.0, 1.0)) <= TOL


# ------------------------------------------------------------------------------------------ on the real DiT


@pytest.fixture(scope="module")
def tiny_dit():
    name = "sa3_small_tiny_s0"
    dit, io = load_dit(REF / name), dict(np.load(REF / name / "io.npz"))
    prepared = dit.prepare(io["cross_attn_cond"], io["global_cond"], cfg=True)
    return dit, io, prepared


def _velocity(dit, prepared, batch, **kw):
    return lambda x, t: dit.step(x, mx.full((batch,), t, dtype=mx.float32), prepared, **kw)


def test_step_guides_only_inside_the_interval(tiny_dit):
    dit, io, prepared = tiny_dit
    x = mx.array(io["x"])
    batch = x.shape[0]
    interval = (0.3, 0.8)
    for t in build_schedule(8):
        plain = np.array(dit.step(x, mx.full((batch,), float(t)), prepared))
        guided = np.array(dit.step(x, mx.full((batch,), float(t)), prepared, cfg_scale=5.0, cfg_interval=interval))
        if interval[0] <= t <= interval[1]:
            assert rel_err(guided, plain) > 1e-3, t
        else:
            np.testing.assert_array_equal(guided, plain)


def test_interval_outside_the_schedule_is_no_guidance(tiny_dit):
    """A whole sampling run with the interval outside every schedule value equals the unguided run exactly."""
    dit, io, prepared = tiny_dit
    x = mx.array(io["x"])
    sigmas = build_schedule(4, 0.7)  # 0.7, then shifted values down to 0; nothing lies in [0.999, 1]
    assert not np.any((sigmas >= 0.999) & (sigmas <= 1.0))
    batch = x.shape[0]
    plain = list(sample_iter(_velocity(dit, prepared, batch), x, sigmas, "euler"))[-1].x
    outside = list(
        sample_iter(_velocity(dit, prepared, batch, cfg_scale=7.0, cfg_interval=(0.999, 1.0)), x, sigmas, "euler")
    )[-1].x
    inside = list(sample_iter(_velocity(dit, prepared, batch, cfg_scale=7.0), x, sigmas, "euler"))[-1].x
    np.testing.assert_array_equal(np.array(outside), np.array(plain))
    assert rel_err(np.array(inside), np.array(plain)) > 1e-3


def test_step_options_reach_the_formula(tiny_dit):
    """DiT.step with every option equals the official formula on its own conditional/unconditional velocities."""
    dit, io, prepared = tiny_dit
    x = mx.array(io["x"])
    batch, t = x.shape[0], 0.6
    unprepared = dit.prepare(io["cross_attn_cond"], io["global_cond"])
    null = dit.prepare(np.zeros_like(io["cross_attn_cond"]), io["global_cond"])
    vc = np.array(dit.step(x, mx.full((batch,), t), unprepared))
    vu = np.array(dit.step(x, mx.full((batch,), t), null))
    out = np.array(
        dit.step(
            x,
            mx.full((batch,), t),
            prepared,
            cfg_scale=3.0,
            apg_scale=0.5,
            scale_phi=0.7,
            cfg_norm_threshold=0.8,
            cfg_interval=(0.5, 0.9),
        )
    )
    ref = official_guide(io["x"], vc, vu, np.full(batch, t), 3.0, 0.5, 0.7, 0.8)
    assert rel_err(out, ref) <= 1e-4  # the DiT's own float32 parity tolerance (tests/test_dit.py)
