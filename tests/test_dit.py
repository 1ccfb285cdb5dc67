"""DiT parity with the official fixtures, with diffusers' StableAudio3DiTModel, and its speed paths.

Fixture io.npz (README): the official DiT called on (x, t, cross_attn_cond, global_cond, local_add_cond) giving
v_plain (all-zero local conditioning), v_inpaint (the given local_add_cond), v_null_context (all-zero context) and
v_cfg3_apg1 (cfg_scale 3, apg_scale 1, zero local conditioning), all float32 on CPU.
"""

from mlx_sa3.dit import DiT, DiTConfig, guide, load_dit, sanitize
from mlx_sa3.loading import CheckpointError, open_source

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from .conftest import EPS, REF, half_tol, rel_err, stack_tol
from .conftest import dit_call as _call

FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]
TOL_FP32 = 1e-4


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    source = open_source(REF / request.param)
    return source, load_dit(source), dict(np.load(REF / request.param / "io.npz"))


@pytest.fixture(scope="module", params=[(f, b) for b in ("mlx", "torch") for f in FIXTURES], ids="-".join)
def any_backend(request):
    """The fixture's DiT on each backend (the torch one is mlx_sa3.torch_backend.TorchDiT)."""
    name, backend = request.param
    if backend == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("diffusers")
        from mlx_sa3.torch_backend import load_torch_dit

        model = load_torch_dit(REF / name)
    else:
        model = load_dit(REF / name)
    return None, model, dict(np.load(REF / name / "io.npz"))


# ------------------------------------------------------------------------------------------ official fixtures


@pytest.mark.parametrize("case", ["plain_zeros", "plain_none", "inpaint", "null_context", "cfg3_apg1"])
def test_official_fixture(any_backend, case):
    _, model, io = any_backend
    if case == "plain_zeros":
        out, ref = _call(model, io, local_add_cond=np.zeros_like(io["local_add_cond"])), io["v_plain"]
    elif case == "plain_none":  # None means zeros: the per-block constant W2 silu(b1) + b2 is still added
        out, ref = _call(model, io, local_add_cond=None), io["v_plain"]
    elif case == "inpaint":
        out, ref = _call(model, io, local_add_cond=io["local_add_cond"]), io["v_inpaint"]
    elif case == "null_context":
        out, ref = _call(model, io, cross_attn_cond=np.zeros_like(io["cross_attn_cond"])), io["v_null_context"]
    else:
        out, ref = _call(model, io, cfg_scale=3.0, apg_scale=1.0), io["v_cfg3_apg1"]
    assert rel_err(out, ref) <= TOL_FP32


def test_prepare_step_equals_call(fixture):
    _, model, io = fixture
    prepared = model.prepare(io["cross_attn_cond"], io["global_cond"], io["local_add_cond"], cfg=True)
    for t in (io["t"], 0.5):
        for cfg in (1.0, 3.0):
            stepped = np.array(model.step(io["x"], t, prepared, cfg_scale=cfg))
            called = _call(model, {**io, "t": t}, local_add_cond=io["local_add_cond"], cfg_scale=cfg)
            assert rel_err(stepped, called) <= stack_tol(model.config.embed_dim, model.config.depth, cfg)
    with pytest.raises(ValueError, match="prepared for 10"):
        model.step(io["x"][..., :9], io["t"], prepared)
    with pytest.raises(ValueError, match="cfg=True"):
        model.step(io["x"], io["t"], model.prepare(io["cross_attn_cond"], io["global_cond"]), cfg_scale=3.0)


def test_null_uncond_shortcut_equals_explicit_negative(fixture):
    """The zero-context CFG branch skips cross-attention; an explicit all-zero negative prompt (or one whose tokens
    are all masked out, which the official code sets to zero) runs it, and must give the same result."""
    _, model, io = fixture
    c = io["cross_attn_cond"]
    other = np.ascontiguousarray(c[::-1])  # another prompt: the batch items swapped
    shortcut = _call(model, io, cfg_scale=3.0)
    explicit = _call(model, io, cfg_scale=3.0, negative_cross_attn_cond=np.zeros_like(c))
    masked = _call(
        model,
        io,
        cfg_scale=3.0,
        negative_cross_attn_cond=other + 1.0,
        negative_cross_attn_mask=np.zeros(c.shape[:2], bool),
    )
    tol = stack_tol(model.config.embed_dim, model.config.depth, cfg_scale=3.0)
    assert rel_err(explicit, shortcut) <= tol
    assert rel_err(masked, shortcut) <= tol
    real_negative = _call(model, io, cfg_scale=3.0, negative_cross_attn_cond=other)
    assert rel_err(real_negative, shortcut) > 1e-3


