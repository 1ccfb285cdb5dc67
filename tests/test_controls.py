"""Issue 14 end to end on the demo model: guidance/schedule options, levels, normalisation, formats, --play."""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from mlx_sa3 import StableAudio3, generate, levels
from mlx_sa3.audio import WRITE_FORMATS, AudioError, read_tags, subtype_for
from mlx_sa3.models import diffusion
from mlx_sa3.pipeline import StepEvent
from mlx_sa3.sampling import build_schedule

import numpy as np
import pytest
import soundfile as sf

SR = 44100
REPO = Path(__file__).resolve().parents[1]
FP32_EPS = float(np.finfo(np.float32).eps)
# The demo config is guidance-distilled, so cfg != 1 warns; here guidance is exercised on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:cfg_scale .* guidance-distilled")


@pytest.fixture(scope="module")
def pipe():
    return StableAudio3.from_pretrained("demo")


def gen(pipe, **kw):
    options = {"duration": 2.0, "seed": 5, "steps": 3, "sampler": "euler", **kw}
    return pipe.generate("warm pad", **options)


def step_times(pipe, **kw):
    options = {"duration": 2.0, "seed": 5, "steps": 4, "sampler": "euler", **kw}
    return [e.t for e in pipe.stream("warm pad", **options) if isinstance(e, StepEvent)]


def available(fmt: str) -> bool:
    try:
        subtype_for(fmt)
        return True
    except AudioError:
        return False


# -- guidance and schedule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("headroom", [0.0, 2.5, 6.0])
def test_headroom_sets_the_dit_length(pipe, headroom):
    duration = 3.0
    valid = math.ceil(int(duration * SR) / 4096)
    expected = valid + int(headroom * SR / 4096)
    assert pipe.plan("x", duration, duration_padding_sec=headroom).length == expected
    out = gen(pipe, duration=duration, duration_padding_sec=headroom)
    assert out.latents.shape[-1] == expected and out.audio.shape == (1, 2, round(duration * SR))


def test_headroom_default_is_the_official_six_seconds(pipe):
    assert pipe.plan("x", 3.0).length == pipe.plan("x", 3.0, duration_padding_sec=6.0).length


def test_scale_phi_zero_and_threshold_neutral_values_are_bit_identical(pipe):
    base = gen(pipe, cfg_scale=3.0)
    for neutral in ({"scale_phi": 0.0}, {"cfg_norm_threshold": 0.0}, {"cfg_norm_threshold": math.inf}):
        np.testing.assert_array_equal(gen(pipe, cfg_scale=3.0, **neutral).audio, base.audio)
    assert not np.array_equal(gen(pipe, cfg_scale=3.0, scale_phi=0.7).audio, base.audio)
    assert not np.array_equal(gen(pipe, cfg_scale=3.0, cfg_norm_threshold=1e-3).audio, base.audio)


def test_apg_blend_lies_between_cfg_and_apg(pipe):
    outs = {a: gen(pipe, cfg_scale=3.0, apg_scale=a).latents for a in (0.0, 0.5, 1.0)}
    assert not np.array_equal(np.asarray(outs[0.5]), np.asarray(outs[0.0]))
    assert not np.array_equal(np.asarray(outs[0.5]), np.asarray(outs[1.0]))


def test_cfg_interval_guides_exactly_the_steps_inside_it(pipe, monkeypatch):
    guided = []
    real_guide = diffusion.guide

    def recording_guide(x, v_cond, v_uncond, sigma, *args):
        guided.append(float(sigma[0].item()))
        return real_guide(x, v_cond, v_uncond, sigma, *args)

    monkeypatch.setattr(diffusion, "guide", recording_guide)
    times = step_times(pipe, cfg_scale=3.0, cfg_interval=(0.3, 0.9))
    assert guided == pytest.approx([t for t in times if 0.3 <= t <= 0.9])
    assert 0 < len(guided) < len(times)  # the schedule has steps on both sides of the interval


