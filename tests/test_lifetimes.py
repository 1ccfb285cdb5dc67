"""Component lifetimes: one-shot pipelines hold one network at a time, long-lived ones keep them, and plain
text-to-audio never reads the SAME encoder. Same outputs either way (the same arithmetic on the same weights)."""

import importlib.util

from mlx_sa3 import GenerationCancelled, StableAudio3, diagnosis, sampling
from mlx_sa3.checkpoint import DecoderFirstSAME
from mlx_sa3.model import load_model
from mlx_sa3.models.same import AutoencoderInterface
from mlx_sa3.pipeline import AudioEvent, StepEvent
from mlx_sa3.sampling import NonFiniteError

import mlx.core as mx
import numpy as np
import pytest

from .conftest import REF, fp32_tol, rel_err

CHECKPOINT = REF / "sa3_small_tiny_s0"
SR = 44100


def _run(pipe, **options):
    """Generate while recording which networks are resident at each kind of event."""
    seen = {}

    def callback(event):
        seen.setdefault(type(event).__name__, set()).update(pipe.model.loaded)
        return True

    out = pipe.generate("warm analog synth pad", duration=1.5, seed=3, steps=2, callback=callback, **options)
    return out, seen


def test_one_shot_pipeline_holds_one_network_per_stage():
    pipe = StableAudio3.from_pretrained(CHECKPOINT, keep_loaded=False)
    assert pipe.model.loaded == []  # nothing is read before it is needed
    out, seen = _run(pipe)
    assert seen[StepEvent.__name__] == {"dit"}
    assert seen[AudioEvent.__name__] == {"autoencoder"}
    assert pipe.model.loaded == []
    kept = StableAudio3.from_pretrained(CHECKPOINT)
    assert kept.model.loaded == ["text_encoder", "dit", "autoencoder"]
    reference, seen = _run(kept)
    assert seen[StepEvent.__name__] == {"text_encoder", "dit", "autoencoder"}
    assert kept.model.loaded == ["text_encoder", "dit", "autoencoder"]
    np.testing.assert_array_equal(out.audio, reference.audio)
    again, _ = _run(pipe)  # a released pipeline reloads what it needs
    np.testing.assert_array_equal(again.audio, reference.audio)


def test_same_encoder_read_only_for_audio_inputs():
    pipe = StableAudio3.from_pretrained(CHECKPOINT)
    autoencoder = pipe.model.autoencoder
    assert isinstance(autoencoder, DecoderFirstSAME)
    _run(pipe)
    assert not autoencoder.encoder_loaded
    eager = load_model(CHECKPOINT).autoencoder  # the default load_model keeps everything, as before
    t = np.arange(SR) / SR
    clip = (0.3 * np.stack([np.sin(2 * np.pi * 220 * t), np.cos(2 * np.pi * 220 * t)])).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(autoencoder.encode(clip[None])), np.asarray(eager.encode(clip[None])))
    assert autoencoder.encoder_loaded


def test_one_shot_audio_to_audio_matches_long_lived(tmp_path):
    t = np.arange(round(1.5 * SR)) / SR
    clip = (0.3 * np.stack([np.sin(2 * np.pi * 330 * t), np.cos(2 * np.pi * 330 * t)])).astype(np.float32)
    one_shot = StableAudio3.from_pretrained(CHECKPOINT, keep_loaded=False)
    out, seen = _run(one_shot, init_audio=(clip, SR), init_noise_level=0.5)
    assert seen[StepEvent.__name__] == {"dit"} and one_shot.model.loaded == []
    reference, _ = _run(StableAudio3.from_pretrained(CHECKPOINT), init_audio=(clip, SR), init_noise_level=0.5)
    np.testing.assert_array_equal(out.audio, reference.audio)


def test_lazy_model_loads_on_access_and_checks_up_front(tmp_path):
    model = load_model(CHECKPOINT, lazy=True)
    assert model.loaded == []
    assert model.downsampling_ratio == 4096 and model.loaded == []  # from the config, without the autoencoder
    assert model.dit is not None and model.loaded == ["dit"]
    model.release("dit")
    assert model.loaded == []
    with pytest.raises(ValueError, match="unknown component"):
        model.release("vae")


def test_cli_runs_one_shot(monkeypatch, tmp_path, capsys):
    from mlx_sa3 import generate

    calls = []
    original = StableAudio3.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(StableAudio3, "from_pretrained", classmethod(spy))
    out = tmp_path / "a.wav"
    args = ["--model", str(CHECKPOINT), "-p", "pad", "--duration", "1", "--steps", "1", "-o", str(out), "--quiet"]
    assert generate.main([*args, "--backend", "mlx"]) == 0 and out.exists()
    assert calls and calls[0]["keep_loaded"] is False
    assert "backend: mlx (requested)" in capsys.readouterr().out


