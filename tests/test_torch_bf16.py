"""bfloat16 compute on the torch backend (DiT and T5Gemma; SAME stays float32) against its float32 compute.

Tolerance (derived, not measured): every bfloat16 rounding (8 significant bits, round to nearest) errs by at most
u = 2^-8 relative, uniformly within its spacing, so by u / sqrt(3) RMS. The roundings along the network's path are
independent and add in quadrature, relative to the output's scale: ``u sqrt(r / 3)`` relative RMS error for ``r``
roundings. Counted per DiT block (each weight rounding and each rounded intermediate on the path):

* self-attention: normalised and modulated input (2), fused qkv weight and output (2), q/k norms and RoPE (2),
  attention output and the differential subtraction (2), output projection weight and output (2), gate product (1),
  residual sum (1): 12;
* cross-attention: normalised input (1), q weight and output (2), q norm (1), attention output and subtraction (2),
  output projection weight and output (2), residual sum (1): 9;
* feed-forward: normalised and modulated input (2), gated projection weight and output (2), SiLU and product (2),
  output projection weight and output (2), gate product (1), residual sum (1): 10;

plus 12 outside the blocks (the rounded input, the 1x1 convolutions and project_in/out: weight and output each,
the timestep and global embeddings). T5Gemma per layer: attention (pre-norm, q/k/v weights and outputs, softmax
probabilities, attention output, o_proj weight and output, post-norm, residual sum: 9) and MLP (pre-norm, gate/up
weights and outputs, GELU, product, down weight and output, post-norm, residual sum: 9), plus the embedding row,
the sqrt(hidden) scaling and the final norm (3). Guidance at scale s amplifies the branches' errors by 1 + 2|s|
(as ``conftest.stack_tol``). The metric is the relative RMS error over all outputs.
"""

import math
import subprocess
import sys

import mlx_sa3
from mlx_sa3 import backend, platform
from mlx_sa3 import torch_backend as tb
from mlx_sa3.pipeline import StableAudio3

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

from .conftest import BF16_U, REF, rel_rms
from .conftest import dit_call as _call
from .test_cli import REPO_ENV
from .test_t5gemma import PROMPTS

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]
DIT_BLOCK_ROUNDINGS = 12 + 9 + 10
DIT_OUTER_ROUNDINGS = 12
T5_LAYER_ROUNDINGS = 9 + 9
T5_OUTER_ROUNDINGS = 3


def bf16_rms_tol(roundings: int, cfg_scale: float = 1.0) -> float:
    guided = 1.0 if cfg_scale == 1.0 else 1.0 + 2.0 * abs(cfg_scale)
    return guided * BF16_U * math.sqrt(roundings / 3.0)


def dit_tol(config, cfg_scale: float = 1.0) -> float:
    return bf16_rms_tol(DIT_BLOCK_ROUNDINGS * config.depth + DIT_OUTER_ROUNDINGS, cfg_scale)


@pytest.fixture(scope="module", params=FIXTURES)
def dits(request):
    src = REF / request.param
    return tb.load_torch_dit(src), tb.load_torch_dit(src, dtype="bfloat16"), dict(np.load(src / "io.npz"))


# --------------------------------------------------------------------------------------------------------- DiT


def test_bf16_dit_holds_bf16_weights_and_float32_rope(dits):
    fp32, bf16, _ = dits
    assert fp32.dtype == mx.float32 and bf16.dtype == mx.bfloat16
    assert {p.dtype for p in bf16.net.parameters()} == {torch.bfloat16}
    # positions past 256 are not representable in bfloat16: the RoPE frequencies and angles stay float32
    assert bf16.net.rotary_pos_emb.inv_freq.dtype == torch.float32
    size = sum(p.numel() * p.element_size() for p in bf16.net.parameters())
    assert 2 * size == sum(p.numel() * p.element_size() for p in fp32.net.parameters())


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_bf16_dit_within_rounding_of_fp32(dits, cfg_scale):
    fp32, bf16, io = dits
    kw = dict(local_add_cond=io["local_add_cond"], cfg_scale=cfg_scale)
    ours, ref = _call(bf16, io, **kw), _call(fp32, io, **kw)  # dit_call checks: float32 MLX velocities
    err = rel_rms(ours, ref)
    assert BF16_U / 16 < err <= dit_tol(bf16.config, cfg_scale)  # > u/16: it really computed in bfloat16


