"""CPU fallback kernels: base-2 polynomial exponentials and softmax (DiT, SAME, T5Gemma), chunked attention, the
SwiGLU dispatch, and tanh / sin / GELU for SAME and T5Gemma.

GPUs use MLX's fused kernels; on the CPU backend these are faster (docs/ARCHITECTURE.md, "CPU kernels").
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

# On the CPU, MLX's exp is a scalar routine (~15 ns per element on the development machine) and its SDPA fallback
# materialises the whole (heads, N, N) score matrix, so exponentials and memory traffic, not GEMMs, dominated a step.
# There the softmax and SiLU use the base-2 polynomial exponentials below (mx.compile'd kernels) and attention runs
# over query chunks whose scores stay in cache. Measured on 2 shared cores: attention 1.5-2x faster than mx.fast SDPA
# at 120 s of latents (N = 1356), SwiGLU up to 4x at 10 s. GPUs keep MLX's fused kernels.
_SCORES_PER_CHUNK = 1 << 20  # score elements (batch x heads x queries x keys) per attention chunk: 4 MB in float32
_LOG2E = 1.4426950408889634


def _use_fused_kernels() -> bool:
    return mx.default_device() != mx.cpu


@mx.compile
def _swiglu_fused(projected: mx.array) -> mx.array:
    value, gate = mx.split(projected, 2, axis=-1)
    return value * nn.silu(gate)


# 2^f on [-1, 1], degree 7 (same fit): 3e-8 relative before float32 rounding.
_EXP2_POLY_SIGNED = (
    1.0,
    0.6931472420692444,
    0.24022680521011353,
    0.05550378933548927,
    0.009616565890610218,
    0.0013339323922991753,
    0.00015662798250559717,
    1.5050406545924488e-05,
)


@mx.compile
def _silu_exponent(gate: mx.array) -> mx.array:
    # -gate * log2 e clamped to [-127, 127], the float32 normal range: a kernel of its own, where g++ still
    # vectorises the float min/max (inside a longer loop their NaN branch stops it).
    return mx.minimum(mx.maximum(gate * -_LOG2E, -127.0), 127.0)


@mx.compile
def _exp2_bits(y: mx.array) -> mx.array:
    """The float32 bits of 2^trunc(y) for y in [-127, 127] (+0.0 at -127)."""
    return mx.left_shift(y.astype(mx.int32) + 127, 23)


@mx.compile
def _silu_scaled(gate: mx.array, y: mx.array, two_to_k: mx.array) -> mx.array:
    f = y - y.astype(mx.int32).astype(mx.float32)  # in (-1, 1)
    c = _EXP2_POLY_SIGNED
    f2 = f * f
    low = (c[0] + c[1] * f) + (c[2] + c[3] * f) * f2
    high = (c[4] + c[5] * f) + (c[6] + c[7] * f) * f2
    return gate / (1.0 + (low + high * (f2 * f2)) * two_to_k)


def _silu_cpu(gate: mx.array) -> mx.array:
    """gate / (1 + 2^(-gate log2 e)) in float32: three contiguous vectorised kernels (the clamp, the 2^k bits, the
    rest), one pass fewer than the earlier natural-base exp and no row of scalar loops; the bit cast splits the graph
    as in ``_exp2_neg``."""
    gate32 = gate.astype(mx.float32)
    y = _silu_exponent(gate32)
    return _silu_scaled(gate32, y, mx.view(_exp2_bits(y), mx.float32)).astype(gate.dtype)


def _swiglu_cpu(projected: mx.array) -> mx.array:
    # MLX's CPU compiler emits a scalar loop with run-time strides for non-contiguous inputs: the gate half is copied
    # to a contiguous array first (one cheap pass) and the value product is a plain op (measured 1.5x faster).
    value, gate = mx.split(projected, 2, axis=-1)
    return value * _silu_cpu(mx.contiguous(gate))


def _swiglu_parts(value: mx.array, gate: mx.array) -> mx.array:
    """value * silu(gate) on the CPU for separately projected, contiguous halves (no gate copy, no strided pass)."""
    return value * _silu_cpu(gate)


def _swiglu(projected: mx.array) -> mx.array:
    """value * silu(gate) for the [value | gate] projection."""
    return _swiglu_fused(projected) if _use_fused_kernels() else _swiglu_cpu(projected)


# tanh(x) = x P(x^2) / Q(x^2), degree 5 / 3 (relative-error fit on [0, 9], float32 coefficients): 1.3e-7 relative
# before float32 rounding, < 3 eps after. Inputs are clamped to [-8, 8]: past 8.09 the rounded rational exceeds 1,
# and from 8 on tanh is within 2.3e-7 of +-1, so |tanh| <= 1 holds and the error stays within 2 eps there.
_TANH_CLAMP = 8.0
_TANH_P = (
    1.0,
    0.12928038835525513,
    0.002930051414296031,
    9.34869603952393e-06,
    -1.3010892807585606e-08,
    1.8811195656720514e-11,
)
_TANH_Q = (1.0, 0.46261343359947205, 0.023801686242222786, 0.0002293605066370219)


@mx.compile
def _tanh_argument(x: mx.array, scale: mx.array) -> mx.array:
    # scale * x clamped to [-8, 8]: a kernel of its own, where g++ vectorises the float min/max (see _silu_exponent).
    return mx.minimum(mx.maximum(x.astype(mx.float32) * scale, -_TANH_CLAMP), _TANH_CLAMP)


@mx.compile
def _tanh_rational(c: mx.array) -> mx.array:
    s = c * c
    p, q = _TANH_P, _TANH_Q
    s2 = s * s
    num = (p[0] + p[1] * s) + (p[2] + p[3] * s) * s2 + (p[4] + p[5] * s) * (s2 * s2)
    den = (q[0] + q[1] * s) + (q[2] + q[3] * s) * s2
    return c * num / den


@mx.compile
def _tanh_affine(c: mx.array, gamma: mx.array, beta: mx.array) -> mx.array:
    return gamma * _tanh_rational(c) + beta


def tanh(x: mx.array, scale: float | mx.array = 1.0) -> mx.array:
    """tanh(scale * x): MLX's on GPUs; on the CPU, where MLX's tanh is a scalar routine (~15 ns per element on the
    development machine), two vectorised kernels (the clamp, the rational) at ~3 float32 eps."""
    if _use_fused_kernels():
        return mx.tanh(x * scale)
    return _tanh_rational(_tanh_argument(x, mx.array(scale, mx.float32))).astype(x.dtype)


def dyt(x: mx.array, alpha: mx.array, gamma: mx.array, beta: mx.array) -> mx.array:
    """Dynamic tanh, gamma * tanh(alpha * x) + beta (SAME's norm), with :func:`tanh`'s CPU kernels."""
    if _use_fused_kernels():
        return gamma * mx.tanh(alpha * x) + beta
    return _tanh_affine(_tanh_argument(x, alpha), gamma, beta).astype(x.dtype)


# sin(y): y = n pi + r with n = round(y / pi) (the 1.5 * 2^23 rounding trick, exact for |y / pi| < 2^22) and r in
# [-pi/2, pi/2] by Cody-Waite: pi in three float32 parts, the first two of 12 bits so that n * part is exact for
# |n| < 2^12 (beyond, r errs by about an ulp of y, the input's own uncertainty); sin(y) = (-1)^n sin(r).
# sin(r) = r S(r^2), degree 4 (relative-error fit on [0, pi/2], float32 coefficients): 5.4e-9 before rounding.
_SIN_CLAMP = 2.0**22  # |y| beyond: float32 spacing >= 0.5 there, no phase left to speak of; keeps the trick exact
_ROUND_MAGIC = 12582912.0  # 1.5 * 2^23: (t + M) - M rounds t to the nearest integer in float32
_INV_PI = 0.31830987334251404
_PI_PARTS = (3.140625, 0.0009675025939941406, 1.5099580252808664e-07)
_SIN_POLY = (1.0, -0.16666656732559204, 0.008333024568855762, -0.00019807361240964383, 2.6017719392257277e-06)


@mx.compile
def _sin_argument(x: mx.array, scale: mx.array) -> mx.array:
    # scale * x (rounded as the plain product) clamped: a kernel of its own for the vectorised float min/max.
    return mx.minimum(mx.maximum(x.astype(mx.float32) * scale, -_SIN_CLAMP), _SIN_CLAMP)


@mx.compile
def _sin_reduced(y: mx.array, x: mx.array) -> mx.array:
    """sin of the clamped argument y; + x * 0 turns an infinite input x back into NaN, as sin(inf) is."""
    n = (y * _INV_PI + _ROUND_MAGIC) - _ROUND_MAGIC
    r = ((y - n * _PI_PARTS[0]) - n * _PI_PARTS[1]) - n * _PI_PARTS[2]
    odd = n - 2.0 * ((n * 0.5 + _ROUND_MAGIC) - _ROUND_MAGIC)  # 0 for even n, +-1 for odd n
    c = _SIN_POLY
    s = r * r
    s2 = s * s
    poly = (c[0] + c[1] * s) + (c[2] + c[3] * s) * s2 + c[4] * (s2 * s2)
    return (1.0 - 2.0 * (odd * odd)) * (r * poly) + x.astype(mx.float32) * 0.0


def sin(x: mx.array, scale: float | mx.array = 1.0) -> mx.array:
    """sin(scale * x), the product rounded once as in plain float32: MLX's on GPUs; on the CPU (where MLX's sin is a
    scalar routine) two vectorised kernels, within ~3 float32 eps absolute for |scale * x| < 4096 pi."""
    if _use_fused_kernels():
        return mx.sin(x * scale)
    return _sin_reduced(_sin_argument(x, mx.array(scale, mx.float32)), x).astype(x.dtype)


_GELU_SCALE = 0.7978845608028654  # sqrt(2 / pi)


@mx.compile
def _gelu_tanh_argument(x: mx.array) -> mx.array:
    x = x.astype(mx.float32)
    return _GELU_SCALE * (x + 0.044715 * (x * x * x))


@mx.compile
def _gelu_tanh_combine(x: mx.array, c: mx.array) -> mx.array:
    return 0.5 * x.astype(mx.float32) * (1.0 + _tanh_rational(c))


def gelu_tanh(x: mx.array) -> mx.array:
    """The tanh-approximated GELU (transformers' ``gelu_pytorch_tanh``), with :func:`tanh`'s CPU kernels."""
    if _use_fused_kernels():
        return nn.gelu_approx(x)
    return _gelu_tanh_combine(x, _tanh_argument(_gelu_tanh_argument(x), mx.array(1.0, mx.float32))).astype(x.dtype)


# 2^f on [-1, 0], degree 6 (minimax fit of the relative error, float32 coefficients): 4e-8 before float32 rounding.
_EXP2_POLY = (
    1.0,
    0.6931470036506653,
    0.2402239739894867,
    0.055489420890808105,
    0.009577011689543724,
    0.0012730519520118833,
    0.00010851123079191893,
)


@mx.compile
def _exp2_neg_bits(z: mx.array) -> mx.array:
    """The float32 bits of 2^-floor(z) for z >= 0; +0.0 for z >= 127 (and NaN, whose product stays NaN).

    The integer clamp runs through uint32 so that the x86 result of an out-of-range conversion (INT_MIN) clamps too.
    """
    k = mx.minimum(z.astype(mx.int32).astype(mx.uint32), mx.array(127, mx.uint32)).astype(mx.int32)
    return mx.left_shift(127 - k, 23)


@mx.compile
def _exp2_neg_scaled(z: mx.array, two_to_minus_k: mx.array) -> mx.array:
    """2^-z = 2^-floor(z) 2^f, f = floor(z) - z in (-1, 0], for z >= 0 (floor by truncation)."""
    k = z.astype(mx.int32)
    # Finite z >= 2^31 convert to INT_MIN (x86) and give a huge f whose polynomial would overflow (inf * 0 = NaN):
    # zeroed by 1 + (k >> 31), integer ops only (a select or a bool in the loop keeps g++ from vectorising it).
    f = (k.astype(mx.float32) - z) * (mx.right_shift(k, 31).astype(mx.float32) + 1.0)
    c = _EXP2_POLY
    f2 = f * f
    low = (c[0] + c[1] * f) + (c[2] + c[3] * f) * f2
    high = (c[4] + c[5] * f) + c[6] * f2
    return (low + high * (f2 * f2)) * two_to_minus_k


def _exp2_neg(z: mx.array) -> mx.array:
    """float32 2^-z for z >= 0 (exactly 0 from z >= 127; NaN stays NaN), about 5e-8 + float32 rounding relative.

    Two compiled kernels on purpose, one contiguous vectorisable loop each: MLX's CPU compiler (mlx/compile.cpp)
    fuses only element-wise primitives, so the bit cast (``mx.view``) for 2^-floor(z) splits the graph; compiled
    separately, each kernel recomputes floor(z) instead of sharing it (a shared intermediate would be written out).
    Inside them no ``mx.maximum``/``mx.minimum`` on floats (their NaN test is a branch that keeps g++ from
    vectorising) and no ``mx.where`` feeding a conversion or selecting computed values (g++ turns those into
    branches under its default -ftrapping-math).
    """
    return _exp2_neg_scaled(z, mx.view(_exp2_neg_bits(z), mx.float32))


def _row_max(x: mx.array) -> mx.array:
    # MLX's max reduction is slower on the CPU than its element-wise maximum: halve the row first (measured
    # 1.13 -> 0.8 ns per element for 1420 keys).
    half = x.shape[-1] // 2
    if half == 0:
        return x
    m = mx.max(mx.maximum(x[..., :half], x[..., half : 2 * half]), axis=-1, keepdims=True)
    return mx.maximum(m, x[..., -1:]) if x.shape[-1] % 2 else m


def _softmax_weights(scores: mx.array) -> mx.array:
    """2^(scores - row max) for float32 scores in log2 units (queries pre-scaled by log2 e), not normalised.

    Row-broadcast operands make MLX's CPU compiler emit a strided scalar loop, so max - scores is MLX's own
    (vectorised) subtraction and the exponential a contiguous kernel.
    """
    scores = scores.astype(mx.float32)
    return _exp2_neg(_row_max(scores) - scores)


# Added to masked-out scores (log2 units) instead of -inf: finite, so 2^-(max - score) is exactly 0 (``_exp2_neg``
# zeroes any z >= 127) with no inf - inf, and far below any real score.
_MASKED_SCORE = -1e30


def _softmax_product(q: mx.array, keys_t: mx.array, v_ones: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale) v for one block of queries on the CPU: base-2 weights, normalised after the product
    with [V | 1] (whose last column is the row sums). ``mask`` (bool, True = attend) broadcasts over the scores."""
    scores = (q * (scale * _LOG2E)) @ keys_t  # in log2 units for the base-2 exponential
    if mask is not None:
        scores = mx.where(mask, scores, _MASKED_SCORE)
    pv = _softmax_weights(scores) @ v_ones
    # Normalise after the product: (queries x D) divisions instead of (queries x keys).
    return pv[..., :-1] / pv[..., -1:]


def _with_ones(v: mx.array) -> mx.array:
    # A column of ones makes the product with V return the row sums too (one pass over the weights fewer; measured
    # 5-8 % faster for the softmax and product at 236 and 1420 keys).
    return mx.concatenate([v.astype(mx.float32), mx.ones((*v.shape[:-1], 1), mx.float32)], axis=-1)


def masked_attention_cpu(q: mx.array, k: mx.array, v: mx.array, scale: float, mask=None) -> mx.array:
    """softmax(q k^T * scale) v over the last two axes (any leading axes) in float32, in one block of queries, with
    an optional boolean ``mask`` (True = attend; every query must attend to at least one key)."""
    return _softmax_product(q, k.swapaxes(-1, -2), _with_ones(v), scale, mask).astype(v.dtype)


def masked_softmax(scores: mx.array, bias: mx.array) -> mx.array:
    """softmax(scores + bias) over the last axis for float32 scores and an additive mask ``bias`` that is 0 where a
    key counts and hugely negative (e.g. the most negative float) where it does not. On the CPU the base-2 kernels:
    the scores go to log2 units first and the bias is added unscaled (still hugely negative, never -inf)."""
    if _use_fused_kernels():
        return mx.softmax(scores + bias, axis=-1, precise=True)
    weights = _softmax_weights(scores * _LOG2E + bias)
    return weights / weights.sum(axis=-1, keepdims=True)


def _attention(q: mx.array, k: mx.array, v: mx.array, scale: float) -> mx.array:
    """softmax(q k^T * scale) v over (B, H, T, D) arrays, softmax in float32."""
    if _use_fused_kernels():
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
    batch, heads, queries, _ = q.shape
    chunk = max(1, _SCORES_PER_CHUNK // (batch * heads * k.shape[2]))
    keys_t = k.swapaxes(-1, -2)
    v_ones = _with_ones(v)
    outs = []
    for start in range(0, queries, chunk):
        out = _softmax_product(q[:, :, start : start + chunk], keys_t, v_ones, scale).astype(v.dtype)
        # Evaluated chunk by chunk on purpose: each chunk's scores are freed while still in cache, and the step came
        # out 7-10 % faster at 10 s and 120 s (interleaved A/B, small DiT; +35 MB peak at 120 s). CPU path only: the
        # fused GPU path stays one lazy graph (mx.compile).
        mx.eval(out)
        outs.append(out)
    return outs[0] if len(outs) == 1 else mx.concatenate(outs, axis=2)