def test_lazy_load_refuses_a_bad_dit_before_any_network_runs(tmp_path):
    from .test_convert import copy_fixture, rewrite_weights

    broken = copy_fixture("sa3_small_tiny_s0", tmp_path / "broken")
    rewrite_weights(broken, lambda t: t.pop("model.model.transformer.layers.0.self_attn.to_out.weight"))
    with pytest.raises(ValueError, match="DiT checkpoint does not match the model; missing 1"):
        StableAudio3.from_pretrained(broken, keep_loaded=False)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_text_embedding_stays_in_the_file(tmp_path, dtype):
    from mlx_sa3.checkpoint import MappedEmbedding, load_text_encoder
    from mlx_sa3.convert import convert
    from mlx_sa3.loading import open_source

    from mlx.utils import tree_flatten

    prompts = ["warm analog synth pad", "x"]
    for src in (CHECKPOINT, convert(CHECKPOINT, tmp_path / "c", dtype=dtype)):
        encoder = load_model(src, dtype="float32").text_encoder
        assert isinstance(encoder.model.embed_tokens, MappedEmbedding)
        assert not any(k.startswith("embed_tokens") for k, _ in tree_flatten(encoder.model.parameters()))
        source = open_source(src)
        weights = source.component("text_encoder") if source.converted else None
        resident = load_text_encoder(source.text_encoder_dir(), 16, weights=weights, map_embedding=False)
        assert not isinstance(resident.model.embed_tokens, MappedEmbedding)
        ids, _ = encoder.tokenizer(prompts)
        ids = mx.array(ids)[:, :16]
        # the same stored rows, cast the same way
        np.testing.assert_array_equal(
            np.asarray(encoder.model.embed_tokens(ids)), np.asarray(resident.model.embed_tokens(ids))
        )
        mapped, mask = encoder.encode(prompts)
        reference, ref_mask = resident.encode(prompts)
        np.testing.assert_array_equal(np.asarray(mask)[:, :16], np.asarray(ref_mask))
        # hidden states: equal up to float32 rounding, as 256 and 16 padded rows take different GEMM blockings
        config = encoder.model.config
        tol = fp32_tol(config.intermediate_size, k=4 * config.num_hidden_layers)
        assert rel_err(np.asarray(mapped)[:, :16], np.asarray(reference)) <= tol


@pytest.mark.parametrize("keep_loaded", [False, True])
def test_one_shot_runs_without_the_buffer_cache_and_restores_it(keep_loaded):
    """One-shot on the CPU: MLX's buffer cache is off during the generation (every event sees limit 0) and the
    caller's limit is back afterwards, also after a cancel; a long-lived pipeline leaves the cache alone."""

    def current_limit():
        limit = mx.set_cache_limit(0)
        mx.set_cache_limit(limit)
        return limit

    pipe = StableAudio3.from_pretrained(CHECKPOINT, keep_loaded=keep_loaded)
    before = mx.set_cache_limit(123 << 20)
    try:
        limits = set()
        pipe.generate("x", duration=1.0, seed=0, steps=2, callback=lambda e: limits.add(current_limit()))
        assert limits == ({123 << 20} if keep_loaded else {0}) and current_limit() == 123 << 20
        with pytest.raises(GenerationCancelled):
            pipe.generate("x", duration=1.0, seed=0, steps=2, callback=lambda e: False)
        assert current_limit() == 123 << 20
    finally:
        mx.set_cache_limit(before)


def _has_torch_backend() -> bool:
    return all(importlib.util.find_spec(name) for name in ("torch", "diffusers", "transformers"))


FAILURES = {  # where the NaNs appear -> the network resident then; the others are scanned one at a time
    "sampling": "dit",
    "decoding": "autoencoder",
}


@pytest.mark.parametrize("where", sorted(FAILURES))
@pytest.mark.parametrize(
    "backend", ["mlx", pytest.param("torch", marks=pytest.mark.skipif(not _has_torch_backend(), reason="no torch"))]
)
def test_a_failing_one_shot_generation_scans_one_network_at_a_time(backend, where, monkeypatch):
    """NaN/inf in one-shot use: the weight scan that explains them loads each released network alone and releases
    it again (a failure never holds more than a working run), and the networks not yet read in full (the torch SAME
    encoder before its first encode, on the meta device) do not stop it."""
    pipe = StableAudio3.from_pretrained(CHECKPOINT, backend=backend, keep_loaded=False)
    scanned = []
    scan = diagnosis.non_finite_tensors

    def spy(component):
        scanned.append(set(pipe.model.loaded))
        return scan(component)

    monkeypatch.setattr(diagnosis, "non_finite_tensors", spy)
    if where == "sampling":
        monkeypatch.setattr(sampling, "euler_update", lambda x, v, t, t_next: x * float("nan"))
    else:
        monkeypatch.setattr(
            AutoencoderInterface, "decode_stream", lambda self, z, *a, **k: iter([mx.full((1, 2, 4096), np.inf)])
        )
    with pytest.raises(NonFiniteError, match=f"^{where} produced non-finite values with finite inputs and weights"):
        pipe.generate("x", duration=1.0, seed=0, steps=2, sampler="euler")
    resident = FAILURES[where]
    assert scanned[:3] == [{resident, name} for name in ("dit", "autoencoder", "text_encoder")]
    assert pipe.model.loaded == []  # and the failed generation frees the network it held


def test_one_shot_releases_its_network_when_a_generation_stops_early():
    """A cancel mid-sampling, an error, or a stream its consumer leaves: in one-shot use no stage comes next, so
    the resident network is freed then (a long-lived pipeline keeps its networks)."""
    pipe = StableAudio3.from_pretrained(CHECKPOINT, keep_loaded=False)

    def cancel_at_first_step(event):
        return not isinstance(event, StepEvent)

    with pytest.raises(GenerationCancelled):
        pipe.generate("x", duration=1.0, seed=0, steps=2, callback=cancel_at_first_step)
    assert pipe.model.loaded == []
    stream = pipe.stream("x", duration=1.0, seed=0, steps=2)
    assert isinstance(next(stream), StepEvent) and pipe.model.loaded == ["dit"]
    stream.close()
    assert pipe.model.loaded == []
    kept = StableAudio3.from_pretrained(CHECKPOINT)
    with pytest.raises(GenerationCancelled):
        kept.generate("x", duration=1.0, seed=0, steps=2, callback=cancel_at_first_step)
    assert kept.model.loaded == ["text_encoder", "dit", "autoencoder"]
