"""The seams of the package: one backend-choosing place, the shared step's rules on both backends, the objective
check, and tiny-config models (shapes, dtypes, any length) that need neither torch nor the golden fixtures."""

import copy
import subprocess
import sys

from mlx_sa3 import demo
from mlx_sa3.checkpoint import CheckpointConfig
from mlx_sa3.loading import CheckpointError
from mlx_sa3.models.dit import DiT
from mlx_sa3.models.same import SAMEAutoencoder, stream_windows

import mlx.core as mx
import numpy as np
import pytest

BACKENDS = ["mlx", "torch"]


def _model(backend):
    if backend == "torch":
        pytest.importorskip("torch")
        pytest.importorskip("diffusers")
        pytest.importorskip("transformers")
    return demo.demo_model(dtype="float32", backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_negative_prompt_without_guidance_is_ignored(backend):
    """As officially (and as MLX always did): with cfg_scale 1 a negative prompt plays no part, on every backend."""
    model = _model(backend)
    noise = mx.random.normal((1, model.latent_dim, 12), key=mx.random.key(3))
    plain = model.conditioning(["rain"], [4.0], length=12)
    negative = model.conditioning(["rain"], [4.0], length=12, negative_prompts=["thunder"])
    a = model.sample(noise, plain, steps=2, sampler="euler", cfg_scale=1.0)
    b = model.sample(noise, negative, steps=2, sampler="euler", cfg_scale=1.0)
    assert np.array_equal(np.array(a), np.array(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_step_rules_are_shared(backend):
    """Batch and inpainting-length checks come from the one shared step."""
    model = _model(backend)
    cond = model.conditioning(["rain"], [4.0], length=12)
    local = np.zeros((1, model.latent_dim + 1, 12), np.float32)
    local[:, 0, :4] = 1
    prepared = model.dit.prepare(cond["cross_attn_cond"], cond["global_cond"], local)
    with pytest.raises(ValueError, match="prepared for 12"):
        model.dit.step(mx.zeros((1, model.latent_dim, 10)), 0.5, prepared)
    with pytest.raises(ValueError, match="batch"):
        model.dit.step(mx.zeros((2, model.latent_dim, 12)), 0.5, prepared)
    with pytest.raises(ValueError, match="cfg=True"):
        model.dit.step(mx.zeros((1, model.latent_dim, 12)), 0.5, prepared, cfg_scale=2.0)


def test_v_objective_is_refused_for_sampling():
    config = copy.deepcopy(demo.DEMO_CONFIG)
    config["model"]["diffusion"]["diffusion_objective"] = "v"
    parsed = CheckpointConfig.from_dict(config)
    with pytest.raises(CheckpointError, match="rectified-flow only"):
        parsed.check_sampleable()
    model = demo.demo_model(dtype="float32")
    model.config.diffusion_objective = "v"
    cond = model.conditioning(["rain"], [4.0], length=8)
    with pytest.raises(ValueError, match="rectified-flow only"):
        model.sample(mx.zeros((1, model.latent_dim, 8)), cond, steps=1)


def test_one_config_holds_every_part():
    parsed = CheckpointConfig.from_dict(demo.DEMO_CONFIG)
    assert parsed.dit.io_channels == parsed.same.latent_dim == parsed.sa3.io_channels == demo.LATENT_DIM
    assert parsed.dit.diffusion_objective == parsed.sa3.diffusion_objective == "rf_denoiser"
    same_only = CheckpointConfig.from_dict(
        {"model_type": "autoencoder", "model": demo.DEMO_CONFIG["model"]["pretransform"]["config"]}
    )
    assert same_only.dit is None and same_only.same == parsed.same


# ------------------------------------------------------------------------- tiny configs, no torch, no fixtures


@pytest.mark.parametrize("length", [1, 5, 12])
@pytest.mark.parametrize("dtype", [mx.float32, mx.float16])
def test_tiny_dit_shapes_and_dtypes(length, dtype):
    config = CheckpointConfig.from_dict(demo.DEMO_CONFIG).dit
    model = DiT(config)
    model.set_dtype(dtype)
    x = mx.random.normal((2, config.io_channels, length))
    c = mx.random.normal((2, 7, config.cond_token_dim))
    g = mx.random.normal((2, config.global_cond_dim))
    v = model(x, mx.array([0.3, 0.9]), c, g, cfg_scale=2.0)
    assert v.shape == x.shape and v.dtype == mx.float32
    assert bool(mx.all(mx.isfinite(v)))


@pytest.mark.parametrize("samples", [1, 4096, 3 * 4096 + 17])
def test_tiny_same_any_length_and_exact_streaming(samples):
    model = SAMEAutoencoder(CheckpointConfig.from_dict(demo.DEMO_CONFIG).same)
    audio = mx.random.normal((1, 2, samples), key=mx.random.key(1)) * 0.1
    z = model.encode(audio)
    assert z.shape == (1, model.latent_dim, -(-samples // 4096)) and z.dtype == mx.float32
    whole = model.decode(z)
    assert whole.shape == (1, 2, z.shape[2] * 4096) and whole.dtype == mx.float32
    pieces = mx.concatenate(list(model.decode_stream(z, chunk_latents=1)), axis=-1)
    assert np.allclose(np.array(pieces), np.array(whole), rtol=0, atol=1e-5)
    windows = stream_windows(model.config, z.shape[2], 1)
    assert [w[2] for w in windows] == list(range(z.shape[2]))


def test_only_the_backend_seam_imports_the_torch_backend():
    """No module outside mlx_sa3.torch_backend imports torch, and only mlx_sa3.backend imports the torch backend."""
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1] / "mlx_sa3"
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("torch_backend/"):
            continue
        text = path.read_text()
        if re.search(r"^\s*(import torch|from torch)\b", text, re.M):
            offenders.append(f"{rel}: imports torch")
        if rel != "backend.py" and re.search(r"torch_backend import|import torch_backend|from \.torch_backend", text):
            offenders.append(f"{rel}: imports the torch backend")
    assert not offenders, offenders


def test_package_imports_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import mlx_sa3, mlx_sa3.dit, mlx_sa3.same, mlx_sa3.t5gemma, mlx_sa3.model, mlx_sa3.convert, "
        "mlx_sa3.pipeline, mlx_sa3.generate, mlx_sa3.demo, mlx_sa3.info, mlx_sa3.torch_backend\n"
        "mlx_sa3.StableAudio3.from_pretrained('demo')"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("tokens", [1, 7, 40])
@pytest.mark.parametrize("dtype", [mx.float32, mx.bfloat16])
def test_tiny_t5gemma_shapes_and_dtypes(tokens, dtype):
    from mlx_sa3.models.t5gemma import T5GemmaConfig, T5GemmaEncoder

    config = T5GemmaConfig.from_dict(demo.DEMO_TEXT_CONFIG)
    model = T5GemmaEncoder(config)
    model.set_dtype(dtype)
    ids = mx.random.randint(0, config.vocab_size, (2, tokens), key=mx.random.key(0))
    mask = mx.arange(tokens)[None, :] < mx.array([[tokens], [max(1, tokens // 2)]])
    hidden = model(ids, mask)
    assert hidden.shape == (2, tokens, config.hidden_size) and hidden.dtype == dtype
    assert bool(mx.all(mx.isfinite(hidden.astype(mx.float32))))