def test_cfg_interval_and_vanilla_cfg(fixture):
    _, model, io = fixture
    width, depth = model.config.embed_dim, model.config.depth
    plain = _call(model, io)
    # t[0] = 0.9 lies outside (0, 0.5): no guidance at all, whatever the scale.
    assert rel_err(_call(model, io, cfg_scale=3.0, cfg_interval=(0.0, 0.5)), plain) <= stack_tol(width, depth)
    # apg_scale 0 is plain CFG in velocity space for rectified flow: v_u + s (v_c - v_u).
    v_uncond = _call(model, io, cross_attn_cond=np.zeros_like(io["cross_attn_cond"]))
    vanilla = _call(model, io, cfg_scale=3.0, apg_scale=0.0)
    assert rel_err(vanilla, v_uncond + 3.0 * (plain - v_uncond)) <= stack_tol(width, depth, cfg_scale=3.0)
    # The same with per-item inpainting conditioning, which both CFG halves must receive item by item.
    local = io["local_add_cond"]
    v_cond = _call(model, io, local_add_cond=local)
    v_uncond = _call(model, io, local_add_cond=local, cross_attn_cond=np.zeros_like(io["cross_attn_cond"]))
    vanilla = _call(model, io, local_add_cond=local, cfg_scale=3.0, apg_scale=0.0)
    assert rel_err(vanilla, v_uncond + 3.0 * (v_cond - v_uncond)) <= stack_tol(width, depth, cfg_scale=3.0)


def test_guide_apg_blend_and_rescale():
    """APG blend, norm threshold and CFG rescale against a direct numpy transcription of the official formulas."""
    rng = np.random.default_rng(0)
    x, vc, vu = (rng.standard_normal((2, 6, 5)).astype(np.float32) for _ in range(3))
    sigma = np.array([0.7, 0.4], np.float32)
    out = np.array(
        guide(
            mx.array(x),
            mx.array(vc),
            mx.array(vu),
            mx.array(sigma),
            None,
            4.0,
            0.3,
            scale_phi=0.5,
            cfg_norm_threshold=1.5,
        )
    )
    s = sigma[:, None, None].astype(np.float64)
    dc, du = x - vc * s, x - vu * s
    diff = dc - du
    diff = diff * np.minimum(1.0, 1.5 / np.linalg.norm(diff, axis=(1, 2), keepdims=True))
    unit = dc / np.linalg.norm(dc, axis=(1, 2), keepdims=True)
    orth = diff - np.sum(diff * unit, axis=(1, 2), keepdims=True) * unit
    v = (x - (dc + 3.0 * (0.3 * orth + 0.7 * diff))) / s
    v = 0.5 * v * vc.std(axis=1, ddof=1, keepdims=True) / v.std(axis=1, ddof=1, keepdims=True) + 0.5 * v
    assert rel_err(out, v) <= 1e-5


# ----------------------------------------------------------------------------------------- diffusers reference