def test_cfg_interval_outside_the_schedule_is_unguided(pipe):
    unguided = gen(pipe, cfg_scale=1.0)
    np.testing.assert_array_equal(gen(pipe, cfg_scale=3.0, cfg_interval=(0.0, 0.0)).audio, unguided.audio)
    assert not np.array_equal(gen(pipe, cfg_scale=3.0).audio, unguided.audio)


def test_sigma_max_starts_the_text_to_audio_schedule(pipe):
    length = pipe.plan("x", 2.0).schedule_length
    shift = pipe.model.config.sampling_shift
    assert step_times(pipe, sigma_max=0.6) == pytest.approx(list(build_schedule(4, 0.6, length, shift)[:-1]))
    assert step_times(pipe, sigma_max=1.0) == step_times(pipe)


def test_sigma_max_and_init_noise_level_must_agree(pipe):
    audio = (np.zeros((2, SR), np.float32), SR)
    with pytest.raises(ValueError, match="sigma_max"):
        pipe.plan("x", 1.0, init_audio=audio, init_noise_level=0.5, sigma_max=0.7)
    assert pipe.plan("x", 1.0, init_audio=audio, init_noise_level=0.5, sigma_max=0.5).init_noise_level == 0.5


def test_dist_shift_replaces_the_checkpoint_schedule(pipe):
    assert step_times(pipe, dist_shift="none") == pytest.approx(list(np.linspace(1, 0, 5, dtype=np.float32)[:-1]))
    assert step_times(pipe, dist_shift=None) == step_times(pipe)


def test_rk4_runs_end_to_end_and_differs_from_euler(pipe):
    rk4 = gen(pipe, sampler="rk4")
    assert np.isfinite(rk4.audio).all()
    assert not np.array_equal(rk4.audio, gen(pipe).audio)


@pytest.mark.parametrize(
    "option",
    [
        {"cfg_interval": (0.8, 0.2)},
        {"cfg_norm_threshold": -1},
        {"scale_phi": 1.5},
        {"apg_scale": 2},
        {"cfg_scale": float("nan")},
        {"cfg_scale": float("-inf")},
        {"sigma_max": 0},
        {"duration_padding_sec": -1},
        {"dist_shift": "warp"},
        {"normalize": "rms"},
        {"ceiling_dbfs": 3},
    ],
)
def test_bad_options_are_refused_at_planning(pipe, option):
    with pytest.raises(ValueError):
        pipe.plan("x", 1.0, **option)


# -- levels and normalisation -------------------------------------------------------------------------------------


@pytest.fixture
def loud(pipe, monkeypatch):
    """The demo decoder made 10x louder (+20 dB), so that the official clamp cuts."""
    ae = pipe.model.autoencoder
    real = ae.decode_stream

    def louder(*args, **kwargs):
        for piece in real(*args, **kwargs):
            yield piece * 10.0

    monkeypatch.setattr(ae, "decode_stream", louder)
    return pipe


def test_levels_report_the_raw_decoder_output(loud):
    raw = gen(loud, clamp=False)
    assert np.abs(raw.audio).max() > 1.0
    expected = levels.measure(raw.audio[0], SR)
    report = raw.levels[0]
    assert report.peak_dbfs == pytest.approx(expected.peak_dbfs, abs=1e-9)
    assert report.lufs == pytest.approx(expected.lufs, abs=1e-6)
    assert report.clipped_fraction == expected.clipped_fraction > levels.CLIP_WARNING_FRACTION
    assert report.gain_db == 0.0


def test_clamped_output_warns_about_clipping(loud):
    with pytest.warns(UserWarning, match="clipped"):
        out = gen(loud)
    assert np.abs(out.audio).max() == 1.0
    assert out.levels[0].clipped_fraction == pytest.approx(np.mean(np.abs(gen(loud, clamp=False).audio) > 1.0))


