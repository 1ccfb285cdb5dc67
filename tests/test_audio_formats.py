"""Output formats: every format this libsndfile can encode round-trips with its length, channels and tags."""

from mlx_sa3 import audio as audio_mod
from mlx_sa3.audio import AudioError, generation_tags, is_float_output, open_writer, read_tags, subtype_for, write_audio

import numpy as np
import pytest
import soundfile as sf

SR = 44100
# (format, bit depth) -> max round-trip error: exact for float; for b-bit PCM half a step plus libsndfile's scale
# asymmetry (it writes x (2^(b-1) - 1) and reads back / 2^(b-1)), together at most 1 / 2^(b-1) for |x| <= 1
LOSSLESS = {
    ("wav", None): 0.0,
    ("wav", 32): 0.0,
    ("wav", 24): 1 / 2**23,
    ("wav", 16): 1 / 2**15,
    ("flac", None): 1 / 2**23,
    ("flac", 24): 1 / 2**23,
    ("flac", 16): 1 / 2**15,
}
LOSSY = ["ogg", "opus", "mp3"]


def signal(seconds=1.0, channels=2):
    t = np.arange(int(seconds * SR)) / SR
    tones = [0.5 * np.sin(2 * np.pi * 440 * t), 0.25 * np.sin(2 * np.pi * 660 * t)]
    return np.stack(tones[:channels]).astype(np.float32)


def available(fmt):
    container, subtype = audio_mod.WRITE_FORMATS[fmt]
    return container in sf.available_formats() and subtype in sf.available_subtypes(container)


@pytest.mark.parametrize("fmt, depth", list(LOSSLESS))
def test_lossless_round_trip(tmp_path, fmt, depth):
    audio = signal()
    path = write_audio(tmp_path / f"out.{fmt}", audio, bit_depth=depth)
    back, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == SR and back.shape == (audio.shape[1], 2)
    np.testing.assert_allclose(back.T, audio, rtol=0, atol=LOSSLESS[fmt, depth] + 1e-7)
    expected = {None: None, 16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}[depth] or audio_mod.WRITE_FORMATS[fmt][1]
    assert sf.info(str(path)).subtype == expected


@pytest.mark.parametrize("fmt", [f for f in LOSSY if available(f)])
@pytest.mark.parametrize("channels", [1, 2])
def test_lossy_round_trip(tmp_path, fmt, channels):
    audio = signal(1.5, channels)
    path = write_audio(tmp_path / f"out.{fmt}", audio)
    back, sr = sf.read(path, dtype="float32", always_2d=True)
    assert back.shape[1] == channels
    if fmt == "opus":  # resampled to 48 kHz (the only suitable rate Opus has)
        assert sr == 48000 and abs(back.shape[0] - audio.shape[1] * 48000 / SR) <= 1
    else:
        assert sr == SR and back.shape[0] == audio.shape[1]
    # a lossy codec keeps the tone: compare the RMS level (within 1 dB) rather than samples
    rms = np.sqrt(np.mean(back[len(back) // 4 : -len(back) // 4] ** 2, axis=0))
    np.testing.assert_allclose(20 * np.log10(rms), 20 * np.log10(np.sqrt(np.mean(audio**2, axis=1))), atol=1.0)


def test_every_lossy_format_is_available_here():
    """This machine's libsndfile (soundfile's bundled 1.2) has all three encoders, so the tests above really ran."""
    assert all(available(f) for f in LOSSY), sf.__libsndfile_version__


@pytest.mark.parametrize("fmt", ["wav", "flac"] + [f for f in LOSSY if available(f)])
def test_tags_read_back(tmp_path, fmt):
    tags = generation_tags(
        prompt="warm analog pad, café ♪", seed=1234, model="stabilityai/stable-audio-3-small-music", steps=8
    )
    write_audio(tmp_path / f"t.{fmt}", signal(0.5), tags=tags)
    back = read_tags(tmp_path / f"t.{fmt}")
    assert back["prompt"] == "warm analog pad, café ♪"
    assert back["seed"] == 1234 and back["steps"] == 8
    assert back["model"] == "stabilityai/stable-audio-3-small-music"


def test_streamed_writer_equals_one_shot(tmp_path):
    audio = signal(2.0)
    with open_writer(tmp_path / "s.opus", 2, SR) as w:  # the resampling writer, fed in uneven blocks
        for start in range(0, audio.shape[1], 10000):
            w.write(audio[:, start : start + 10000].T)
    write_audio(tmp_path / "o.opus", audio)
    assert sf.info(str(tmp_path / "s.opus")).frames == sf.info(str(tmp_path / "o.opus")).frames
    with open_writer(tmp_path / "s.wav", 2, SR, bit_depth=24) as w:
        for start in range(0, audio.shape[1], 7000):
            w.write(audio[:, start : start + 7000].T)
    np.testing.assert_array_equal(
        sf.read(tmp_path / "s.wav")[0], sf.read(write_audio(tmp_path / "o.wav", audio, bit_depth=24))[0]
    )


def test_format_from_suffix_or_fmt(tmp_path):
    write_audio(tmp_path / "x.partial", signal(0.2), fmt="flac")
    assert sf.info(str(tmp_path / "x.partial")).format == "FLAC"
    write_audio(tmp_path / "y.ogg", signal(0.2), fmt="vorbis")
    assert sf.info(str(tmp_path / "y.ogg")).subtype == "VORBIS"
    assert is_float_output("wav") and is_float_output("wav", 32)
    assert not is_float_output("wav", 24) and not is_float_output("flac") and not is_float_output("mp3")


@pytest.mark.parametrize(
    "fmt, depth, message",
    [
        ("wav", 12, "wav bit depth must be 16, 24, 32, got 12"),
        ("flac", 32, "flac bit depth must be 16, 24, got 32"),
        ("mp3", 16, "lossy format without a bit depth"),
        ("wav", "x", "got x"),
        ("aiff", None, "cannot write 'aiff'"),
    ],
)
def test_refused_before_writing(tmp_path, fmt, depth, message):
    target = tmp_path / f"r.{fmt}"
    with pytest.raises(AudioError, match=message) as err:
        write_audio(target, signal(0.1), bit_depth=depth)
    assert "\n" not in str(err.value)
    assert not target.exists()


def test_missing_encoder_names_format_and_libsndfile(monkeypatch):
    monkeypatch.setattr(sf, "available_subtypes", lambda container=None: {"PCM_16": "", "FLOAT": ""})
    with pytest.raises(AudioError, match=r"cannot write mp3: this libsndfile \(\d[\d.]*\) has no MP3/MPEG_LAYER_III"):
        subtype_for("mp3")
    monkeypatch.setattr(sf, "available_formats", lambda: {"WAV": ""})
    with pytest.raises(AudioError, match="cannot write opus"):
        subtype_for("opus")


def test_unknown_tag_refused_and_file_closed(tmp_path):
    with pytest.raises(AudioError, match="unknown audio tag 'mood'"):
        write_audio(tmp_path / "u.wav", signal(0.1), tags={"mood": "happy"})
