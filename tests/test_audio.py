from mlx_sa3.audio import AudioError, load_audio_input, read_audio, write_audio

import numpy as np
import pytest
import soundfile as sf


def tone(n, sr, freq=440.0):
    return (0.5 * np.sin(2 * np.pi * freq * np.arange(n) / sr)).astype(np.float32)


def test_mono_is_duplicated_to_stereo(tmp_path):
    path = tmp_path / "mono.wav"
    sf.write(path, tone(44100, 44100), 44100, subtype="FLOAT")
    audio = read_audio(path)
    assert audio.shape == (2, 44100) and audio.dtype == np.float32
    np.testing.assert_array_equal(audio[0], audio[1])
    np.testing.assert_allclose(audio[0], tone(44100, 44100), atol=1e-7)


def test_48k_is_resampled_to_44k1(tmp_path):
    path = tmp_path / "tone48.flac"
    sf.write(path, np.stack([tone(48000, 48000), tone(48000, 48000, 880.0)], 1), 48000)
    audio = read_audio(path)
    assert audio.shape == (2, 44100)
    # the 440 Hz tone survives resampling: compare with a tone generated directly at 44.1 kHz (away from the edges)
    np.testing.assert_allclose(audio[0, 1000:-1000], tone(44100, 44100)[1000:-1000], atol=2e-3)


def test_three_channels_are_refused(tmp_path):
    path = tmp_path / "three.wav"
    sf.write(path, np.zeros((1000, 3), np.float32), 44100)
    with pytest.raises(AudioError, match="3 channels"):
        read_audio(path)


def test_non_audio_file_gives_clear_error(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("this is not audio")
    with pytest.raises(AudioError, match="not a readable audio file"):
        read_audio(path)
    with pytest.raises(AudioError, match="no such file"):
        read_audio(tmp_path / "missing.wav")


def test_array_input_and_round_trip(tmp_path):
    audio = load_audio_input((tone(22050, 22050), 22050))
    assert audio.shape == (2, 44100)
    for fmt, atol in (("wav", 0.0), ("flac", 2e-7)):
        path = write_audio(tmp_path / f"out.{fmt}", audio)
        back, sr = sf.read(path, dtype="float32", always_2d=True)
        assert sr == 44100
        np.testing.assert_allclose(back.T, audio, atol=atol + 1.0 / 2**23)
    with pytest.raises(AudioError, match="cannot write"):
        write_audio(tmp_path / "out.mp4", audio)