def test_normalize_peak_reaches_the_ceiling_without_clipping(loud, recwarn):
    out = gen(loud, normalize="peak", ceiling_dbfs=-3.0)
    peak = 20 * np.log10(np.abs(out.audio).max())
    assert peak == pytest.approx(-3.0, abs=20 * np.log10(1 + 4 * FP32_EPS))
    assert out.levels[0].gain_db == pytest.approx(-3.0 - out.levels[0].peak_dbfs)
    assert not [w for w in recwarn if "clipped" in str(w.message)]


def test_normalize_loudness_reaches_the_target(pipe):
    out = gen(pipe, duration=4.0, normalize="loudness", target_lufs=-16.0)
    report = out.levels[0]
    assert report.gain_db == pytest.approx(-16.0 - report.lufs)  # the demo's true peak leaves room for it
    assert levels.measure(out.audio[0], SR).lufs == pytest.approx(-16.0, abs=1e-3)


def test_loudness_normalisation_keeps_the_true_peak_under_the_ceiling(loud):
    out = gen(loud, duration=4.0, normalize="loudness", target_lufs=-5.0, ceiling_dbfs=-1.0)
    report = out.levels[0]
    assert report.gain_db == pytest.approx(-1.0 - report.true_peak_dbfs)
    assert levels.measure(out.audio[0], SR).true_peak_dbfs <= -1.0 + 0.01


def test_file_normalisation_matches_the_in_memory_one(pipe, tmp_path):
    path = tmp_path / "n.flac"
    out = pipe.generate_to_file(path, "warm pad", 2.0, seed=5, steps=3, sampler="euler", normalize="peak")
    memory = gen(pipe, normalize="peak")
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    np.testing.assert_allclose(data.T, memory.audio[0], rtol=0, atol=2.0**-23)  # 24-bit flac: rounding to 2^-23
    assert out.levels[0].gain_db == pytest.approx(memory.levels[0].gain_db)
    assert sorted(os.listdir(tmp_path)) == ["n.flac"]  # the raw float temporary file is gone


def test_no_clamp_needs_a_float_format(pipe, tmp_path):
    with pytest.raises(ValueError, match="float"):
        pipe.generate_to_file(tmp_path / "x.flac", "x", 1.0, steps=1, clamp=False)
    assert os.listdir(tmp_path) == []


def test_tags_and_opus_rate_in_the_file_output(pipe, tmp_path):
    fmt = "opus" if available("opus") else "wav"
    out = pipe.generate_to_file(tmp_path / f"t.{fmt}", "rain on a tin roof", 1.0, seed=42, steps=2)
    assert out.sample_rate == (48000 if fmt == "opus" else SR) == sf.info(out.paths[0]).samplerate
    tags = read_tags(out.paths[0])
    assert (tags["prompt"], tags["seed"], tags["steps"], tags["model"]) == ("rain on a tin roof", 42, 2, "demo")


# -- memory -------------------------------------------------------------------------------------------------------

MEMORY_WORKER = """
import json, resource, sys, tempfile
from pathlib import Path
from mlx_sa3 import StableAudio3
pipe = StableAudio3.from_pretrained("demo")
pipe.model.config.sample_size = 130 * 44100  # a longer canvas than the demo's 47.5 s
with tempfile.TemporaryDirectory() as tmp:
    pipe.generate_to_file(Path(tmp) / "warm.wav", "x", 1.0, steps=1, seed=0)  # one-off allocations
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pipe.generate_to_file(Path(tmp) / "o.flac", "x", float(sys.argv[1]), steps=1, seed=0, normalize="loudness")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"growth_bytes": 1024 * (peak - base)}))
"""


def peak_growth(seconds: float) -> int:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", MEMORY_WORKER, str(seconds)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["growth_bytes"]