def _diffusers_model(source, config: DiTConfig):
    """diffusers' StableAudio3DiTModel holding the same weights (keys mapped as in the spec, section 5.2).

    Two settings are aligned with the official model so that the comparison tests the rest: the block RMSNorm eps
    (diffusers 1e-6, official 1e-5) and the RoPE width (diffusers rotates head_dim // 2 channels, official
    max(head_dim // 2, 32); they only differ for the tiny fixtures' 32-wide heads).
    """
    torch = pytest.importorskip("torch")
    from diffusers.models.transformers.transformer_stable_audio3 import (
        StableAudio3DiTModel,
        StableAudio3RotaryEmbedding,
    )

    model = StableAudio3DiTModel(
        io_channels=config.io_channels,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        cond_token_dim=config.cond_token_dim,
        global_cond_dim=config.global_cond_dim,
        local_add_cond_dim=config.local_add_cond_dim,
        timestep_features_dim=config.timestep_features_dim,
        ff_mult=config.ff_mult,
        num_memory_tokens=config.num_memory_tokens,
        use_differential_attention=config.differential,
    )
    model.rotary_pos_emb = StableAudio3RotaryEmbedding(config.rope_dims)
    for block in model.transformer_blocks:
        for norm in (block.pre_norm, block.cross_attend_norm, block.ff_norm):
            norm.eps = config.norm_eps
    state = {}
    for key, value in source.component("dit").items():
        tensor = torch.from_numpy(np.array(value))
        key = (
            key.replace("transformer.project_in", "proj_in")
            .replace("transformer.project_out", "proj_out")
            .replace("transformer.layers.", "transformer_blocks.")
            .replace("transformer.", "")
            .replace("ff.ff.0.proj", "ff.proj_in")
            .replace("ff.ff.2", "ff.proj_out")
        )
        if config.differential and key.endswith("self_attn.to_qkv.weight"):
            q, k, v, q2, k2 = tensor.chunk(5)  # official [q|k|v|q2|k2] -> diffusers [q1|q2|k1|k2|v]
            tensor = torch.cat([q, q2, k, k2, v])
        state[key] = tensor
    state["prompt_padding_embedding"] = torch.zeros(config.cond_token_dim)  # unused without a context mask
    model.load_state_dict(state, strict=True)
    return model.eval()


@pytest.fixture(scope="module")
def with_diffusers(fixture):
    source, model, io = fixture
    return model, _diffusers_model(source, model.config), io


def _run_diffusers(model, x, t, io, local):
    torch = pytest.importorskip("torch")
    with torch.no_grad():
        out = model(
            torch.from_numpy(x),
            torch.from_numpy(np.asarray(t, np.float32)),
            torch.from_numpy(io["cross_attn_cond"]),
            torch.from_numpy(io["global_cond"]),
            local_add_cond=None if local is None else torch.from_numpy(local),
        )
    return out.sample.numpy()


def test_diffusers_parity_explicit_local(with_diffusers):
    model, reference, io = with_diffusers
    for local in (io["local_add_cond"], np.zeros_like(io["local_add_cond"])):
        ours = _call(model, io, local_add_cond=local)
        assert rel_err(ours, _run_diffusers(reference, io["x"], io["t"], io, local)) <= TOL_FP32


def test_diffusers_skips_local_embed_when_none(with_diffusers):
    """Documented difference: diffusers drops to_local_embed for local_add_cond=None, the official model adds the
    learned per-block constant (it always passes zeros), so diffusers' None output is not the official v_plain."""
    model, reference, io = with_diffusers
    assert rel_err(_run_diffusers(reference, io["x"], io["t"], io, None), io["v_plain"]) > 1e-3


def test_variable_length_against_diffusers(with_diffusers):
    """One prepared conditioning serves any latent length; each length matches an independent evaluation."""
    model, reference, io = with_diffusers
    prepared = model.prepare(io["cross_attn_cond"], io["global_cond"], None)
    rng = np.random.default_rng(1)
    for length in (10, 11, 17):
        x = rng.standard_normal((2, model.config.io_channels, length)).astype(np.float32)
        zeros = np.zeros((2, model.config.local_add_cond_dim, length), np.float32)
        ours = np.array(model.step(x, io["t"], prepared))
        assert rel_err(ours, _run_diffusers(reference, x, io["t"], io, zeros)) <= TOL_FP32
        local = rng.standard_normal(zeros.shape).astype(np.float32)
        ours = _call(model, {**io, "x": x}, local_add_cond=local)
        assert rel_err(ours, _run_diffusers(reference, x, io["t"], io, local)) <= TOL_FP32


# ------------------------------------------------------------------------------------------------ half precision

