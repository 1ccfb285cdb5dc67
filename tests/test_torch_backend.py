"""The torch CPU fallback: every official parity check of the MLX backend, run on the torch networks, plus
converted-weight loading, MLX vs torch on the demo model, and the missing-torch message."""

import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

import mlx_sa3
from mlx_sa3 import convert, demo, platform, same, torch_backend
from mlx_sa3 import torch_backend as tb
from mlx_sa3.dit import load_dit
from mlx_sa3.loading import CheckpointError, open_source
from mlx_sa3.pipeline import StableAudio3
from mlx_sa3.torch_backend import common
from mlx_sa3.torch_backend import same as tsame

from .conftest import EPS, REF, rel_err, stack_tol
from .conftest import dit_call as _call

SAME_FIXTURES = ["same_s_tiny_s0", "same_l_tiny_s0"]
SA3_FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]
CASES = ["t2a", "t2a_cfg3", "a2a_0.7", "inpaint_2regions"]
PARITY_TOL = 1e-4  # float32 torch against the float32 official torch fixtures
SAMPLING_TOL = 1e-3
STREAM_TOL = 1e-5  # decode_stream vs decode, relative to max|decode|


def prompt_max_length(source) -> int:
    configs = source.model_config["model"]["conditioning"]["configs"]
    return next(c for c in configs if c["id"] == "prompt")["config"]["max_length"]


def random_latents(latent_dim, length, seed):
    return np.random.default_rng(seed).standard_normal((2, latent_dim, length)).astype(np.float32)


@pytest.fixture(scope="module")
def autoencoders():
    return {name: torch_backend.load_torch_autoencoder(REF / name) for name in SAME_FIXTURES + SA3_FIXTURES}


@pytest.fixture(scope="module", params=SA3_FIXTURES)
def sa3(request):
    """A full SA3 model with the three torch networks and the shared conditioning glue."""
    return request.param, mlx_sa3.load_model(REF / request.param, backend="torch")


# ------------------------------------------------------------------------------------------------------------- SAME


@pytest.mark.parametrize("name", SAME_FIXTURES)
def test_same_runs_its_gemms_in_onednn_on_torch_threads(autoencoders, monkeypatch, name):
    """Encode and decode call every linear through ``common.linear`` (oneDNN) on torch's default thread count, with
    the preloaded OpenBLAS (if any) on one thread: under the float32 policy alone (torch on one thread) the
    decoder's convolutions, attention and elementwise ops ran single-threaded (measured 1.2x slower at 10 s)."""
    if common.onednn_linear() is None:
        pytest.skip("this torch has no oneDNN linear")
    seen, real, blas = [], tsame.linear, platform._openblas()

    def spy(x, layer):
        seen.append((torch.get_num_threads(), blas.openblas_get_num_threads() if blas else None))
        return real(x, layer)

    monkeypatch.setattr(tsame, "linear", spy)
    monkeypatch.setattr(common, "linear", spy)  # the feed-forward's (common.glu_feed_forward)
    io = np.load(REF / name / "io.npz")
    ae = autoencoders[name]
    ae.decode(ae.encode(io["encode_in_audio"]))
    blocks = sum(len(part.blocks) for part in (ae.net.encoder, ae.net.decoder))
    assert len(seen) >= 4 * blocks + 2  # qkv, out, ff in/out per block; to_latent and from_latent
    threads = {t for t, _ in seen}
    assert threads == {platform.torch_default_threads}
    assert {b for _, b in seen} <= {None, 1}


@pytest.mark.parametrize("name", SAME_FIXTURES)
def test_same_matches_official_fixture(autoencoders, name):
    io = np.load(REF / name / "io.npz")
    ae = autoencoders[name]
    latents = ae.encode(io["encode_in_audio"])
    audio = ae.decode(io["decode_in_latents"])
    assert isinstance(latents, mx.array) and isinstance(audio, mx.array)
    assert rel_err(latents, io["encode_out_latents"]) <= PARITY_TOL
    assert rel_err(audio, io["decode_out_audio"]) <= PARITY_TOL
    # MLX and torch inputs are accepted as well as numpy
    assert rel_err(ae.decode(mx.array(io["decode_in_latents"])), io["decode_out_audio"]) <= PARITY_TOL
    assert rel_err(ae.encode(torch.from_numpy(io["encode_in_audio"])), io["encode_out_latents"]) <= PARITY_TOL


