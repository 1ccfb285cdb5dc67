"""StableAudio3 on the in-process demo model: every mode, lengths, masks, events, cancellation, bad input."""

import math
import os

from mlx_sa3 import AudioError, GenerationCancelled, StableAudio3
from mlx_sa3.pipeline import AudioEvent, DoneEvent, StepEvent
from mlx_sa3.sampling import NonFiniteError

import mlx.core as mx
import numpy as np
import pytest
import soundfile as sf

SR = 44100


@pytest.fixture(scope="module")
def pipe():
    return StableAudio3.from_pretrained("demo")


def clip(seconds: float, freq: float = 220.0) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return np.stack([np.sin(2 * np.pi * freq * t), np.cos(2 * np.pi * freq * t)]).astype(np.float32) * 0.3


@pytest.mark.parametrize("duration", [1.0, 2.3456, 7.77])
def test_text_to_audio_exact_length(pipe, duration):
    out = pipe.generate("warm analog synth pad", duration=duration, seed=3, steps=2)
    assert out.audio.shape == (1, 2, round(duration * SR))
    assert out.sample_rate == SR and out.seed == 3
    assert np.isfinite(out.audio).all() and np.abs(out.audio).max() <= 1.0
    # DiT length: ceil(duration) in latents + 6 s of headroom (official valid region)
    assert out.latents.shape[-1] == math.ceil(int(duration * SR) / 4096) + int(6 * SR / 4096)


def test_seed_and_injected_noise_reproduce(pipe):
    a = pipe.generate("rain", duration=1.5, seed=11, steps=3)
    b = pipe.generate("rain", duration=1.5, seed=11, steps=3)
    c = pipe.generate("rain", duration=1.5, seed=12, steps=3)
    np.testing.assert_array_equal(a.audio, b.audio)
    assert np.abs(a.audio - c.audio).max() > 1e-4
    noise = np.random.default_rng(0).standard_normal(a.latents.shape).astype(np.float32)
    d = pipe.generate("rain", duration=1.5, seed=5, noise=noise, steps=3, sampler="euler")
    e = pipe.generate("rain", duration=1.5, seed=6, noise=noise, steps=3, sampler="euler")
    np.testing.assert_array_equal(d.audio, e.audio)  # euler is deterministic given the noise
    with pytest.raises(ValueError, match="noise must have shape"):
        pipe.generate("rain", duration=1.5, noise=noise[:, :, :-1])


def test_batch_and_prompt_list(pipe):
    out = pipe.generate(["a", "b"], duration=1.0, batch_size=2, seed=1, steps=2)
    assert out.audio.shape == (2, 2, SR)
    assert np.abs(out.audio[0] - out.audio[1]).max() > 1e-5
    with pytest.raises(ValueError, match="2 prompts for batch size 3"):
        pipe.generate(["a", "b"], duration=1.0, batch_size=3)


def test_audio_to_audio_from_array_and_path(pipe, tmp_path):
    src = clip(2.0)
    path = tmp_path / "in.wav"
    sf.write(path, src.T, SR)
    a = pipe.generate("jazz", duration=2.0, init_audio=(src, SR), init_noise_level=0.5, seed=2, steps=3)
    b = pipe.generate("jazz", duration=2.0, init_audio=str(path), init_noise_level=0.5, seed=2, steps=3)
    assert a.audio.shape == (1, 2, 2 * SR)
    np.testing.assert_allclose(a.audio, b.audio, atol=1e-4)  # wav round trip quantisation only
    plan = pipe.plan("jazz", duration=2.0, init_audio=(src, SR), init_noise_level=0.5, seed=2)
    encoded = pipe.model.autoencoder.encode(np.pad(src, ((0, 0), (0, plan.length * 4096 - src.shape[1])))[None])
    np.testing.assert_allclose(np.asarray(plan.init_latents), np.asarray(encoded), atol=1e-5)