def test_bf16_dit_plain_text_to_audio_within_rounding(dits):
    fp32, bf16, io = dits
    err = rel_rms(_call(bf16, io), _call(fp32, io))  # no local conditioning: the zeros made in bfloat16
    assert err <= dit_tol(bf16.config)


@pytest.mark.parametrize("fixture", FIXTURES)
def test_bf16_lora_merge_matches_official_within_rounding(fixture):
    """LoRA merging (``update_weights``) on the bfloat16 torch DiT: the merged float32 weights rounded once."""
    model = mlx_sa3.load_model(REF / fixture, backend="torch", dtype="bfloat16")
    io = dict(np.load(REF / fixture / "io.npz"))
    ref = np.load(REF / fixture / "lora.npz")
    args = dict(cross_attn_cond=io["cross_attn_cond"], global_cond=io["global_cond"])

    def v_plain():
        return np.array(model.dit(io["x"], io["t"], local_add_cond=np.zeros_like(io["local_add_cond"]), **args))

    base = v_plain()
    model.load_lora(REF / fixture / "lora" / "lora_r4.safetensors")
    got = v_plain()
    assert {p.dtype for p in model.dit.net.parameters()} == {torch.bfloat16}
    tol = dit_tol(model.dit.config)
    assert rel_rms(got, ref["lora_r4.v_plain"]) <= tol
    assert rel_rms(base, ref["lora_r4.v_plain"]) > 10 * tol  # the LoRA really acts
    model.unload_lora()
    np.testing.assert_array_equal(v_plain(), base)  # the base weights, rounded exactly as at load


def test_torch_rejects_float16_before_loading():
    with pytest.raises(ValueError, match="computes in float32 or bfloat16, got dtype float16"):
        tb.load_torch_dit(REF / FIXTURES[0], dtype="float16")
    with pytest.raises(ValueError, match="float32 or bfloat16"):
        mlx_sa3.load_model(REF / FIXTURES[0], backend="torch", dtype="float16", lazy=True)
    assert backend.check_dtype("bfloat16", "torch") == mx.bfloat16
    assert backend.check_dtype(None, "torch") == mx.float32
    # torch holds its weights in the compute dtype: only that storage is accepted there
    backend.check_weights_dtype("bfloat16", "bfloat16", "torch")
    with pytest.raises(ValueError, match="needs the MLX backend"):
        backend.check_weights_dtype("float32", "bfloat16", "torch")


# ------------------------------------------------------------------------------------------------ text encoder


@pytest.mark.parametrize("fixture", FIXTURES[:1])
def test_bf16_text_encoder_within_rounding_of_fp32(fixture):
    fp32 = tb.load_torch_text_encoder(REF / fixture, 64)
    bf16 = tb.load_torch_text_encoder(REF / fixture, 64, dtype="bfloat16")
    assert {p.dtype for p in bf16.model.parameters()} == {torch.bfloat16}
    assert bf16.model.encoder.rotary_emb.inv_freq.dtype == torch.float32
    hidden, mask = bf16.encode(PROMPTS)
    ref, ref_mask = fp32.encode(PROMPTS)
    assert hidden.dtype == mx.float32
    mask = np.array(mask)
    np.testing.assert_array_equal(mask, np.array(ref_mask))
    err = rel_rms(np.array(hidden)[mask], np.array(ref)[mask])
    layers = bf16.model.config.encoder.num_hidden_layers
    assert BF16_U / 16 < err <= bf16_rms_tol(T5_LAYER_ROUNDINGS * layers + T5_OUTER_ROUNDINGS)


# -------------------------------------------------------------------------------------- pipeline, CLI, threads


def test_pipeline_bf16_dit_and_text_encoder_keep_same_float32():
    pipe = StableAudio3.from_pretrained(REF / FIXTURES[0], backend="torch", dtype="bfloat16")
    assert pipe.model.dit.dtype == mx.bfloat16 and pipe.model.text_encoder.dtype == mx.bfloat16
    decoder = [p for name, p in pipe.model.autoencoder.net.named_parameters() if not name.startswith("encoder")]
    assert decoder and {p.dtype for p in decoder} == {torch.float32}  # SAME decodes in float32 always
    out = pipe.generate("warm pad", duration=1.0, steps=2, seed=0)
    assert out.latents.dtype == mx.float32 and np.isfinite(out.audio).all()


