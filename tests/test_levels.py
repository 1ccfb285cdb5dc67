"""Level reports (peak, BS.1770 loudness, true peak, clipping) and normalisation on known signals.

The loudness reference is pyloudnorm's ``Meter.integrated_loudness`` on the whole signal (float64); the streamed
meter must equal it for any piece size. Known values: a full-scale 997 Hz sine on both channels measures about
0 LUFS (-3.01 LUFS per channel, BS.1770), a -20 dBFS one 20 LU less.
"""

import math

from mlx_sa3.audio import open_writer, write_audio
from mlx_sa3.levels import (
    CLIP_WARNING_FRACTION,
    LevelMeter,
    LevelReport,
    apply_gain,
    clipping_warning,
    copy_with_gain,
    measure,
    measure_file,
    normalization_gain,
    validate_normalization,
)

import numpy as np
import pyloudnorm
import pytest
import soundfile as sf

SR = 44100
# pyloudnorm and the streamed meter both work in float64; the streamed one only regroups the sums
LOUDNESS_TOL = 1e-9


def sine(level_db=0.0, seconds=3.0, freq=997.0, phase=0.0, channels=2):
    t = np.arange(int(seconds * SR)) / SR
    tone = 10 ** (level_db / 20) * np.sin(2 * np.pi * freq * t + phase)
    return np.repeat(tone[None], channels, axis=0)


def pyloudnorm_lufs(audio):
    return pyloudnorm.Meter(SR).integrated_loudness(np.asarray(audio, np.float64).T)


def streamed(audio, piece):
    meter = LevelMeter(SR, audio.shape[0])
    for start in range(0, audio.shape[1], piece):
        meter.add(audio[:, start : start + piece])
    return meter.report()


@pytest.mark.parametrize("level", [0.0, -20.0])
def test_sines(level):
    audio = sine(level)
    report = measure(audio)
    # the sample peak of a 997 Hz sine at 44.1 kHz lies within cos(pi 997 / 44100) of the amplitude (< 0.03 dB)
    assert level - 0.03 < report.peak_dbfs <= level + 1e-9
    assert abs(report.true_peak_dbfs - level) < 0.05
    assert abs(report.lufs - pyloudnorm_lufs(audio)) <= LOUDNESS_TOL
    assert abs(report.lufs - level) < 0.1  # BS.1770: full-scale 1 kHz sine = -3.01 LUFS per channel, two channels
    assert report.clipped_fraction == 0.0 and report.samples == audio.shape[1]


def test_silence_and_short_audio():
    silent = measure(np.zeros((2, SR)))
    assert silent.peak_dbfs == -math.inf and silent.lufs == -math.inf and silent.true_peak_dbfs == -math.inf
    assert pyloudnorm_lufs(np.zeros((2, SR))) == -math.inf
    short = measure(sine(-6.0, seconds=0.3))  # shorter than one 400 ms gating block: pyloudnorm refuses it
    assert short.lufs == -math.inf and abs(short.peak_dbfs + 6.0) < 0.03
    with pytest.raises(ValueError):
        pyloudnorm_lufs(sine(-6.0, seconds=0.3))
    assert "-inf LUFS" in silent.summary() and "peak -inf dBFS" in silent.summary()
    for mode in ("peak", "loudness"):
        assert normalization_gain(silent, mode) == 0.0
    assert normalization_gain(short, "loudness") == 0.0


