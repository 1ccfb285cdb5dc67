"""One validation path for input audio (file, (array, rate), bare array), durations with real limits, and the
diagnosis of non-finite results (input, checkpoint or sampling)."""

import os
import re
import warnings

from mlx_sa3.audio import SAMPLE_RATE, AudioError, check_duration, format_seconds, load_audio_input, read_audio
from mlx_sa3.loading import CheckpointError, resolve_source

import numpy as np
import pytest
import soundfile as sf

SR = SAMPLE_RATE


def tone(n, freq=440.0):
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / SR)).astype(np.float32)


# -- layouts and dtypes -----------------------------------------------------------------------------------------


def test_every_layout_gives_the_same_stereo():
    mono = tone(1000)
    stereo = np.stack([mono, mono])
    for given in (mono, mono[None], stereo, stereo.T, mono[:, None], (stereo, SR), (SR, stereo), (stereo.T, SR)):
        out = load_audio_input(given)
        assert out.shape == (2, 1000) and out.dtype == np.float32
        np.testing.assert_array_equal(out, stereo)


def test_integer_pcm_is_scaled_like_soundfile(tmp_path):
    pcm = (tone(2000) * 32767).astype(np.int16)
    path = tmp_path / "pcm16.wav"
    sf.write(path, pcm, SR, subtype="PCM_16")
    from_file = read_audio(path)
    np.testing.assert_array_equal(load_audio_input(pcm), from_file)  # exactly what reading the file gives
    np.testing.assert_array_equal(load_audio_input((pcm, SR))[0], pcm / 32768.0)
    np.testing.assert_array_equal(load_audio_input(np.array([0, 2**31 - 2**24], np.int32))[0], [0, 1 - 2**-7])
    np.testing.assert_array_equal(load_audio_input(np.array([0, 128, 255], np.uint8))[0], [-1, 0, 127 / 128])
    with pytest.raises(AudioError, match="unsupported sample type int64"):
        load_audio_input(np.zeros(10, np.int64))


@pytest.mark.parametrize(
    "given, words",
    [
        (np.zeros((3, 100), np.float32), "3 channels"),
        (np.zeros((100, 6), np.float32), "expected|channels"),
        (np.zeros((1, 2, 100), np.float32), "expected .samples,. or .channels, samples."),
        (np.zeros((2, 0), np.float32), "no samples"),
        (np.zeros(0, np.float32), "no samples"),
        ((np.zeros((2, 100)), 0), "positive"),
        ((np.zeros((2, 100)), -44100), "positive"),
        ((np.zeros((2, 100)), 22050.5), "whole number"),
        ((np.zeros((2, 100)), True), "pass a file path"),
        ((np.zeros((2, 100)),), "pass a file path"),
        (np.array(["a", "b"], dtype=object), "pass a file path"),
        (np.array([0.0, np.nan, np.inf], np.float32), "2 NaN or infinite samples .the first at sample 1."),
        (np.array([0.0, 1e39]), "1 NaN or infinite"),  # float64 beyond float32's range
    ],
)
def test_bad_arrays_are_refused(given, words):
    with pytest.raises(AudioError, match=words):
        load_audio_input(given, "init audio")


def test_an_input_that_is_not_a_regular_file_says_what_it_is(tmp_path):
    """A directory, FIFO or device given as audio is refused by kind (never opened: a FIFO would block), not
    reported as missing."""
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    for path, kind in ((tmp_path, "a directory"), (fifo, "a FIFO (named pipe)"), ("/dev/zero", "a character device")):
        with pytest.raises(AudioError, match=rf"^{re.escape(str(path))} is {re.escape(kind)}; an audio input must be"):
            read_audio(path)
    with pytest.raises(AudioError, match="no such file"):
        read_audio(tmp_path / "missing.wav")


def test_nan_in_an_input_file_names_the_file(tmp_path):
    path = tmp_path / "broken.wav"
    data = np.zeros((100, 2), np.float32)
    data[40, 1] = np.nan
    sf.write(path, data, SR, subtype="FLOAT")
    with pytest.raises(
        AudioError, match=r"broken.wav \(input file\): 1 NaN or infinite samples \(the first at sample 40\)"
    ):
        read_audio(path)


