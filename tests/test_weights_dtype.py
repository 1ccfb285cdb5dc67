"""``weights_dtype``: linear weights held in bfloat16 and widened per layer at call time (mlx_sa3.storage).

Tolerance against float32 weights (derived, not measured): rounding a weight to bfloat16 (8 significant bits, round
to nearest) errs by at most u = 2^-8 relative, uniformly within its spacing, so by at most u / sqrt(3) RMS. A layer's
output ``(W + dW) x`` then errs by about that RMS relative to ``W x`` (independent errors summed over the input
width), and the ``n`` narrowed layers along the network's path add their errors in quadrature: ``u sqrt(n / 3)``
relative RMS. The max-norm metric (``rel_err``) allows 4x that (the largest of a few thousand Gaussian-like errors
against the largest output).
"""

import math
import subprocess
import sys

from mlx_sa3 import generate
from mlx_sa3.checkpoint import load_dit, load_mlx_text_encoder
from mlx_sa3.loading import open_source
from mlx_sa3.model import load_model
from mlx_sa3.models.dit import sanitize
from mlx_sa3.storage import WidenedLinear, cast_to, load_cast, narrow_linears, storage_dtype, stored_dtypes

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from .conftest import BF16_U, REF, rel_err, stack_tol
from .conftest import dit_call as _call
from .test_cli import REPO_ENV

FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]


def bf16_tol(narrowed_layers: int) -> float:
    """Max-norm relative error of a network whose ``narrowed_layers`` weights were rounded to bfloat16."""
    return 4.0 * BF16_U * math.sqrt(narrowed_layers / 3.0)


def _widened(module) -> dict:
    return {path: m for path, m in module.named_modules() if isinstance(m, WidenedLinear)}


def _plain_inputs(io):
    return dict(local_add_cond=np.zeros_like(io["local_add_cond"]))


@pytest.fixture(scope="module", params=FIXTURES)
def pair(request):
    """(fp32 DiT, bfloat16-storage DiT, io) of one fixture."""
    src = REF / request.param
    return load_dit(src), load_dit(src, weights_dtype="bfloat16"), dict(np.load(src / "io.npz"))


def test_bfloat16_storage_holds_linear_weights_in_bfloat16(pair):
    fp32, bf16, _ = pair
    widened = _widened(bf16)
    linears = [p for p, m in fp32.named_modules() if type(m) is nn.Linear]
    assert sorted(widened) == sorted(p for p in linears if p != "project_in")
    assert all(m.weight.dtype == mx.bfloat16 for m in widened.values())
    # biases, norms, convolutions, memory tokens and project_in (the compute dtype's carrier) stay float32
    narrow = {f"{p}.weight" for p in widened}
    others = [v.dtype for k, v in tree_flatten(bf16.parameters()) if k not in narrow]
    assert others and all(d == mx.float32 for d in others)
    assert bf16.dtype == mx.float32
    held = sum(v.nbytes for _, v in tree_flatten(bf16.parameters()))
    full = sum(v.nbytes for _, v in tree_flatten(fp32.parameters()))
    assert held < 0.55 * full


def test_bfloat16_storage_computes_in_float32_with_the_rounded_weights(pair):
    """Widening is exact, so the result is a float32 network holding the bfloat16-rounded weights."""
    fp32, bf16, io = pair
    rounded = type(fp32)(fp32.config)
    rounded.load_weights(
        [
            (k, v.astype(mx.bfloat16).astype(mx.float32) if k.endswith(".weight") and k[:-7] in _widened(bf16) else v)
            for k, v in tree_flatten(fp32.parameters())
        ]
    )
    out, ref = _call(bf16, io, **_plain_inputs(io)), _call(rounded, io, **_plain_inputs(io))
    assert rel_err(out, ref) <= stack_tol(fp32.config.embed_dim, fp32.config.depth)


@pytest.mark.parametrize("case", ["v_plain", "v_inpaint", "v_cfg3_apg1"])
def test_bfloat16_storage_close_to_float32(pair, case):
    fp32, bf16, io = pair
    kw = {"v_plain": _plain_inputs(io), "v_inpaint": dict(local_add_cond=io["local_add_cond"])}.get(
        case, dict(cfg_scale=3.0, apg_scale=1.0, **_plain_inputs(io))
    )
    out, ref = _call(bf16, io, **kw), _call(fp32, io, **kw)
    guided = 1.0 + 2.0 * 3.0 if case == "v_cfg3_apg1" else 1.0
    assert rel_err(out, ref) <= guided * bf16_tol(len(_widened(bf16)))
    assert rel_err(out, io[case]) <= guided * bf16_tol(len(_widened(bf16))) + 1e-4  # + the fp32 parity tolerance


