"""Quantized checkpoints end to end: ``convert.py --quantize``, its config.json record, and every loader.

Stated error (see tests/test_quantize.py and mlx_sa3.quantize): each quantized layer's weights err by at most
eps_w = ``expected_relative_error(bits, group)`` RMS, so the velocity errs by at most eps_w * sqrt(L) for L quantized
layers. One Euler step from noise gives x = noise - v, so the latents err by ||dv|| <= eps_w sqrt(L) ||v||.
"""

import json

from mlx_sa3 import quantize as Q
from mlx_sa3.checkpoint import load_dit
from mlx_sa3.convert import convert
from mlx_sa3.model import load_model

import mlx.core as mx
import numpy as np
import pytest
from mlx import nn
from mlx.utils import tree_flatten

from .conftest import REF, rel_err
from .test_convert import run_cli

NAME = "sa3_small_tiny_s0"
GROUP = 32  # the fixture DiT is 96 wide: groups of 32 reach every block layer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantized")
    out = {None: convert(REF / NAME, root / "fp32")}
    for bits in Q.BITS:
        out[bits] = convert(REF / NAME, root / f"int{bits}", quantize=bits, group_size=GROUP)
    return out


def _one_euler_step(model, noise):
    cond = model.conditioning(["a warm pad", "drums"], [10.0, 10.0], length=noise.shape[-1])
    return np.asarray(model.sample(noise, cond, steps=1, sampler="euler"))


@pytest.mark.parametrize("bits", Q.BITS)
def test_quantized_model_within_stated_error_end_to_end(checkpoints, bits):
    meta = json.loads((checkpoints[bits] / "config.json").read_text())
    record = Q.QuantizationConfig.from_dict(meta["quantization"])
    assert (record.bits, record.group_size, record.mode) == (bits, GROUP, "affine") and record.layers
    reference, quantized = load_model(checkpoints[None]), load_model(checkpoints[bits])
    noise = np.random.default_rng(0).standard_normal((2, reference.latent_dim, 24)).astype(np.float32)
    x_ref, x_q = _one_euler_step(reference, noise), _one_euler_step(quantized, noise)
    bound = Q.expected_relative_error(bits, GROUP) * np.sqrt(len(record.layers))
    v_norm = np.linalg.norm(noise - x_ref)
    error = rel_err(x_q, x_ref)
    assert 0 < error <= bound * v_norm / np.linalg.norm(x_ref)


def test_quantized_file_is_smaller_and_records_layers(checkpoints):
    sizes = {b: (p / "dit.safetensors").stat().st_size for b, p in checkpoints.items()}
    assert sizes[None] > sizes[8] > sizes[4]
    stored = mx.load(str(checkpoints[8] / "dit.safetensors"))
    layers = json.loads((checkpoints[8] / "config.json").read_text())["quantization"]["layers"]
    for layer in layers:
        assert stored[layer + ".weight"].dtype == mx.uint32 and layer + ".scales" in stored
    assert "project_in.weight" in stored and stored["project_in.weight"].dtype == mx.float32


def test_cpu_dequantizes_gpu_path_keeps_quantized_layers(checkpoints):
    plain = load_dit(checkpoints[8])  # this machine's default device is the CPU: dequantized at load
    assert not any(isinstance(m, nn.QuantizedLinear) for _, m in plain.named_modules())
    assert all(v.dtype == mx.float32 for _, v in tree_flatten(plain.parameters()))
    kept = load_dit(checkpoints[8], keep_quantized=True)  # what a GPU loads
    assert any(isinstance(m, nn.QuantizedLinear) for _, m in kept.named_modules())
    io = np.load(REF / NAME / "io.npz")
    args = (io["x"], io["t"], io["cross_attn_cond"], io["global_cond"], io["local_add_cond"])
    # same rounded weights, two kernels: they agree to float32 accumulation error
    assert rel_err(kept(*args), plain(*args)) <= 1e-5


def test_torch_backend_dequantizes(checkpoints):
    pytest.importorskip("torch")
    io = np.load(REF / NAME / "io.npz")
    args = (io["x"], io["t"], io["cross_attn_cond"], io["global_cond"], io["local_add_cond"])
    mlx_model = load_dit(checkpoints[4])
    torch_model = load_model(checkpoints[4], backend="torch").dit
    assert rel_err(torch_model(*args), mlx_model(*args)) <= 1e-4  # the float32 backend parity of test_torch_backend


@pytest.mark.parametrize(
    "args,message",
    [
        (["--quantize", "3"], "bits must be one of 4, 8"),
        (["--quantize", "8", "--group-size", "48"], "group size must be one of 32, 64, 128"),
        (["--group-size", "32"], "--group-size applies only with --quantize"),
    ],
)
def test_convert_refuses_bad_settings(tmp_path, args, message):
    proc = run_cli(REF / NAME, tmp_path / "out", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_convert_refuses_quantizing_same(tmp_path):
    proc = run_cli(REF / "same_s_tiny_s0", tmp_path / "out", "--quantize", "8")
    assert proc.returncode == 2 and "SAME autoencoder" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