def test_inpaint_mask_follows_official_rounding(pipe):
    src = clip(6.0)
    plan = pipe.plan("fill", duration=5.0, inpaint_audio=(src, SR), inpaint_regions=[(1.0, 1.5), (3.2, 4.0)])
    mask = np.asarray(plan.inpaint_mask)[0, 0]
    expected = np.ones(plan.length)
    for start, end in [(1.0, 1.5), (3.2, 4.0)]:
        expected[math.ceil(int(start * SR) / 4096) : math.ceil(int(end * SR) / 4096)] = 0
    expected[math.ceil(int(5.0 * SR) / 4096) :] = 0  # past the duration is always generated
    np.testing.assert_array_equal(mask, expected)
    out = pipe.generate(
        "fill", duration=5.0, inpaint_audio=(src, SR), inpaint_regions=[(1.0, 1.5), (3.2, 4.0)], seed=1, steps=2
    )
    assert out.audio.shape == (1, 2, 5 * SR)


def test_continuation_and_a2a_with_inpainting(pipe):
    src = clip(1.0)
    plan = pipe.plan("more", duration=3.0, inpaint_audio=(src, SR))
    mask = np.asarray(plan.inpaint_mask)[0, 0]
    kept = math.ceil(SR / 4096)
    assert mask[:kept].all() and not mask[kept:].any()
    out = pipe.generate(
        "more",
        duration=3.0,
        inpaint_audio=(src, SR),
        init_audio=(clip(3.0, 440.0), SR),
        init_noise_level=0.8,
        seed=4,
        steps=2,
    )
    assert out.audio.shape == (1, 2, 3 * SR)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(prompt=""), "non-empty prompt"),
        (dict(duration=0), "positive number"),
        (dict(duration=-1), "positive number"),
        (dict(duration=1e4), "too long: this model makes at most 47.554 s"),
        (dict(sampler="heun"), "unknown sampler"),
        (dict(steps=0), "steps must be at least 1"),
        (dict(init_noise_level=0.0, init_audio=(np.zeros((2, 100)), SR)), "init noise level"),
        (dict(inpaint_regions=[(2.0, 1.0)], inpaint_audio=(np.zeros((2, SR)), SR)), "0 <= start < end"),
        (dict(inpaint_regions=[(1.0, 9.0)], inpaint_audio=(np.zeros((2, SR)), SR)), "outside"),
        (dict(inpaint_regions=[(0.5, 1.0)]), "need inpaint audio"),
        (dict(inpaint_audio=(np.zeros((2, 5 * SR)), SR)), "does not extend it"),
        (dict(init_audio=(np.zeros((3, 100)), SR)), "3 channels"),
    ],
)
def test_bad_input_is_refused(pipe, kwargs, message):
    kwargs = {"prompt": "x", "duration": 2.0, **kwargs}
    with pytest.raises((ValueError, AudioError), match=message):
        pipe.generate(**kwargs)


def test_cfg_on_distilled_model_warns(pipe):
    with pytest.warns(UserWarning, match="guidance-distilled"):
        pipe.plan("x", duration=1.0, cfg_scale=3.0)


def test_negative_prompt_needs_guidance(pipe):
    with pytest.warns(UserWarning, match="no effect with cfg_scale 1"):
        plan = pipe.plan("x", duration=1.0, negative_prompt="noise")
    assert plan.negative_prompts is None
    with pytest.warns(UserWarning, match="guidance-distilled"):
        plan = pipe.plan("x", duration=1.0, negative_prompt="noise", cfg_scale=2.0)
    assert plan.negative_prompts == ["noise"]
    with pytest.warns(UserWarning):
        guided = pipe.generate("x", duration=1.0, negative_prompt="noise", cfg_scale=2.0, seed=1, steps=2)
        plain = pipe.generate("x", duration=1.0, cfg_scale=2.0, seed=1, steps=2)
    assert np.abs(guided.audio - plain.audio).max() > 1e-6  # the negative context replaced the zero context


def test_stream_event_order_and_pieces(pipe):
    events = list(pipe.stream("x", duration=3.0, steps=3, seed=0, chunk_latents=8))
    kinds = [type(e) for e in events]
    assert kinds[:3] == [StepEvent] * 3 and kinds[-1] is DoneEvent
    pieces = [e for e in events if isinstance(e, AudioEvent)]
    assert len(pieces) > 1 and sum(p.audio.shape[-1] for p in pieces) == 3 * SR
    assert [p.offset for p in pieces] == list(np.cumsum([0] + [p.audio.shape[-1] for p in pieces[:-1]]))
    whole = pipe.generate("x", duration=3.0, steps=3, seed=0)
    np.testing.assert_allclose(np.concatenate([p.audio for p in pieces], -1), whole.audio, atol=1e-5)