def test_cli_torch_bfloat16_writes_a_valid_file(tmp_path):
    out = tmp_path / "bf16.wav"
    command = [sys.executable, "-m", "mlx_sa3.generate", "--model", str(REF / FIXTURES[1]), "-p", "warm pad"]
    command += ["--duration", "1.5", "--steps", "2", "--seed", "3", "--backend", "torch", "--dtype", "bfloat16"]
    proc = subprocess.run([*command, "-o", str(out)], capture_output=True, text=True, timeout=300, env=REPO_ENV)
    assert proc.returncode == 0, proc.stderr
    data, sr = sf.read(out, dtype="float32", always_2d=True)
    assert sr == 44100 and data.shape == (round(1.5 * sr), 2) and np.isfinite(data).all() and np.abs(data).max() > 0
    assert "backend: torch" in proc.stdout
    # said before sampling, only where the CPU lacks bfloat16 matrix instructions
    assert ("warning: --dtype bfloat16 on a CPU without bfloat16" in proc.stderr) != platform.has_fast_bf16_matmul()


def test_slow_dtype_warning_names_the_slow_half_paths(monkeypatch):
    from mlx_sa3 import generate

    for fast in (True, False):
        monkeypatch.setattr(platform, "has_fast_bf16_matmul", lambda fast=fast: fast)
        warning = generate._slow_dtype_warning("torch", "bfloat16")
        assert (warning is None) == fast
        assert generate._slow_dtype_warning("torch", "float32") is None
        assert generate._slow_dtype_warning("torch", None) is None
    on_gpu = mx.default_device() != mx.cpu
    for dtype in ("float16", "bfloat16"):
        warning = generate._slow_dtype_warning("mlx", dtype)
        assert (warning is None) == on_gpu and (on_gpu or "--weights-dtype bfloat16" in warning)
    assert generate._slow_dtype_warning("mlx", "float32") is None


def test_cli_torch_float16_is_one_line_exit_2(tmp_path):
    command = [sys.executable, "-m", "mlx_sa3.generate", "--model", str(REF / FIXTURES[0]), "-p", "x"]
    command += ["--backend", "torch", "--dtype", "float16", "-o", str(tmp_path / "o.wav")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300, env=REPO_ENV)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if not line.startswith(("warning:", "note:"))]
    assert len(lines) == 1 and lines[0].startswith("error: the torch backend computes in float32 or bfloat16")
    assert not (tmp_path / "o.wav").exists() and "sampling" not in proc.stdout


def test_bf16_forward_runs_on_torch_default_threads():
    """bfloat16 GEMMs are torch's own (oneDNN), not the preloaded OpenBLAS: they get torch's threads, and the
    single-thread policy is back afterwards."""
    tb.require_torch()
    before = torch.get_num_threads()
    seen = []
    with tb.common.compute_threads(torch.bfloat16):
        tb.require_torch()  # the policy must not undo the block's setting
        seen.append(torch.get_num_threads())
    assert seen == [platform.torch_default_threads] and torch.get_num_threads() == before
    with tb.common.compute_threads(torch.float32):
        assert torch.get_num_threads() == before


def test_fast_bf16_detection_from_cpu_flags():
    assert platform.has_fast_bf16_matmul({"avx2", "amx_bf16", "amx_tile"}, machine="x86_64")
    assert platform.has_fast_bf16_matmul({"avx512f", "avx512_bf16"}, machine="x86_64")
    assert not platform.has_fast_bf16_matmul({"avx2", "avx512f", "fma"}, machine="x86_64")
    assert not platform.has_fast_bf16_matmul({"amx_bf16"}, machine="arm64")


def test_torch_bf16_gemm_rate_is_measured():
    rate = backend.torch_gemm_gflops(128, repeats=1, dtype="bfloat16")
    assert rate is not None and math.isfinite(rate) and rate > 0