@pytest.mark.parametrize("name", FIXTURES)
def test_default_storage_is_the_checkpoint_as_before(name):
    """Default (and weights_dtype equal to the compute dtype): plain layers holding exactly the stored tensors."""
    source = open_source(REF / name)
    default, same = load_dit(source), load_dit(source, weights_dtype="float32")
    assert not _widened(default) and not _widened(same)
    stored = sanitize(source.component("dit"))
    stored.pop("transformer.rotary_pos_emb.inv_freq", None)
    params = dict(tree_flatten(default.parameters()))
    assert params.keys() == stored.keys()
    for key, value in stored.items():
        assert params[key].dtype == mx.float32
        np.testing.assert_array_equal(np.asarray(params[key]), np.asarray(value.astype(mx.float32)), err_msg=key)
    io = dict(np.load(REF / name / "io.npz"))
    np.testing.assert_array_equal(_call(default, io, **_plain_inputs(io)), _call(same, io, **_plain_inputs(io)))


def test_text_encoder_bfloat16_storage():
    source = open_source(REF / FIXTURES[0])
    fp32 = load_mlx_text_encoder(source, 32)
    bf16 = load_mlx_text_encoder(source, 32, weights_dtype="bfloat16")
    widened = _widened(bf16.model)
    assert widened and all(m.weight.dtype == mx.bfloat16 for m in widened.values())
    assert not _widened(fp32.model)
    prompts = ["warm analog synth pad", "rain"]
    (h32, m32), (h16, m16) = fp32.encode(prompts), bf16.encode(prompts)
    assert h16.dtype == mx.float32
    np.testing.assert_array_equal(np.asarray(m32), np.asarray(m16))
    assert rel_err(np.asarray(h16), np.asarray(h32)) <= bf16_tol(len(widened))


def test_load_cast_loads_in_groups_and_empties_the_dict():
    layer = nn.Linear(8, 4)
    narrow_linears(layer_holder := nn.Sequential(layer), mx.bfloat16)
    weights = {"layers.0.weight": mx.arange(32, dtype=mx.float32).reshape(4, 8), "layers.0.bias": mx.ones((4,))}
    expected = {k: np.asarray(v) for k, v in weights.items()}
    load_cast(layer_holder, weights, cast_to(stored_dtypes(layer_holder)), group_bytes=1)
    assert weights == {}
    widened = layer_holder.layers[0]
    assert (
        isinstance(widened, WidenedLinear) and widened.weight.dtype == mx.bfloat16 and widened.bias.dtype == mx.float32
    )
    np.testing.assert_array_equal(np.asarray(widened.weight.astype(mx.float32)), expected["layers.0.weight"])
    x = mx.ones((1, 8))
    np.testing.assert_array_equal(np.asarray(widened(x)), expected["layers.0.weight"].sum(1)[None] + 1.0)


def test_storage_dtype_rules():
    assert storage_dtype(mx.float32, None) == mx.float32
    assert storage_dtype("float32", "float32") == mx.float32
    assert storage_dtype(mx.float32, "bfloat16") == mx.bfloat16
    # half compute (the GPU default) already holds half weights: no second rounding, no per-call cast
    assert storage_dtype(mx.float16, "bfloat16") == mx.float16
    assert storage_dtype(mx.bfloat16, "bfloat16") == mx.bfloat16
    with pytest.raises(ValueError, match="wider than the compute dtype float16"):
        storage_dtype(mx.float16, "float32")
    with pytest.raises(ValueError, match="unknown dtype"):
        storage_dtype(mx.float32, "int8")


def test_half_compute_keeps_plain_half_layers():
    dit = load_dit(REF / FIXTURES[0], dtype=mx.float16, weights_dtype="bfloat16")
    assert not _widened(dit) and dit.dtype == mx.float16
    assert all(v.dtype == mx.float16 for _, v in tree_flatten(dit.parameters()))


def test_torch_backend_refuses_narrow_storage_before_loading():
    with pytest.raises(ValueError, match="needs the MLX backend"):
        load_model(REF / FIXTURES[0], backend="torch", weights_dtype="bfloat16")


