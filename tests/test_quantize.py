"""Quantized DiTs (mlx_sa3.quantize) on the tiny official fixtures.

Error bound: affine rounding of a group of g Gaussian-like weights to b bits errs by range / ((2^b - 1) sqrt 12) RMS,
range ~ 2 sqrt(2 ln g) standard deviations: eps_w = 0.60 % (int8) / 10 % (int4) at g = 32
(``expected_relative_error``). Each quantized layer adds an output error of relative size ~eps_w; independent errors
add in quadrature along the residual stream, whose layers have gain <= 1 at these weight scales, so the velocity's
relative RMS error stays below eps_w * sqrt(L) for L quantized layers.
"""

from mlx_sa3 import quantize as Q
from mlx_sa3.dit import DiT, load_dit, sanitize
from mlx_sa3.loading import check_strict, open_source

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from .conftest import REF, rel_rms

FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]


def _velocity(model, io, **kw):
    return np.array(model(io["x"], io["t"], cross_attn_cond=io["cross_attn_cond"], global_cond=io["global_cond"], **kw))


@pytest.fixture(scope="module", params=FIXTURES)
def fixture(request):
    source = REF / request.param
    return source, load_dit(source), dict(np.load(source / "io.npz"))


@pytest.mark.parametrize("bits", Q.BITS)
@pytest.mark.parametrize("case", ["plain", "inpaint", "cfg"])
def test_quantized_dit_within_bound(fixture, bits, case):
    source, reference, io = fixture
    kw = {"plain": {}, "inpaint": {"local_add_cond": io["local_add_cond"]}, "cfg": {"cfg_scale": 3.0}}[case]
    model = load_dit(source)
    config = Q.quantize_dit(model, bits=bits, group_size=32)
    eps_w = Q.expected_relative_error(bits, 32)
    measured = Q.weight_error(reference, config)
    assert max(measured.values()) <= eps_w  # the rounding model holds layer by layer
    error = rel_rms(_velocity(model, io, **kw), _velocity(reference, io, **kw))
    assert error <= eps_w * np.sqrt(len(config.layers))
    assert error > 0  # something was quantized


def test_int4_is_coarser_than_int8(fixture):
    source, reference, io = fixture
    errors = {}
    for bits in Q.BITS:
        model = load_dit(source)
        Q.quantize_dit(model, bits=bits, group_size=32)
        errors[bits] = rel_rms(_velocity(model, io), _velocity(reference, io))
    assert errors[4] > 4 * errors[8]  # 16x coarser steps; allow for the bound's slack


def test_layer_selection(fixture):
    source, reference, _ = fixture
    linears = {p: m for p, m in reference.named_modules() if type(m) is nn.Linear}
    for group in (32, 64):
        chosen = Q.quantizable_layers(reference, group)
        assert "project_in" not in chosen
        for path, module in linears.items():
            fits = module.weight.shape[-1] % group == 0 and path != "project_in"
            assert (path in chosen) == fits, path
    # the fixture DiT is 96 wide: with groups of 64 only the 768-wide inputs and the 384-wide FF output fit
    assert "layers.0.to_local_embed.fc1" not in Q.quantizable_layers(reference, 32)  # 25 inputs
    model = load_dit(source)
    config = Q.quantize_dit(model, bits=8, group_size=64)
    modules = dict(model.named_modules())
    assert all(isinstance(modules[p], nn.QuantizedLinear) for p in config.layers)
    assert isinstance(modules["layers.0.self_attn.to_qkv"], nn.Linear)  # 96 inputs: stays float
    assert model.dtype == mx.float32
    assert Q.quantized_bytes(model) < Q.quantized_bytes(reference)


def test_save_load_round_trip(fixture, tmp_path):
    source, _, io = fixture
    model = load_dit(source)
    config = Q.quantize_dit(model, bits=4, group_size=32)
    path = tmp_path / "dit.safetensors"
    mx.save_safetensors(str(path), dict(tree_flatten(model.parameters())))
    record = Q.QuantizationConfig.from_dict(config.to_dict()).to_dict()  # through the JSON-able record

    fresh = DiT(model.config)
    Q.apply_quantization(fresh, record)
    stored = mx.load(str(path))
    check_strict({k: v.shape for k, v in tree_flatten(fresh.parameters())}, stored, "quantized DiT")
    fresh.load_weights(list(stored.items()), strict=True)
    np.testing.assert_array_equal(_velocity(fresh, io), _velocity(model, io))


def test_converter_path_equals_module_path(fixture):
    """quantize_weights on the sanitized checkpoint tensors gives exactly the quantized module's tensors."""
    source, _, _ = fixture
    model = load_dit(source)
    config = Q.quantize_dit(model, bits=8, group_size=32)
    tensors = Q.quantize_weights(sanitize(open_source(source).component("dit")), config)
    params = dict(tree_flatten(model.parameters()))
    assert set(tensors) == set(params)
    for key, value in params.items():
        np.testing.assert_array_equal(np.array(tensors[key]), np.array(value), err_msg=key)


def test_bad_settings_and_records(fixture):
    _, reference, _ = fixture
    with pytest.raises(ValueError, match="bits"):
        Q.QuantizationConfig(bits=3)
    with pytest.raises(ValueError, match="group size"):
        Q.quantize_dit(DiT(reference.config), bits=8, group_size=48)
    with pytest.raises(ValueError, match="layers.0.to_local_embed.fc1"):
        Q.apply_quantization(
            DiT(reference.config), {"bits": 8, "group_size": 32, "layers": ["layers.0.to_local_embed.fc1"]}
        )
    with pytest.raises(ValueError, match="no_such_layer"):
        Q.apply_quantization(DiT(reference.config), {"bits": 8, "group_size": 32, "layers": ["no_such_layer"]})