def test_too_short_to_resample_is_refused():
    with pytest.raises(AudioError, match="too short"):
        load_audio_input((np.zeros(1, np.float32), 8 * SR))


# -- durations --------------------------------------------------------------------------------------------------


def test_duration_limits_state_real_values():
    demo_canvas = 2097152  # the demo model's sample_size: 47.554... s
    assert check_duration(30, SR, demo_canvas) == 30 * SR
    assert check_duration(demo_canvas / SR, SR, demo_canvas) == demo_canvas
    with pytest.raises(ValueError, match=r"^duration 47.6 s is too long: this model makes at most 47.554 s$"):
        check_duration(47.6, SR, demo_canvas)
    with pytest.raises(ValueError, match=r"47.5545 s is too long: .* at most 47.554 s"):
        check_duration(47.5545, SR, demo_canvas)
    assert format_seconds(5292032 / SR) == "120" and format_seconds(16777216 / SR) == "380.435"
    with pytest.raises(ValueError, match=r"1e-05 s is less than one sample at 44100 Hz \(at least 2.27e-05 s\)"):
        check_duration(0.00001, SR)
    assert check_duration(2.27e-05, SR) == 1
    for bad in (0, -1, float("nan"), float("inf"), "x", None):
        with pytest.raises(ValueError, match="duration must be"):
            check_duration(bad, SR)


# -- the pipeline: init and inpaint audio take the same path ----------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    from mlx_sa3.pipeline import StableAudio3

    return StableAudio3.from_pretrained("demo")


@pytest.mark.parametrize(
    "options,words",
    [
        ({"prompt": 5}, "a prompt is a string or a list of strings, got int"),
        ({"prompt": ["a", 5], "batch_size": 2}, "got a list holding int"),
        ({"negative_prompt": 5, "cfg_scale": 2.0}, "a negative prompt is a string or a list of strings, got int"),
        ({"steps": 2.7}, "steps must be an integer, got 2.7"),
        ({"steps": "3"}, "steps must be an integer, got '3'"),
        ({"batch_size": 1.5}, "batch size must be an integer, got 1.5"),
        ({"batch_size": True}, "batch size must be an integer, got True"),
        ({"batch_size": 0}, r"batch size must be 1\.\.1024, got 0"),
        ({"batch_size": "two"}, "batch size must be an integer, got 'two'"),  # was int()'s "invalid literal"
        ({"batch_size": 10**20}, r"batch size must be 1\.\.1024, got 10+$"),  # was an OverflowError
        ({"batch_size": 10**9}, r"batch size must be 1\.\.1024"),  # was a list of 10**9 prompts, then the DiT
        ({"duration": []}, "at least one item"),
        ({"inpaint_audio": "AUDIO", "inpaint_regions": [(0.5,)]}, r"an inpaint region is \(start, end\) in seconds"),
        ({"inpaint_audio": "AUDIO", "inpaint_regions": [("a", 1)]}, "an inpaint region is"),
        # a bool or a string is not a number of seconds, a level or a scale (True made 1 s of audio)
        ({"duration": True}, "duration must be a number of seconds, got True"),
        ({"duration": "1"}, "duration must be a number of seconds, got '1'"),
        ({"init_audio": "AUDIO", "init_noise_level": True}, "init_noise_level must be a number, got True"),
        ({"sigma_max": "0.5"}, r"sigma_max \(--sigma-max\) must be a number, got '0.5'"),
        ({"apg_scale": True}, r"apg_scale \(--apg-scale\) must be a number, got True"),
        ({"cfg_scale": "2"}, r"cfg_scale \(--cfg-scale\) must be a number, got '2'"),
        ({"cfg_interval": ("0", "1")}, "cfg_interval"),
        ({"normalize": "peak", "ceiling_dbfs": "-1"}, "ceiling_dbfs must be a number, got '-1'"),
        ({"normalize": "loudness", "target_lufs": False}, "target_lufs must be a number, got False"),
        ({"inpaint_audio": "AUDIO", "inpaint_regions": [("0", "0.5")]}, "an inpaint region is"),
        ({"inpaint_audio": "AUDIO", "inpaint_regions": [(False, True)]}, "an inpaint region is"),
        # falsy or truthy stand-ins read as "the default" or "on"
        ({"sampler": 0}, "sampler must be a name"),
        ({"sampler": []}, "sampler must be a name"),
        ({"clamp": "no"}, "clamp must be True or False, got 'no'"),
        ({"clamp": None}, "clamp must be True or False, got None"),
        ({"negative_prompt": 5}, "a negative prompt is a string or a list of strings, got int"),  # with cfg 1 too
    ],
)
@pytest.mark.filterwarnings("ignore:cfg_scale")  # guidance on the distilled-style demo config is on purpose
def test_malformed_requests_are_refused_in_one_line(pipe, tmp_path, options, words):
    """Wrong types and shapes in a library request: a ValueError that says what is wrong, not a TypeError,
    IndexError or unpacking error from deep inside (and never a silent truncation of 2.7 steps)."""
    clip = tmp_path / "in.wav"
    sf.write(clip, np.stack([tone(SR), tone(SR)], axis=1), SR)
    options = {k: (str(clip) if v == "AUDIO" else v) for k, v in options.items()}
    request = {"prompt": "x", "duration": 1.0, "steps": 1, **options}
    with pytest.raises(ValueError, match=words):
        pipe.generate(**request)