def test_cli_weights_dtype_writes_a_file(tmp_path):
    out = tmp_path / "bf16.wav"
    cmd = [sys.executable, "-m", "mlx_sa3.generate", "--model", str(REF / FIXTURES[0]), "-p", "warm pad"]
    cmd += ["--duration", "1", "--steps", "2", "--seed", "1", "--backend", "mlx", "--weights-dtype", "bfloat16"]
    proc = subprocess.run([*cmd, "-o", str(out), "--quiet"], capture_output=True, text=True, timeout=300, env=REPO_ENV)
    assert proc.returncode == 0, proc.stderr
    import soundfile as sf

    data, sr = sf.read(out, dtype="float32", always_2d=True)
    assert sr == 44100 and data.shape == (44100, 2) and np.all(np.isfinite(data)) and np.abs(data).max() > 0


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--weights-dtype", "int8"], "--weights-dtype must be one of float32, bfloat16, got 'int8'"),
        (["--weights-dtype", "bfloat16", "--backend", "torch"], "needs the MLX backend"),
    ],
)
def test_cli_bad_weights_dtype_one_line_before_loading(tmp_path, capsys, extra, message):
    # a checkpoint that does not exist: the error must come from the flag, before anything is opened
    missing = tmp_path / "no-such-model"
    status = generate.main(["--model", str(missing), "-p", "x", "--quiet", "-o", str(tmp_path / "o.wav"), *extra])
    err = capsys.readouterr().err
    assert status == 2
    assert err.strip().count("\n") == 0 and message in err
    assert not (tmp_path / "o.wav").exists()


def test_quantized_checkpoint_with_bfloat16_storage_on_the_cpu(tmp_path):
    """A quantized checkpoint on the CPU is dequantized as it is read; bfloat16 storage then holds those weights."""
    from mlx_sa3.convert import convert

    quantized = convert(REF / FIXTURES[0], tmp_path / "int8", quantize=8, group_size=32)
    fp32, bf16 = (
        load_dit(quantized, keep_quantized=False),
        load_dit(quantized, keep_quantized=False, weights_dtype="bfloat16"),
    )
    widened = _widened(bf16)
    assert widened and all(m.weight.dtype == mx.bfloat16 for m in widened.values())
    io = dict(np.load(REF / FIXTURES[0] / "io.npz"))
    out, ref = _call(bf16, io, **_plain_inputs(io)), _call(fp32, io, **_plain_inputs(io))
    assert rel_err(out, ref) <= bf16_tol(len(widened))


def test_row_blocks_split_a_linear_exactly():
    """Row blocks of a plain or bfloat16-stored linear compute its output columns block by block (the weights
    widened exactly); layers they cannot split give None."""
    from mlx_sa3.storage import WidenedLinear, row_blocks

    rng = np.random.default_rng(7)
    x = mx.array(rng.standard_normal((3, 5, 16)).astype(np.float32))
    linear = nn.Linear(16, 12)
    for layer in (linear, WidenedLinear.from_linear(linear, mx.bfloat16)):
        blocks = row_blocks(layer, mx.float32, 3)
        assert [b["weight"].shape for b in blocks] == [(4, 16)] * 3
        assert all(b["weight"].dtype == mx.float32 for b in blocks)
        weight = np.array(layer["weight"].astype(mx.float32))
        for i, block in enumerate(blocks):
            np.testing.assert_array_equal(np.array(block["weight"]), weight[4 * i : 4 * (i + 1)])
            np.testing.assert_array_equal(np.array(block["bias"]), np.array(layer["bias"])[4 * i : 4 * (i + 1)])
        whole = np.array(layer(x))
        joined = np.concatenate([np.array(b(x)) for b in blocks], axis=-1)
        # only the GEMMs' blocking may differ: the forward error bound of a depth-16 dot product, elementwise
        bound = (16 + 1) * 2**-24 * (np.abs(np.array(x)) @ np.abs(weight).T + np.abs(np.array(layer["bias"])))
        assert (np.abs(joined - whole) <= 2 * bound).all()
    assert row_blocks(linear, mx.float32, 5) is None  # 12 rows do not split in 5
    assert row_blocks(nn.QuantizedLinear.from_linear(nn.Linear(64, 12), group_size=32, bits=8), mx.float32, 2) is None
