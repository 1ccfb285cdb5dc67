"""Schedules and sampler step formulas against the official values and hand computations."""

import math

from mlx_sa3.sampling import NonFiniteError, build_schedule, sample_iter

import mlx.core as mx
import numpy as np
import pytest

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


def test_rk4_steps_by_hand():
    """The official sample_rk4: k1 at t, k2/k3 at the midpoint, k4 at max(t_next, 1e-5), x += dt/6 (k1+2k2+2k3+k4)."""
    x0 = mx.array([[[0.6, -1.2]]])
    sigmas = [1.0, 0.7, 0.3, 0.0]
    a = -0.8
    calls = []

    def velocity(x, t):
        calls.append(t)
        return a * x + t

    steps = list(sample_iter(velocity, x0, sigmas, "rk4"))
    f = lambda x, t: a * x + t  # noqa: E731
    x = np.array([0.6, -1.2])
    for t, t_next in zip(sigmas[:-1], sigmas[1:]):
        dt = t_next - t
        k1 = f(x, t)
        k2 = f(x + dt / 2 * k1, t + dt / 2)
        k3 = f(x + dt / 2 * k2, t + dt / 2)
        k4 = f(x + dt * k3, max(t_next, 1e-5))
        x = x + dt / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    np.testing.assert_allclose(np.asarray(steps[-1].x)[0, 0], x, rtol=1e-6)
    assert len(calls) == 4 * 3 and calls[-1] == 1e-5
    np.testing.assert_allclose(
        np.asarray(steps[0].denoised)[0, 0], [0.6, -1.2] - 1.0 * f(np.array([0.6, -1.2]), 1.0), rtol=1e-6
    )


def test_rk4_exact_when_the_velocity_is_a_cubic_in_t():
    """dx/dt = c0 + c1 t + c2 t^2 + c3 t^3 (independent of x): RK4 is Simpson's rule, exact for cubics."""
    c = (0.3, -1.1, 0.7, 0.45)
    v = lambda x, t: mx.full(x.shape, c[0] + c[1] * t + c[2] * t**2 + c[3] * t**3)  # noqa: E731
    antiderivative = lambda t: c[0] * t + c[1] * t**2 / 2 + c[2] * t**3 / 3 + c[3] * t**4 / 4  # noqa: E731
    sigmas = [1.0, 0.8, 0.45, 0.2, 0.05]  # ends above 1e-5, where the official k4 clamp does not act
    x0 = 0.25
    steps = list(sample_iter(v, mx.full((1, 2, 3), x0), sigmas, "rk4"))
    exact = x0 + antiderivative(sigmas[-1]) - antiderivative(sigmas[0])
    # float32 arithmetic over 4 steps of O(1) values
    np.testing.assert_allclose(np.asarray(steps[-1].x), exact, rtol=0, atol=16 * np.finfo(np.float32).eps)


def test_rk4_is_fourth_order():
    """dx/dt = a x from t = 1 to 0 is x0 exp(-a); halving the step divides the RK4 error by ~2^4 (Euler: ~2)."""
    a, x0 = 2.0, 1.0
    exact = x0 * math.exp(-a)

    def error(sampler, steps):
        sigmas = np.linspace(1.0, 0.0, steps + 1)
        # the official k4 is taken at max(t_next, 1e-5); the field does not depend on t, so that clamp is inert here
        out = list(sample_iter(lambda x, t: a * x, mx.full((1, 1, 1), x0), sigmas, sampler))[-1].x
        return abs(float(np.asarray(out).item()) - exact)

    rk4 = [error("rk4", n) for n in (4, 8, 16)]
    orders = [math.log2(rk4[i] / rk4[i + 1]) for i in range(2)]
    assert all(3.5 < p < 4.5 for p in orders), (rk4, orders)  # 4 +- 0.5: neither 3 nor 5
    euler = [error("euler", n) for n in (8, 16)]
    assert 0.8 < math.log2(euler[0] / euler[1]) < 1.2
    assert rk4[1] < euler[0] / 1000
