"""Schedules and sampler step formulas against the official values and hand computations."""

import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_sa3.sampling import NonFiniteError, build_schedule, sample_iter

from .conftest import REF


@pytest.mark.parametrize("fixture", ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"])
def test_schedules_match_official(fixture):
    ref = np.load(REF / fixture / "pipeline.npz")
    np.testing.assert_allclose(build_schedule(4), ref["sigmas_euler_4"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(build_schedule(4, 0.7), ref["sigmas_euler_4_smax0.7"], rtol=0, atol=1e-6)


def test_eight_step_schedule_and_sigma_max_quirk():
    expected = [1.0, 0.994376, 0.984480, 0.957912, 0.890903, 0.745547, 0.512497, 0.273885, 0.0]
    np.testing.assert_allclose(build_schedule(8), expected, atol=2e-6)
    # sigma_max < 1: shifted linspace(0.5, 0), only the first value reset (spec §4.1)
    np.testing.assert_allclose(build_schedule(8, 0.5)[:3], [0.5, 0.830, 0.746], atol=1e-3)


def linear_velocity(a: float):
    """v(x, t) = a * x + t: simple enough to follow by hand, and depends on both x and t."""
    return lambda x, t: a * x + t


def test_euler_steps_by_hand():
    x0 = mx.array([[[1.0, -2.0]]])
    sigmas = [1.0, 0.6, 0.0]
    steps = list(sample_iter(linear_velocity(0.5), x0, sigmas, "euler"))
    x = np.array([1.0, -2.0])
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (t_next - t) * (0.5 * x + t)
    np.testing.assert_allclose(np.asarray(steps[-1].x)[0, 0], x, rtol=1e-6)
    assert [s.index for s in steps] == [0, 1] and steps[0].total == 2


def test_pingpong_steps_by_hand_with_injected_noise():
    x0 = mx.array([[[0.3, 0.7]]])
    sigmas = [1.0, 0.5, 0.2, 0.0]
    eps = [np.array([0.1, -0.4]), np.array([1.5, 0.2]), np.array([-0.7, 0.9])]
    drawn = []

    def noise_fn(i, shape):
        drawn.append(i)
        return mx.array(eps[i].reshape(shape).astype(np.float32))

    steps = list(sample_iter(linear_velocity(-0.25), x0, sigmas, "pingpong", noise_fn))
    x = np.array([0.3, 0.7])
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = x - t * (-0.25 * x + t)
        x = (1 - t_next) * denoised + t_next * eps[i]
    np.testing.assert_allclose(np.asarray(steps[-1].x)[0, 0], x, rtol=1e-6)
    assert drawn == [0, 1, 2]  # fresh noise every step, including the last (a no-op there, as officially)


def test_dpmpp_steps_by_hand():
    x0 = mx.array([[[0.8, -0.1]]])
    sigmas = [1.0, 0.9, 0.5, 0.2, 0.0]
    a = 0.4
    steps = list(sample_iter(linear_velocity(a), x0, sigmas, "dpmpp"))

    lam = lambda t: math.log(max(1 - t, 1e-10) / max(t, 1e-10))  # noqa: E731
    x, old = np.array([0.8, -0.1]), None
    for i, (t, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        denoised = x - t * (a * x + t)
        c = (t_next - t) / (max(1 - t_next, 1e-10) * max(t, 1e-10))
        if old is None or t_next == 0:
            d = denoised
        else:
            r = (lam(t) - lam(sigmas[i - 1])) / (lam(t_next) - lam(t))
            d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (t_next / max(t, 1e-10)) * x - (1 - t_next) * c * d
        old = denoised
    np.testing.assert_allclose(np.asarray(steps[-1].x)[0, 0], x, rtol=1e-5)
    # t_next = 0 on the last step: first order gives exactly the denoised estimate
    np.testing.assert_allclose(np.asarray(steps[-1].x), np.asarray(steps[-1].denoised), rtol=1e-6)


def test_bad_sampler_and_non_finite_latents():
    with pytest.raises(ValueError, match="unknown sampler"):
        next(sample_iter(linear_velocity(1.0), mx.zeros((1, 1, 2)), [1.0, 0.0], "heun"))
    exploding = lambda x, t: x / 0.0  # noqa: E731
    with pytest.raises(NonFiniteError, match="step 1/2"):
        list(sample_iter(exploding, mx.ones((1, 1, 2)), [1.0, 0.5, 0.0], "euler"))