@pytest.mark.parametrize("piece", [1000, 4410, 17640, 65536, 10**7])
def test_streamed_loudness_equals_pyloudnorm(piece):
    rng = np.random.default_rng(1)
    n = int(4.37 * SR)
    audio = rng.standard_normal((2, n)) * 0.2
    audio[:, : n // 4] *= 0.01  # a quiet stretch below the relative gate, so both gates act
    audio[:, n // 2 : n // 2 + SR // 2] = 0.0  # and silence below the absolute one
    audio[1] *= 0.5
    assert abs(streamed(audio, piece).lufs - pyloudnorm_lufs(audio)) <= LOUDNESS_TOL


def test_mono_and_odd_lengths_equal_pyloudnorm():
    rng = np.random.default_rng(2)
    for n in (17640, 17641, 19999, 3 * SR + 1):
        audio = rng.standard_normal((1, n)) * 0.1
        assert abs(streamed(audio, 3000).lufs - pyloudnorm_lufs(audio[0][None])) <= LOUDNESS_TOL


def test_true_peak_of_a_quarter_rate_sine():
    """fs/4 at 45 degrees: every sample is +-0.707 (-3.01 dBFS) but the waveform reaches 1.0 (0 dBTP)."""
    audio = sine(0.0, 2.0, SR / 4, math.pi / 4)
    fade = np.minimum(1.0, np.arange(audio.shape[1]) / 2000)  # soft edges, so the interpolator rings no more than that
    audio = audio * fade * fade[::-1]
    report = measure(audio)
    assert abs(report.peak_dbfs + 3.0103) < 1e-3
    assert abs(report.true_peak_dbfs) < 0.1


def test_clipped_fraction_and_warning():
    audio = np.full((2, 10000), 0.5, np.float32)
    audio[0, :10] = 1.5
    audio[1, :5] = -1.0001
    audio[1, 5:20] = 1.0  # exactly full scale: the clamp leaves it alone
    report = measure(audio)
    assert report.clipped_fraction == 15 / 20000
    assert abs(report.peak_dbfs - 20 * math.log10(1.5)) < 1e-6
    assert clipping_warning(report) is None  # 0.075 % <= 0.1 %
    audio[0, :55] = 1.5
    report = measure(audio)
    assert report.clipped_fraction == 60 / 20000 > CLIP_WARNING_FRACTION
    warning = clipping_warning(report)
    assert "0.30 % of the samples exceed full scale" in warning and "\n" not in warning


def test_normalisation_gains():
    audio = sine(-10.0) * 0.5  # about -16 dBFS peak, -16 LUFS
    report = measure(audio)
    assert normalization_gain(report, None) == 0.0
    assert normalization_gain(report, "peak") == pytest.approx(-1.0 - report.peak_dbfs)
    assert normalization_gain(report, "peak", ceiling_dbfs=-3.0) == pytest.approx(-3.0 - report.peak_dbfs)
    assert normalization_gain(report, "loudness") == pytest.approx(-14.0 - report.lufs)  # true peak stays low
    # a sine's loudness equals its peak level, so a target above the ceiling is limited by the true-peak ceiling
    limited = normalization_gain(report, "loudness", ceiling_dbfs=-1.0, target_lufs=-0.5)
    assert limited == pytest.approx(-1.0 - report.true_peak_dbfs)
    out = measure(apply_gain(audio, limited, clamp=False))
    assert out.true_peak_dbfs == pytest.approx(-1.0, abs=1e-4)
    # and unlimited, the output lands on the target
    gain = normalization_gain(report, "loudness", target_lufs=-18.0)
    assert measure(apply_gain(audio, gain)).lufs == pytest.approx(-18.0, abs=1e-4)


@pytest.mark.parametrize(
    "args, message",
    [
        (("louder",), "normalize must be one of peak, loudness"),
        (("peak", 0.5), "--ceiling"),
        (("loudness", -1.0, -80.0), "--target-lufs"),
        (("loudness", -1.0, 3.0), "--target-lufs"),
        (("peak", math.nan), "--ceiling"),
    ],
)
def test_bad_normalisation_settings(args, message):
    with pytest.raises(ValueError, match=message):
        validate_normalization(*args)


def test_apply_gain_clamps_unless_asked():
    block = np.array([[0.6, -0.9, 0.2]], np.float32)
    np.testing.assert_allclose(apply_gain(block, 6.0), [[1.0, -1.0, 0.2 * 10**0.3]], rtol=1e-6)
    np.testing.assert_allclose(apply_gain(block, 6.0, clamp=False), block * 10**0.3, rtol=1e-6)
    assert apply_gain(block, 0.0).dtype == np.float32


def test_measure_file_and_copy_with_gain(tmp_path):
    rng = np.random.default_rng(3)
    raw = (rng.standard_normal((2, 3 * SR)) * 0.5).astype(np.float32)  # peaks above full scale
    write_audio(tmp_path / "raw.wav", raw)  # 32-bit float keeps them
    report = measure_file(tmp_path / "raw.wav", chunk_frames=5000)
    expected = measure(raw)
    assert report.peak_dbfs == expected.peak_dbfs and report.clipped_fraction == expected.clipped_fraction > 0
    assert abs(report.lufs - expected.lufs) <= LOUDNESS_TOL

    gain = normalization_gain(report, "peak")
    blocks = []

    class Recorder:
        def write(self, block):
            blocks.append(block)

    assert copy_with_gain(tmp_path / "raw.wav", Recorder(), gain, chunk_frames=4096) == raw.shape[1]
    assert max(len(b) for b in blocks) == 4096  # chunk by chunk: memory flat
    np.testing.assert_allclose(np.concatenate(blocks).T, apply_gain(raw, gain), rtol=1e-6)
    with open_writer(tmp_path / "final.flac", 2, SR, bit_depth=24) as writer:
        copy_with_gain(tmp_path / "raw.wav", writer, gain)
    final, _ = sf.read(tmp_path / "final.flac", dtype="float32")
    assert abs(measure(final.T).peak_dbfs - (-1.0)) < 1e-3


def test_meter_refuses_after_report_and_bad_shapes():
    meter = LevelMeter(SR, 2)
    meter.add(np.zeros((2, 10)))
    with pytest.raises(ValueError, match=r"expected \(2, n\)"):
        meter.add(np.zeros((1, 10)))
    first = meter.report()
    assert meter.report(gain_db=2.0).gain_db == 2.0 and first.gain_db == 0.0
    with pytest.raises(RuntimeError):
        meter.add(np.zeros((2, 10)))


def test_summary_line():
    line = LevelReport(-0.42, -13.96, 0.00123, 1.5, 0.31, 100).summary()
    assert line == "peak -0.4 dBFS (true peak +0.3 dBTP), -14.0 LUFS, 0.12 % clipped, gain +1.5 dB"