# Half precision against float32: a few roundings of the half dtype relative to max|v| (5 eps: 4.9e-3 for float16,
# 3.9e-2 for bfloat16; the tiny fixtures stay below 2.8e-3 / 2.3e-2 at cfg 1 and 3).
HALF_TOL = {mx.float16: half_tol(mx.float16), mx.bfloat16: half_tol(mx.bfloat16)}


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision(fixture, dtype):
    source, model32, io = fixture
    model = load_dit(source, dtype=dtype)
    assert {v.dtype for _, v in tree_flatten(model.parameters())} == {dtype}
    prepared = model.prepare(io["cross_attn_cond"], io["global_cond"], io["local_add_cond"], cfg=True)
    assert prepared.kv[0][0].dtype == dtype and prepared.local_seq[0].dtype == dtype
    for cfg in (1.0, 3.0):
        out = model.step(io["x"], io["t"], prepared, cfg_scale=cfg)
        assert out.dtype == mx.float32
        ref = _call(model32, io, local_add_cond=io["local_add_cond"], cfg_scale=cfg)
        assert rel_err(np.array(out), ref) <= HALF_TOL[dtype]


# ----------------------------------------------------------------------------------------------- config, loading


def test_config_from_dict():
    source = open_source(REF / "sa3_medium_tiny_s0")
    d = source.model_config["model"]["diffusion"]["config"]
    config = DiTConfig.from_dict({**d, "some_future_key": 1})
    assert (config.embed_dim, config.depth, config.num_heads, config.differential) == (96, 3, 3, True)
    assert (config.num_memory_tokens, config.local_add_cond_dim, config.rope_dims) == (8, 25, 32)
    assert DiTConfig.from_model_config(source.model_config).diffusion_objective == "rf_denoiser"
    assert not DiTConfig.from_dict(
        open_source(REF / "sa3_small_tiny_s0").model_config["model"]["diffusion"]["config"]
    ).differential
    with pytest.raises(ValueError, match="global_cond_type"):
        DiTConfig.from_dict({**d, "global_cond_type": "prepend"})
    medium = DiTConfig.medium()
    assert (medium.embed_dim, medium.depth, medium.head_dim, medium.ff_inner) == (1536, 24, 64, 6144)


def test_full_size_parameter_counts():
    """The presets reproduce the published DiT sizes (spec 1.3): 459,130,880 and 1,453,170,176 parameters."""
    for config, expected in ((DiTConfig.small(), 459_130_880), (DiTConfig.medium(), 1_453_170_176)):
        shapes = [v.shape for _, v in tree_flatten(DiT(config).parameters())]
        assert sum(int(np.prod(s)) for s in shapes) == expected


def test_sanitize_names_match_module():
    source = open_source(REF / "sa3_medium_tiny_s0")
    model = DiT(DiTConfig.from_model_config(source.model_config))
    names = {k for k, _ in tree_flatten(model.parameters())}
    sanitized = sanitize(source.component("dit"))
    assert set(sanitized) == names
    assert sanitized["preprocess_conv.weight"].shape == (24, 1, 24)


def test_rope_buffer_is_verified():
    weights = open_source(REF / "sa3_small_tiny_s0").component("dit")
    bad = dict(weights)
    bad["transformer.rotary_pos_emb.inv_freq"] = weights["transformer.rotary_pos_emb.inv_freq"] * 1.01
    with pytest.raises(CheckpointError, match="rotary_pos_emb"):
        sanitize(bad)


@pytest.mark.parametrize("defect", ["missing", "unexpected", "shape"])
def test_strict_loading(defect):
    source = open_source(REF / "sa3_small_tiny_s0")
    tensors = dict(source._sa3_tensors())
    target = "model.model.transformer.layers.1.cross_attn.to_kv.weight"
    if defect == "missing":
        del tensors[target]
        name = "layers.1.cross_attn.to_kv.weight"
    elif defect == "unexpected":
        tensors["model.model.transformer.layers.1.extra.weight"] = mx.zeros((3,))
        name = "layers.1.extra.weight"
    else:
        tensors[target] = mx.zeros((5, 5))
        name = "layers.1.cross_attn.to_kv.weight"
    source.meta["_tensors"] = tensors
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        load_dit(source)


# ------------------------------------------------------------------------------------------------ CPU kernels