@pytest.mark.skipif(sys.platform != "linux", reason="ru_maxrss is in KiB on Linux only")
def test_normalising_a_120s_clip_stays_within_the_streaming_budget(pipe):
    """Peak RSS growth of a 120 s --normalize run <= 10 % over a 10 s run + what legitimately grows with length.

    What grows with the length and is not the audio: the DiT's attention, which holds scores and their softmax for
    one layer, 2 x heads x n^2 float32 (n = latents + memory tokens), plus 8 MiB of allocator slack. Holding the
    120 s signal would add at least its float32 size, which the bound leaves no room for (checked below).
    """
    cfg = pipe.model.dit.config
    n120 = math.ceil(int(120 * SR) / 4096) + int(6 * SR / 4096) + cfg.num_memory_tokens
    attention = 2 * cfg.num_heads * n120**2 * 4
    allowance = attention + 8 * 2**20
    signal = 120 * SR * 2 * 4
    assert allowance < signal  # otherwise the test could not tell a whole-signal buffer from the DiT
    short, long = peak_growth(10.0), peak_growth(120.0)
    assert long <= 1.10 * short + allowance, (short, long, allowance)


# -- CLI ----------------------------------------------------------------------------------------------------------


def cli(*args):
    return generate.main(["--model", "demo", "--quiet", "--steps", "2", "-p", "x", "--duration", "1", *map(str, args)])