@pytest.mark.parametrize("name", SAME_FIXTURES + SA3_FIXTURES)
def test_same_matches_mlx_on_odd_lengths(autoencoders, name):
    """Padding rules (odd latent counts for SAME-S, partial patches) and the SA3 repos' pretransform component."""
    ae, reference = autoencoders[name], same.load_autoencoder(REF / name)
    assert (ae.sample_rate, ae.latent_dim, ae.downsampling_ratio) == (
        reference.sample_rate,
        reference.latent_dim,
        reference.downsampling_ratio,
    )
    z = random_latents(ae.latent_dim, 11, seed=1)
    assert rel_err(ae.decode(z), reference.decode(z)) <= PARITY_TOL
    audio = (0.3 * np.random.default_rng(2).standard_normal((2, 2, 5 * 4096 + 1000))).astype(np.float32)
    assert rel_err(ae.encode(audio), reference.encode(audio)) <= PARITY_TOL


@pytest.mark.parametrize("name", SAME_FIXTURES + SA3_FIXTURES)
@pytest.mark.parametrize("chunk", [1, 3, 7, "whole"])
def test_same_stream_equals_decode(autoencoders, name, chunk):
    ae = autoencoders[name]
    length = 29  # odd (SAME-S pads), several cut margins long, not a multiple of any chunk size
    z = random_latents(ae.latent_dim, length, seed=7)
    full = np.array(ae.decode(z))
    size = length if chunk == "whole" else chunk
    pieces = list(ae.decode_stream(z, chunk_latents=size))
    assert all(isinstance(p, mx.array) for p in pieces)
    assert [p.shape[-1] for p in pieces[:-1]] == [size * ae.downsampling_ratio] * (len(pieces) - 1)
    streamed = np.concatenate([np.array(p) for p in pieces], axis=-1)
    assert streamed.shape == full.shape == (2, 2, length * ae.downsampling_ratio)
    assert np.abs(streamed - full).max() <= STREAM_TOL * np.abs(full).max()


def test_same_noise_regularize_matches_mlx(autoencoders):
    """The seeded latent noise is drawn by MLX on both backends, so it is the same noise."""
    name = "same_l_tiny_s0"
    ae, reference = autoencoders[name], same.load_autoencoder(REF / name)
    z = random_latents(ae.latent_dim, 9, seed=9)
    noisy = np.array(ae.decode(z, noise_regularize=True, seed=3))
    assert rel_err(noisy, reference.decode(z, noise_regularize=True, seed=3)) <= PARITY_TOL
    assert rel_err(noisy, ae.decode(z)) > 1e-4


def test_same_strict_loading(tmp_path):
    source = open_source(REF / "same_s_tiny_s0")
    tensors = source.component("autoencoder")
    tensors.pop("decoder.layers.3.transformers.1.ff.ff.2.bias")
    mx.save_safetensors(str(tmp_path / "model.safetensors"), tensors)
    (tmp_path / "model_config.json").write_text((REF / "same_s_tiny_s0" / "model_config.json").read_text())
    with pytest.raises(CheckpointError, match=r"decoder\.blocks\.1\.ff\.proj_out\.bias"):
        torch_backend.load_torch_autoencoder(tmp_path)


# -------------------------------------------------------------------------------------------------------------- DiT


@pytest.fixture(scope="module", params=SA3_FIXTURES)
def dit_fixture(request):
    return (
        torch_backend.load_torch_dit(REF / request.param),
        load_dit(REF / request.param),
        dict(np.load(REF / request.param / "io.npz")),
    )


# Parity of TorchDiT with the official io.npz runs in test_dit.py (parametrized over both backends).


def test_dit_interface(dit_fixture):
    model, reference, io = dit_fixture
    assert model.dtype == mx.float32 and model.config == reference.config
    prepared = model.prepare(io["cross_attn_cond"], io["global_cond"], io["local_add_cond"], cfg=True)
    for t in (io["t"], 0.5):
        stepped = np.array(model.step(mx.array(io["x"]), t, prepared, cfg_scale=3.0))
        called = _call(model, {**io, "t": t}, local_add_cond=io["local_add_cond"], cfg_scale=3.0)
        assert rel_err(stepped, called) <= stack_tol(model.config.embed_dim, model.config.depth, cfg_scale=3.0)