def test_decoding_stops_at_the_kept_audio(pipe, monkeypatch):
    """The DiT's 6 s headroom is never decoded: no decode window reaches past the kept latents' cut margin."""
    ae = pipe.model.autoencoder
    windows = []
    decode_window = type(ae)._decode_window

    def spy(self, z, *window):
        windows.append((z.shape[1], *window))
        return decode_window(self, z, *window)

    monkeypatch.setattr(type(ae), "_decode_window", spy)
    out = pipe.generate("x", duration=2.0, steps=2, seed=0)
    kept = -(-2 * SR // ae.downsampling_ratio)
    multiple = ae.config.decoder.latent_multiple
    reach = -(-(kept + ae.config.decoder.cut_margin[1]) // multiple) * multiple
    assert windows and windows[0][0] == out.latents.shape[-1] > reach  # the canvas has headroom past the reach
    assert max(w[2] for w in windows) <= reach and windows[-1][4] == kept


def test_generate_to_file_streams_exact_length(pipe, tmp_path):
    out = pipe.generate_to_file(tmp_path / "a.flac", "x", duration=2.5, seed=1, steps=2)
    data, sr = sf.read(out.paths[0], dtype="float32", always_2d=True)
    assert sr == SR and data.shape == (round(2.5 * SR), 2)
    ref = pipe.generate("x", duration=2.5, seed=1, steps=2)
    np.testing.assert_allclose(data.T, ref.audio[0], atol=2e-6)  # 24-bit flac
    assert sorted(os.listdir(tmp_path)) == ["a.flac"]


def test_cancel_leaves_nothing(pipe, tmp_path):
    target = tmp_path / "c.wav"
    seen = []

    def cancel_at_second_step(event):
        seen.append(event.stage)
        return not (event.stage == "sampling" and event.index == 1)

    with pytest.raises(GenerationCancelled):
        pipe.generate_to_file(target, "x", duration=2.0, steps=4, callback=cancel_at_second_step)
    assert seen == ["sampling", "sampling"] and os.listdir(tmp_path) == []

    decoded = []

    def cancel_at_second_piece(event):
        if event.stage == "decoding":
            decoded.append(event.offset)
        return len(decoded) < 2

    with pytest.raises(GenerationCancelled):
        pipe.generate_to_file(target, "x", duration=6.0, steps=1, chunk_latents=8, callback=cancel_at_second_piece)
    assert len(decoded) == 2 and decoded[1] > 0  # the first piece was already on disk in the temporary file
    assert os.listdir(tmp_path) == []


def test_non_finite_sampling_is_reported_and_leaves_nothing(pipe, tmp_path, monkeypatch):
    monkeypatch.setattr(pipe.model.dit, "step", lambda x, t, prepared, **kw: mx.full(x.shape, float("nan")))
    with pytest.raises(NonFiniteError, match="non-finite"):
        pipe.generate_to_file(tmp_path / "n.wav", "x", duration=1.0, steps=2)
    assert os.listdir(tmp_path) == []


def test_original_and_converted_checkpoints_load_alike_without_a_hint(tmp_path, capsys):
    # Both layouts load equally fast now (memory-mapped, per tensor), so nothing nags the user to convert.
    from mlx_sa3.convert import convert

    from .conftest import REF

    original = StableAudio3.from_pretrained(REF / "sa3_small_tiny_s0")
    converted = StableAudio3.from_pretrained(convert(REF / "sa3_small_tiny_s0", tmp_path / "conv"))
    assert "hint" not in capsys.readouterr().err
    a = original.generate("a dog barking", duration=2.0, seed=0, steps=2)
    b = converted.generate("a dog barking", duration=2.0, seed=0, steps=2)
    assert a.audio.shape == (1, 2, 2 * SR)
    np.testing.assert_allclose(a.audio, b.audio, atol=1e-5)