@pytest.fixture
def no_loading(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(StableAudio3, "from_pretrained", classmethod(refuse))


@pytest.mark.parametrize(
    "args",
    [
        ["--cfg-interval", "0.8,0.2"],
        ["--cfg-interval", "0.5"],
        ["--cfg-norm-threshold", "-1"],
        ["--cfg-rescale", "2"],
        ["--apg-scale", "1.5"],
        ["--cfg-scale", "nan"],
        ["--cfg-scale", "inf"],
        ["--sigma-max", "0"],
        ["--headroom", "-1"],
        ["--dist-shift", "warp"],
        ["--ceiling", "2", "--normalize", "peak"],
        ["--target-lufs", "-90", "--normalize", "loudness"],
        ["-o", "OUT/x.xyz"],
        ["-o", "OUT/x.wav", "--bit-depth", "12"],
        ["-o", "OUT/x.flac", "--bit-depth", "32"],
        ["-o", "OUT/x.ogg", "--bit-depth", "16"],
        ["-o", "OUT/x.flac", "--no-clamp"],
        ["-o", "OUT/x.wav", "--bit-depth", "24", "--no-clamp"],
        ["--init-audio", "OUT/in.wav", "--init-noise-level", "0.5", "--sigma-max", "0.7"],
    ],
)
def test_cli_refuses_bad_values_before_loading(no_loading, tmp_path, capsys, args):
    args = [a.replace("OUT", str(tmp_path)) for a in args]
    assert cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert os.listdir(tmp_path) == []


def test_cli_refuses_an_unknown_format_name(no_loading, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:  # argparse choices: one error line, status 2
        cli("--format", "aiff", "-o", tmp_path / "x.wav")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice" in err and err.startswith("error: ") and err.count("\n") == 1


@pytest.mark.parametrize(
    "command,argv",
    [
        ("generate", ["--backend", "cuda"]),
        ("generate", ["--steps", "many"]),
        ("generate", ["--no-such-flag"]),
        ("batch", []),
        ("convert", ["only-src"]),
        ("info", ["--size", "big"]),
    ],
)
def test_every_command_line_usage_error_is_one_line(command, argv, capsys):
    """argparse's own errors (unknown flags, bad choices and types, missing arguments) are one line on stderr with
    exit status 2, as every other error, not the whole usage first."""
    main = importlib.import_module(f"mlx_sa3.{command}").main
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1
    assert f"python -m mlx_sa3.{command} --help" in captured.err


@pytest.mark.parametrize(
    "fmt,bit_depth,subtype",
    [
        ("wav", None, "FLOAT"),
        ("wav", 16, "PCM_16"),
        ("wav", 24, "PCM_24"),
        ("wav", 32, "FLOAT"),
        ("flac", None, "PCM_24"),
        ("flac", 16, "PCM_16"),
        ("ogg", None, "VORBIS"),
        ("opus", None, "OPUS"),
        ("mp3", None, "MPEG_LAYER_III"),
    ],
)
def test_cli_formats_round_trip(tmp_path, capsys, fmt, bit_depth, subtype):
    if not available(fmt):
        pytest.skip(f"this libsndfile cannot write {fmt}")
    out = tmp_path / f"o.{fmt}"
    args = ["--seed", "9", "-o", out] + (["--bit-depth", bit_depth] if bit_depth else [])
    assert cli(*args) == 0
    info = sf.info(out)
    assert info.channels == 2 and info.subtype == subtype
    rate = 48000 if fmt == "opus" else SR
    assert info.samplerate == rate
    if fmt in ("wav", "flac"):
        assert info.frames == SR
    else:  # lossy codecs pad or trim by an encoder delay of at most a few frames of 1152 samples
        assert abs(info.frames - rate) <= 4 * 1152
    tags = read_tags(out)
    assert (tags["prompt"], tags["seed"], tags["steps"], tags["model"]) == ("x", 9, 2, "demo")
    assert "levels: peak" in capsys.readouterr().out


def test_cli_format_flag_overrides_the_suffix(tmp_path):
    out = tmp_path / "o.audio"
    assert cli("--format", "flac", "-o", out) == 0
    assert sf.info(out).format == "FLAC"


def test_cli_no_clamp_writes_float_wav(tmp_path):
    out = tmp_path / "raw.wav"
    assert cli("--no-clamp", "-o", out) == 0
    assert sf.info(out).subtype == "FLOAT"


def test_cli_normalize_reports_the_gain(tmp_path, capsys):
    out = tmp_path / "n.wav"
    assert cli("--normalize", "peak", "--ceiling", "-2", "-o", out) == 0
    data, _ = sf.read(out, dtype="float32")
    assert 20 * np.log10(np.abs(data).max()) == pytest.approx(-2.0, abs=1e-4)
    summary = capsys.readouterr().out
    assert "levels: peak" in summary and "gain +" in summary


class Recorder:
    """Stands in for the playback functions: records what would be played."""

    def __init__(self):
        self.played = []

    def play(self, audio, sample_rate=SR, block_frames=None):
        self.played.append(("array", np.asarray(audio).shape, sample_rate))

    def play_file(self, path, block_frames=None):
        info = sf.info(path)
        self.played.append(("file", (info.channels, info.frames), info.samplerate))


@pytest.fixture
def recorder(monkeypatch):
    from mlx_sa3 import playback

    rec = Recorder()
    monkeypatch.setattr(playback, "check_playback", lambda *a, **k: None)
    monkeypatch.setattr(playback, "play", rec.play)
    monkeypatch.setattr(playback, "play_file", rec.play_file)
    return rec


def test_play_without_output_writes_nothing(recorder, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli("--play") == 0
    assert recorder.played == [("array", (2, SR), SR)]
    assert os.listdir(tmp_path) == []


def test_play_with_output_plays_the_written_file(recorder, tmp_path):
    out = tmp_path / "p.flac"
    assert cli("--play", "-o", out) == 0
    assert recorder.played == [("file", (2, SR), SR)]


def test_play_without_a_device_fails_before_loading(no_loading, monkeypatch, tmp_path, capsys):
    from mlx_sa3 import playback

    def no_device(*a, **k):
        raise playback.PlaybackError("--play found no usable audio output device (test)")

    monkeypatch.setattr(playback, "check_playback", no_device)
    monkeypatch.chdir(tmp_path)
    assert cli("--play") == 2
    assert capsys.readouterr().err.strip() == "error: --play found no usable audio output device (test)"


def test_help_lists_every_control_with_its_default():
    text = generate.build_parser().format_help()
    for flag in (
        "--normalize",
        "--ceiling",
        "--target-lufs",
        "--no-clamp",
        "--cfg-interval",
        "--cfg-rescale",
        "--cfg-norm-threshold",
        "--apg-scale",
        "--sigma-max",
        "--headroom",
        "--dist-shift",
        "--format",
        "--bit-depth",
        "--play",
        "rk4",
    ):
        assert flag in text
    for default in ("default 0,1", "default -1 dBFS", "default -14", "default 6"):
        assert default in text
    assert all(fmt in text for fmt in WRITE_FORMATS)