def test_base2_exp_accuracy():
    """The softmax's 2^-z (z = row max - score, log2 units) against float64 over the whole normal range."""
    from mlx_sa3.models.kernels import _exp2_neg

    eps = EPS["float32"]
    z = np.concatenate([np.linspace(0.0, 126.0, 400_001, dtype=np.float32), 2.0 ** -np.arange(1, 40, dtype=np.float32)])
    got = np.array(_exp2_neg(mx.array(z)), np.float64)
    ref = 2.0 ** -z.astype(np.float64)
    # f = floor(z) - z is exact (Sterbenz), the fit is 4e-8 relative; the degree-6 Estrin evaluation in float32
    # adds a few half-ulp roundings and the product with the exact 2^-floor(z) one more
    assert np.max(np.abs(got / ref - 1.0)) <= 4 * eps
    assert np.array(_exp2_neg(mx.array(np.float32(0.0)))).item() == 1.0
    # beyond the normal range: below 2^-126, exactly 0 from 127 on (also where floor(z) leaves int32), NaN stays NaN
    edge = np.array([126.5, 127.0, 128.0, 1e4, 2.0**31, 1e10, 3e38, np.nan], np.float32)
    out = np.array(_exp2_neg(mx.array(edge)))
    assert 0.0 <= out[0] <= 2.0**-126
    assert np.all(out[1:-1] == 0.0)
    assert np.isnan(out[-1])


def test_cpu_silu_accuracy():
    """The CPU SiLU, gate / (1 + 2^(-gate log2 e)), against float64 over the range where exp(-gate) is normal."""
    from mlx_sa3.models.kernels import _silu_cpu

    eps = EPS["float32"]
    g = np.linspace(-87.0, 100.0, 400_001, dtype=np.float32)
    gd = g.astype(np.float64)
    t = np.exp(-gd)
    got = np.array(_silu_cpu(mx.array(g)), np.float64)
    ref = gd / (1.0 + t)
    # the product -gate * log2 e is rounded in float32 (half an ulp, plus 0.11 eps from the constant), which 2^y turns
    # into a relative error of about 0.65 |gate| eps of t; the polynomial adds ~3 eps of t and the division 2 eps
    bound = ((0.65 * np.abs(gd) + 3.0) * t / (1.0 + t) + 2.0) * eps
    assert np.all(np.abs(got / ref - 1.0) <= bound)
    edge = np.array([1e10, 3e38, -1e10, 0.0, np.inf, np.nan], np.float32)
    out = np.array(_silu_cpu(mx.array(edge)))
    assert out[0] == 1e10 and out[1] == np.float32(3e38) and -1e-28 < out[2] <= 0.0 and out[3] == 0.0
    assert out[4] == np.inf and np.isnan(out[5])


def test_cpu_tanh_accuracy():
    """The CPU tanh (clamp + degree 5/3 rational) against float64: relative error, oddness, |tanh| <= 1, edges."""
    from mlx_sa3.models.kernels import dyt, tanh

    eps = EPS["float32"]
    tiny = 2.0 ** -np.arange(1, 149, dtype=np.float32)
    x = np.concatenate([np.linspace(-12.0, 12.0, 400_001, dtype=np.float32), tiny, -tiny])
    got = np.array(tanh(mx.array(x)), np.float64)
    ref = np.tanh(x.astype(np.float64))
    # the fit is 1.1 eps relative; the Estrin evaluation and the division round ~10 float32 results (each half an ulp
    # of a term at most as large as the result), and past the clamp tanh is within 2 eps of +-1
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), np.finfo(np.float32).smallest_subnormal)) <= 4 * eps
    assert np.max(np.abs(got)) <= 1.0 and np.array_equal(np.array(tanh(mx.array(-x)), np.float64), -got)
    edge = np.array([0.0, -0.0, np.inf, -np.inf, 3e38, -3e38, np.nan], np.float32)
    out = np.array(tanh(mx.array(edge)))
    assert out[0] == 0.0 and np.signbit(out[1]) and not np.signbit(out[0])
    assert 1.0 - 2 * eps <= out[2] <= 1.0 and out[3] == -out[2] and out[4] == out[2] and out[5] == out[3]
    assert np.isnan(out[6])
    # the scaled form and DyT: tanh(scale * x) with the product rounded once, gamma * tanh + beta
    scale, gamma, beta = mx.array([4.0]), mx.array([0.5, -2.0]), mx.array([0.1, 0.0])
    pairs = mx.array(np.linspace(-3.0, 3.0, 2000, dtype=np.float32).reshape(-1, 2))
    ref4 = np.tanh(4.0 * np.array(pairs, np.float64))
    assert np.max(np.abs(np.array(tanh(pairs, scale)) - ref4) / np.abs(ref4)) <= 4 * eps
    ref_dyt = np.array(gamma, np.float64) * ref4 + np.array(beta, np.float64)
    assert np.max(np.abs(np.array(dyt(pairs, scale, gamma, beta)) - ref_dyt)) <= 6 * eps