def test_keep_loaded_is_a_flag():
    from mlx_sa3.pipeline import StableAudio3

    with pytest.raises(ValueError, match="keep_loaded must be True or False, got 'no'"):
        StableAudio3.from_pretrained("demo", keep_loaded="no")  # truthy: it kept everything loaded


def test_real_numbers_are_numbers_of_any_kind():
    from mlx_sa3.options import real_number

    import mlx.core as mx

    for value in (2, 2.0, np.float32(2.0), np.int64(2), mx.array(2.0), np.array(2.0)):
        assert real_number(value, "x") == 2.0 and type(real_number(value, "x")) is float
    for bad in (True, np.bool_(False), "2", b"2", None, [2.0], object()):
        with pytest.raises(ValueError, match="x must be a number, got "):
            real_number(bad, "x")


def test_a_prompt_longer_than_the_encoder_reads_is_named(pipe):
    # Truncation is the official behaviour; it is said, so a long prompt's ignored tail is not a mystery.
    budget = pipe.model.text_encoder.tokenizer.text_budget
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate("rain " * (2 * budget), duration=0.5, steps=1, seed=1)
        pipe.generate(["short", "rain " * (2 * budget)], duration=0.5, steps=1, seed=[1, 2])
    messages = [str(w.message) for w in caught if "text encoder reads" in str(w.message)]
    assert len(messages) == 2 and messages[0].startswith("a prompt is longer") and f"at most {budget}" in messages[0]
    assert messages[1].startswith("prompt 2 is longer")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.generate("rain", duration=0.5, steps=1, seed=1)


def test_a_warning_about_every_item_is_given_once(pipe):
    # Each item is planned alone: the same remark came once per item (ten prompts, ten identical lines).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pipe.generate(["a", "b", "c"], duration=0.5, steps=1, seed=[1, 2, 3], negative_prompt="n")
    remarks = [str(w.message) for w in caught]
    assert remarks.count("the negative prompt has no effect with cfg_scale 1") == 1, remarks


def test_plan_of_a_per_item_request_says_so(pipe):
    # plan() works out one batch; with per-item lists it said "got 2 prompts for batch size 1".
    with pytest.raises(ValueError, match=r"^plan\(\) plans one batch; this request has per-item lists \(2 items\)"):
        pipe.plan(["rain", "wind"], duration=1.0)
    assert len(pipe.plan(["rain", "wind"], duration=1.0, batch_size=2).prompts) == 2