def test_dit_negative_prompt_matches_mlx(dit_fixture):
    """Negative prompts (zeroed where masked out) and guidance options agree with the MLX DiT."""
    model, reference, io = dit_fixture
    c = io["cross_attn_cond"]
    mask = np.ones(c.shape[:2], bool)
    mask[:, 5:] = False
    kw = dict(
        local_add_cond=io["local_add_cond"],
        cfg_scale=4.0,
        apg_scale=0.5,
        negative_cross_attn_cond=np.ascontiguousarray(c[::-1]),
        negative_cross_attn_mask=mask,
        scale_phi=0.3,
    )
    expected = _call(reference, io, **kw)
    assert rel_err(_call(model, io, **kw), expected) <= PARITY_TOL
    assert rel_err(_call(model, io, **{**kw, "negative_cross_attn_mask": None}), expected) > 1e-3


def test_dit_rejects_half_precision():
    with pytest.raises(ValueError, match="float32"):
        torch_backend.load_torch_dit(REF / SA3_FIXTURES[0], dtype="float16")


# ----------------------------------------------------------------------------------------------------- text encoder


def test_text_encoder_matches_official_conditioner(sa3):
    name, model = sa3
    golden = np.load(REF / name / "pipeline.npz")
    hidden, mask = model.text_encoder.encode([str(p) for p in golden["prompts"]])
    assert hidden.dtype == mx.float32 and mask.dtype == mx.bool_
    assert model.text_encoder.max_length == golden["prompt_mask"].shape[1]
    assert model.text_encoder.model.config._attn_implementation == "eager"
    emb = mx.where(mask[..., None], hidden, model.conditioners.padding_embedding)
    np.testing.assert_array_equal(np.array(mask), golden["prompt_mask"].astype(bool))
    assert rel_err(emb, golden["prompt_embedding"]) <= PARITY_TOL


# ------------------------------------------------------------------------------------------------------ end to end
# Conditioning and Euler sampling against pipeline.npz run on both backends in test_model_sampling.py.


@pytest.mark.parametrize("name", SA3_FIXTURES)
def test_converted_weights_load(tmp_path, name):
    out = convert.convert(REF / name, tmp_path / "out")
    source = open_source(out)
    assert source.converted
    io = dict(np.load(REF / name / "io.npz"))
    dit = torch_backend.load_torch_dit(source)
    assert rel_err(_call(dit, io, local_add_cond=np.zeros_like(io["local_add_cond"])), io["v_plain"]) <= PARITY_TOL
    golden = np.load(REF / name / "pipeline.npz")
    text = torch_backend.load_torch_text_encoder(source, prompt_max_length(source))
    hidden, mask = text.encode([str(p) for p in golden["prompts"]])
    padding = source.component("conditioners")["prompt.padding_embedding"]
    assert rel_err(mx.where(mask[..., None], hidden, padding), golden["prompt_embedding"]) <= PARITY_TOL
    z = random_latents(source.model_config["model"]["io_channels"], 5, seed=10)
    original = torch_backend.load_torch_autoencoder(REF / name)
    layers = original.config.encoder.depth + original.config.decoder.depth
    # the same weights (folded differently by the converter) through the same layers: a few float32 roundings each
    tol = 8 * EPS["float32"] * np.sqrt(layers)
    assert rel_err(torch_backend.load_torch_autoencoder(source).decode(z), original.decode(z)) <= tol


@pytest.mark.filterwarnings("ignore:cfg_scale")  # guidance on the distilled-style demo config is on purpose
def test_demo_model_mlx_and_torch_agree():
    """A short generation through the shared pipeline (conditioning, Euler, a2a encode, streamed decode)."""
    mlx_model = demo.demo_model(dtype="float32")
    torch_model = demo.to_torch_backend(mlx_model)
    assert torch_model.text_encoder.tokenizer is mlx_model.text_encoder.tokenizer
    init = (0.3 * np.random.default_rng(4).standard_normal((2, 3 * 44100))).astype(np.float32)
    outputs = [
        StableAudio3(m).generate(
            "warm analog synth pad",
            duration=2.0,
            seed=5,
            steps=3,
            sampler="euler",
            cfg_scale=2.0,
            init_audio=init,
            init_noise_level=0.8,
        )
        for m in (mlx_model, torch_model)
    ]
    expected, got = outputs
    assert got.audio.shape == expected.audio.shape == (1, 2, 2 * 44100)
    assert rel_err(got.latents, expected.latents) <= SAMPLING_TOL
    assert rel_err(got.audio, expected.audio) <= SAMPLING_TOL