def test_cpu_sin_accuracy():
    """The CPU sin (SAME-L's sin(pi x) gate) against float64 sin of the float32 product, as the official computes it;
    relative accuracy near 0, infinities give NaN, huge inputs stay bounded."""
    from mlx_sa3.models.kernels import sin

    eps = EPS["float32"]
    gate_pi = 3.14159265359  # SAME's constant
    x = np.linspace(-3000.0, 3000.0, 1_000_001, dtype=np.float32)
    ref = np.sin((x * np.float32(gate_pi)).astype(np.float64))
    got = np.array(sin(mx.array(x), gate_pi), np.float64)
    # the reduction rounds r twice (half an ulp of pi/2 each) and the degree-4 polynomial ~1.2 eps: < 3 eps absolute
    assert np.max(np.abs(got - ref)) <= 3 * eps
    small = np.concatenate(
        [np.linspace(-1.5, 1.5, 100_001, dtype=np.float32), 2.0 ** -np.arange(1, 149, dtype=np.float32)]
    )
    ref = np.sin(small.astype(np.float64))
    got = np.array(sin(mx.array(small)), np.float64)
    assert np.max(np.abs(got - ref) / np.maximum(np.abs(ref), np.finfo(np.float32).smallest_subnormal)) <= 2 * eps
    edge = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 3e38, -3e38], np.float32)
    out = np.array(sin(mx.array(edge)))
    assert out[0] == 0.0 and not np.signbit(out[0]) and np.signbit(out[1]) and np.isnan(out[2:5]).all()
    assert np.all(np.abs(out[5:]) <= 1.0)


def test_cpu_gelu_tanh_and_masked_softmax_accuracy():
    """The T5Gemma CPU kernels against float64: the tanh GELU, and softmax(scores + additive mask) including a row
    with every key masked (uniform weights, as transformers' eager path gives)."""
    from mlx_sa3.models.kernels import gelu_tanh, masked_softmax

    eps = EPS["float32"]
    x = np.linspace(-12.0, 12.0, 200_001, dtype=np.float32)
    xd = x.astype(np.float64)
    ref = 0.5 * xd * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (xd + 0.044715 * xd**3)))
    got = np.array(gelu_tanh(mx.array(x)), np.float64)
    # tanh's < 4 eps relative error (of |tanh| <= 1) enters as 0.5 |x| * 4 eps; the argument's roundings (~2 eps of
    # u) move tanh by at most |u| 2 eps; the product and sum a few eps of the result
    u = np.sqrt(2.0 / np.pi) * (xd + 0.044715 * xd**3)
    bound = 0.5 * np.abs(xd) * (4 + 2 * np.abs(u) / np.cosh(np.minimum(np.abs(u), 300.0)) ** 2) * eps
    assert np.all(np.abs(got - ref) <= bound + 3 * eps * np.abs(ref))

    rng = np.random.default_rng(3)
    scores = (rng.standard_normal((2, 3, 5, 40)) * 8).astype(np.float32)
    keep = rng.random((2, 1, 1, 40)) < 0.6
    keep[1] = False  # the second item masks every key (an empty prompt)
    bias = np.where(keep, 0.0, np.finfo(np.float32).min).astype(np.float32)
    got = np.array(masked_softmax(mx.array(scores), mx.array(bias)), np.float64)
    s64 = np.where(keep, scores.astype(np.float64), -np.inf)
    w = np.exp(s64 - s64[0:1].max(-1, keepdims=True).clip(-1e300))
    ref0 = w[0] / w[0].sum(-1, keepdims=True)
    # exp turns the rounding of a score (eps |s|, plus the log2 e scaling's) into a relative weight error
    assert np.max(np.abs(got[0] - ref0)) <= 4 * eps * (np.abs(scores).max() + 1) * ref0.max()
    np.testing.assert_array_equal(got[1], np.full_like(got[1], np.float32(1 / 40)))