def test_integral_floats_are_whole_numbers(pipe):
    """2.0 steps or a batch of 2.0 (as JSON may give them) are 2; seeds likewise."""
    plan = pipe.plan("x", duration=1.0, steps=2.0, batch_size=2.0, seed=3.0)
    assert (plan.steps, plan.seed, len(plan.prompts)) == (2, 3, 2)


def test_bare_init_audio_is_validated_like_inpaint_audio(pipe):
    stereo = np.stack([tone(SR), tone(SR, 660.0)])
    reference = pipe.plan("x", duration=1.0, init_audio=(stereo, SR), seed=1).init_latents
    for given in (stereo, stereo.T, (stereo * 32768).clip(-32768, 32767).astype(np.int16)):
        plan = pipe.plan("x", duration=1.0, init_audio=given, seed=1)
        np.testing.assert_allclose(np.array(plan.init_latents), np.array(reference), atol=1e-3)
    mono = tone(SR)
    np.testing.assert_allclose(
        np.array(pipe.plan("x", duration=1.0, init_audio=mono, seed=1).init_latents),
        np.array(pipe.plan("x", duration=1.0, init_audio=(mono, SR), seed=1).init_latents),
    )
    for key in ("init_audio", "inpaint_audio"):
        with pytest.raises(AudioError, match="NaN"):
            pipe.plan("x", duration=2.0, **{key: np.full((2, SR), np.nan, np.float32)})
        with pytest.raises(AudioError, match="3 channels"):
            pipe.plan("x", duration=2.0, **{key: np.zeros((3, SR), np.float32)})


# -- non-finite diagnosis ---------------------------------------------------------------------------------------


def poison_first(component):
    """Put a NaN in the first floating-point weight of an MLX module; returns its name."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    name, value = next((n, v) for n, v in tree_flatten(component.parameters()) if mx.issubdtype(v.dtype, mx.floating))
    poisoned = np.array(value)
    poisoned.flat[0] = np.nan
    component.load_weights([(name, mx.array(poisoned))], strict=False)
    return name


def test_diagnosis_names_the_broken_component():
    from mlx_sa3.demo import demo_model
    from mlx_sa3.diagnosis import broken_weights, explain_non_finite

    model = demo_model()
    healthy = explain_non_finite(model, dtype="float32")
    assert healthy.startswith("sampling produced non-finite values with finite inputs and weights")
    assert "--cfg-scale" in healthy and "--dtype float32" not in healthy
    assert "--dtype float32" in explain_non_finite(model, dtype="bfloat16")
    name = poison_first(model.dit)
    assert broken_weights(model) == {"DiT": [name]}
    message = explain_non_finite(model, "sampling", source="./sa3-small")
    assert message == (
        f"sampling produced non-finite values because the checkpoint ./sa3-small holds NaN/inf "
        f"weights (DiT: 1 tensors, e.g. {name}); re-download or re-convert it"
    )
    ae_name = poison_first(model.autoencoder)
    assert broken_weights(model) == {"DiT": [name], "SAME autoencoder": [ae_name]}


def test_diagnosis_on_the_torch_backend():
    torch = pytest.importorskip("torch")
    from mlx_sa3.demo import demo_model
    from mlx_sa3.diagnosis import broken_weights

    model = demo_model(backend="torch")
    assert broken_weights(model) == {}
    name, tensor = next(iter(model.autoencoder.net.state_dict().items()))
    with torch.no_grad():
        tensor.view(-1)[0] = float("inf")
    assert broken_weights(model) == {"SAME autoencoder": [f"net.{name}"]}


def test_a_model_path_that_is_not_a_directory_says_what_it_is(tmp_path):
    fifo, plain = tmp_path / "pipe", tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    plain.write_bytes(b"")
    for path, kind in ((fifo, "a FIFO (named pipe)"), (plain, "a file"), ("/dev/null", "a character device")):
        with pytest.raises(CheckpointError, match=rf"^{re.escape(str(path))} is {re.escape(kind)}; pass the directory"):
            resolve_source(path)