# ---------------------------------------------------------------------------------------------------- installation


def test_missing_torch_names_the_install_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` sees when it is not installed
    with pytest.raises(ImportError, match=r'pip install "mlx_sa3\[torch\]"'):
        torch_backend.require_torch()
    monkeypatch.undo()
    with pytest.raises(ImportError, match=r'pip install "mlx_sa3\[torch\]"'):
        torch_backend.require_torch("diffusers.models.no_such_module")


def test_importing_mlx_sa3_does_not_import_torch():
    code = "import sys, mlx_sa3, mlx_sa3.torch_backend; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_loaders_take_the_torch_backend():
    model = mlx_sa3.load_model(REF / "sa3_medium_tiny_s0", backend="torch")
    assert isinstance(model.dit, tb.TorchDiT) and isinstance(model.text_encoder, tb.TorchTextEncoder)
    assert isinstance(model.autoencoder, tb.TorchAutoencoder)
    assert isinstance(mlx_sa3.load_autoencoder(REF / "same_s_tiny_s0", backend="torch"), tb.TorchAutoencoder)
    with pytest.raises(ValueError, match="unknown backend"):
        mlx_sa3.load_model(REF / "sa3_medium_tiny_s0", backend="jax")


def test_pipeline_backends_agree_on_demo_generation():
    """The same request through StableAudio3 on both backends: every mode path, shared sampling and decoding code."""
    mlx_pipe = mlx_sa3.StableAudio3.from_pretrained("demo")
    torch_pipe = mlx_sa3.StableAudio3.from_pretrained("demo", backend="torch")
    clip = (np.random.default_rng(0).standard_normal((2, 3 * 44100)) * 0.1).astype(np.float32)
    request = dict(
        duration=3.0,
        seed=9,
        steps=4,
        sampler="pingpong",
        init_audio=(clip, 44100),
        init_noise_level=0.8,
        inpaint_audio=(clip, 44100),
        inpaint_regions=[(1.0, 2.0)],
    )
    a = mlx_pipe.generate("bells", **request)
    b = torch_pipe.generate("bells", **request)
    assert rel_err(b.latents, a.latents) <= 1e-3
    assert rel_err(b.audio, a.audio) <= 1e-3


def test_diffusers_modules_import_without_their_eager_package_init():
    # The stand-in package is gone afterwards: a later plain import runs the real __init__ and finds the same module.
    code = (
        "import sys, mlx_sa3.torch_backend.common as c\n"
        "_, dit = c.require_torch('diffusers.models.transformers.transformer_stable_audio3')\n"
        "assert 'diffusers.models.transformers' not in sys.modules\n"
        "assert not hasattr(sys.modules['diffusers.models'], 'transformers') or "
        "sys.modules['diffusers.models'].transformers.__file__\n"
        "import diffusers.models.transformers as package\n"
        "assert package.StableAudio3DiTModel is dit.StableAudio3DiTModel\n"
        "assert package.__file__.endswith('__init__.py')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_eager_package_import_falls_back_to_the_plain_import(monkeypatch):
    from mlx_sa3.torch_backend import common

    def broken(name, package):
        raise RuntimeError("unexpected package layout")

    monkeypatch.setattr(common, "_import_past_package_init", broken)
    monkeypatch.delitem(sys.modules, "diffusers.models.autoencoders", raising=False)
    # earlier tests imported the module itself: without this the import is a sys.modules hit that runs no package
    monkeypatch.delitem(sys.modules, "diffusers.models.autoencoders.autoencoder_same", raising=False)
    _, same = common.require_torch("diffusers.models.autoencoders.autoencoder_same")
    assert same.__name__ == "diffusers.models.autoencoders.autoencoder_same"
    assert "diffusers.models.autoencoders" in sys.modules  # the plain import ran the package's __init__