def test_chunked_attention_matches_float64(monkeypatch):
    """The CPU attention (query chunks, polynomial-exp softmax) against a float64 softmax attention, with chunks
    small enough to leave a ragged last one, for self-attention sizes and for 257 context keys."""
    import mlx_sa3.models.kernels as dit

    monkeypatch.setattr(dit, "_SCORES_PER_CHUNK", 2 * 3 * 7 * 257)
    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: False)
    rng = np.random.default_rng(2)
    for queries, keys in ((45, 45), (45, 257)):
        q, k, v = (rng.standard_normal((2, 3, n, 32)).astype(np.float32) * 2 for n in (queries, keys, keys))
        ours = np.array(dit._attention(mx.array(q), mx.array(k), mx.array(v), 32**-0.5))
        scores = q.astype(np.float64) @ k.swapaxes(-1, -2) * 32**-0.5
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        ref = weights / weights.sum(-1, keepdims=True) @ v
        # fp32 error budget: exp turns the rounding of a score s (about eps * |s|) into a relative weight error, the
        # d-term dot product and the sums over the keys add about eps * sqrt(d) and eps * sqrt(keys).
        eps = float(np.finfo(np.float32).eps)
        tol = 2 * eps * (np.abs(scores).max() + np.sqrt(32) + np.sqrt(keys))
        assert rel_err(ours, ref) <= tol, (queries, keys, tol)


def test_fused_kernel_path_matches_fixture(monkeypatch):
    """The path used on GPUs (MLX's fused SDPA and SiLU) also reproduces the official outputs."""
    import mlx_sa3.models.kernels as dit

    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: True)
    for name in FIXTURES:
        model, io = load_dit(REF / name), dict(np.load(REF / name / "io.npz"))
        assert rel_err(_call(model, io, local_add_cond=io["local_add_cond"]), io["v_inpaint"]) <= TOL_FP32
        assert rel_err(_call(model, io, cfg_scale=3.0), io["v_cfg3_apg1"]) <= TOL_FP32


def _feedforward_and_input(rng, batch=2, tokens=45, dim=32, inner=64):
    from mlx_sa3.models.dit import FeedForward

    ff = FeedForward(dim, inner)
    ff.update(
        {
            "proj_in": {"weight": mx.array(rng.standard_normal((2 * inner, dim)).astype(np.float32) / dim**0.5)},
            "proj_out": {"weight": mx.array(rng.standard_normal((dim, inner)).astype(np.float32) / inner**0.5)},
        }
    )
    return ff, mx.array(rng.standard_normal((batch, tokens, dim)).astype(np.float32))


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_token_chunked_feedforward_matches_one_call(monkeypatch, storage):
    """The CPU feed-forward in token chunks (ragged last one; bfloat16 storage widened once for all chunks) gives
    the one-call result: the same row-wise maths, at most rounded differently by the GEMMs' blocking."""
    import mlx_sa3.models.dit as dit
    from mlx_sa3.storage import narrow_linears

    ff, x = _feedforward_and_input(np.random.default_rng(3))
    if storage == "bfloat16":
        narrow_linears(ff, mx.bfloat16)
    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: False)
    whole = np.array(ff(x))
    calls, parts = [], []
    swiglu, swiglu_parts = dit._swiglu, dit._swiglu_parts
    monkeypatch.setattr(dit, "_swiglu", lambda h: calls.append(h.shape[1]) or swiglu(h))
    monkeypatch.setattr(dit, "_swiglu_parts", lambda v, g: parts.append(v.shape[1]) or swiglu_parts(v, g))
    monkeypatch.setattr(dit, "_FF_CHUNK_ELEMENTS", 2 * 16 * 128)  # 16 tokens of 2 x 64 hidden values at batch 2
    chunked = np.array(ff(x))
    assert calls == [] and parts == [15, 15, 15]
    # two float32 GEMMs of depth 32 and 64 per output
    assert rel_err(chunked, whole) <= stack_tol(64, 2)


def test_feedforward_one_call_when_short_or_fused(monkeypatch):
    import mlx_sa3.models.dit as dit

    ff, x = _feedforward_and_input(np.random.default_rng(4))
    calls = []
    swiglu, swiglu_parts = dit._swiglu, dit._swiglu_parts
    monkeypatch.setattr(dit, "_swiglu", lambda h: calls.append(("joint", h.shape[1])) or swiglu(h))
    monkeypatch.setattr(dit, "_swiglu_parts", lambda v, g: calls.append(("parts", v.shape[1])) or swiglu_parts(v, g))
    monkeypatch.setattr(dit, "_FF_CHUNK_ELEMENTS", 2 * 45 * 128)  # exactly the whole input
    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: False)
    ff(x)
    monkeypatch.setattr(dit, "_FF_CHUNK_ELEMENTS", 16)
    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: True)  # GPUs: one graph for mx.compile
    ff(x)
    assert calls == [("parts", 45), ("joint", 45)]


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_cpu_feedforward_value_and_gate_gemms_match_one_projection(monkeypatch, storage):
    """The CPU path's separate value and gate GEMMs give the one-projection SwiGLU: the same dot products (at most
    rounded differently by the GEMMs' blocking), bfloat16-stored weights widened exactly."""
    import mlx_sa3.models.dit as dit
    from mlx_sa3.storage import narrow_linears

    ff, x = _feedforward_and_input(np.random.default_rng(5))
    if storage == "bfloat16":
        narrow_linears(ff, mx.bfloat16)
    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: False)
    split = np.array(ff(x))
    weight = ff.proj_in["weight"].astype(mx.float32)
    joint = np.array(ff.proj_out(dit._swiglu(mx.addmm(ff.proj_in["bias"], x, weight.T))))
    # one float32 GEMM of depth 32, then one of depth 64, per output
    assert rel_err(split, joint) <= stack_tol(64, 2)


def test_cpu_feedforward_quantized_proj_in_projects_once(monkeypatch):
    """A layer that cannot be split by rows (a quantized proj_in) keeps the one projection on the CPU path."""
    import mlx_sa3.models.dit as dit

    ff, x = _feedforward_and_input(np.random.default_rng(6))
    reference = np.array(ff.proj_out(dit._swiglu(ff.proj_in(x))))
    ff.proj_in = nn.QuantizedLinear.from_linear(ff.proj_in, group_size=32, bits=8)
    quantized = np.array(ff.proj_out(dit._swiglu(ff.proj_in(x))))
    calls = []
    swiglu = dit._swiglu
    monkeypatch.setattr(dit, "_swiglu", lambda h: calls.append(h.shape[1]) or swiglu(h))
    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: False)
    out = np.array(ff(x))
    assert calls == [45]
    np.testing.assert_array_equal(out, quantized)
    assert 0 < rel_err(out, reference) <= 2**-6  # it is the quantized layer that ran


def test_chunked_feedforward_dit_matches_fixture(monkeypatch, fixture):
    """Whole tiny DiTs with every feed-forward in ragged token chunks still reproduce the official outputs."""
    import mlx_sa3.models.dit as dit

    _, model, io = fixture
    unchunked = _call(model, io, local_add_cond=io["local_add_cond"])
    monkeypatch.setattr(dit, "_use_fused_kernels", lambda: False)
    monkeypatch.setattr(dit, "_FF_CHUNK_ELEMENTS", 7 * 2 * model.config.ff_inner)
    chunked = _call(model, io, local_add_cond=io["local_add_cond"])
    assert rel_err(chunked, io["v_inpaint"]) <= TOL_FP32
    assert rel_err(chunked, unchunked) <= stack_tol(model.config.ff_inner, model.config.depth)
    assert rel_err(_call(model, io, cfg_scale=3.0, apg_scale=1.0), io["v_cfg3_apg1"]) <= TOL_FP32


def test_block_locals_made_per_block(fixture):
    """The constant inpainting terms come one block at a time and equal the list form."""
    _, model, io = fixture
    prepared = model.prepare(io["cross_attn_cond"], io["global_cond"], None)
    tokens = model.config.num_memory_tokens + io["x"].shape[2]
    lazy = model._iter_block_locals(prepared, tokens)
    assert not isinstance(lazy, (list, tuple))
    listed = model._block_locals(prepared, tokens)
    assert len(listed) == model.config.depth
    for a, b in zip(lazy, listed, strict=True):
        assert np.array_equal(np.array(a), np.array(b))
        assert np.all(np.array(a)[:, : model.config.num_memory_tokens] == 0)
