"""--play: playback through a recording stand-in for sounddevice (there is no audio device on CI)."""

from mlx_sa3 import playback
from mlx_sa3.audio import write_audio
from mlx_sa3.playback import PlaybackError

import numpy as np
import pytest


class FakeSoundDevice:
    """Records what a real sounddevice OutputStream would be asked to play."""

    class PortAudioError(Exception):
        pass

    def __init__(self, device_ok=True):
        self.device_ok = device_ok
        self.streams = []

    def check_output_settings(self, samplerate, channels, dtype):
        if not self.device_ok:
            raise self.PortAudioError("Error querying device -1")

    def OutputStream(self, samplerate, channels, dtype):  # sounddevice's name
        fake = self

        class Stream:
            def __enter__(self):
                fake.streams.append({"samplerate": samplerate, "channels": channels, "dtype": dtype, "blocks": []})
                return self

            def __exit__(self, *exc):
                fake.streams[-1]["closed"] = True

            def write(self, block):
                assert block.dtype == np.float32 and block.shape[1] == channels
                fake.streams[-1]["blocks"].append(block.copy())

        return Stream()


@pytest.fixture
def fake(monkeypatch):
    device = FakeSoundDevice()
    monkeypatch.setattr(playback, "_import_sounddevice", lambda: device)
    return device


def test_play_streams_the_whole_signal_in_blocks(fake):
    audio = np.random.default_rng(0).uniform(-1, 1, (2, 20000)).astype(np.float32)
    playback.play(audio, 44100, block_frames=8192)
    (stream,) = fake.streams
    assert stream["samplerate"] == 44100 and stream["channels"] == 2 and stream["closed"]
    assert [len(b) for b in stream["blocks"]] == [8192, 8192, 3616]
    np.testing.assert_array_equal(np.concatenate(stream["blocks"]).T, audio)


def test_play_file_reads_block_by_block(fake, tmp_path):
    audio = np.random.default_rng(1).uniform(-0.5, 0.5, (2, 10000)).astype(np.float32)
    write_audio(tmp_path / "a.wav", audio)
    playback.play_file(tmp_path / "a.wav", block_frames=4096)
    (stream,) = fake.streams
    assert max(len(b) for b in stream["blocks"]) == 4096
    np.testing.assert_array_equal(np.concatenate(stream["blocks"]).T, audio)


def test_missing_extra_portaudio_or_device_is_one_line(monkeypatch):
    def missing():
        raise ImportError("No module named 'sounddevice'")

    def no_portaudio():
        raise OSError("PortAudio library not found")

    for loader, message in (
        (missing, "pip install 'mlx_sa3\\[play\\]'"),
        (no_portaudio, "PortAudio library not found"),
        (lambda: FakeSoundDevice(device_ok=False), "no usable audio output device"),
    ):
        monkeypatch.setattr(playback, "_import_sounddevice", loader)
        with pytest.raises(PlaybackError, match=message) as err:
            playback.check_playback()
        assert "\n" not in str(err.value)
        with pytest.raises(PlaybackError):
            playback.play(np.zeros((2, 10), np.float32))


def test_this_machine_reports_the_missing_device_cleanly():
    """Whatever this machine has, check_playback either passes or says why in one line (here: no PortAudio)."""
    try:
        playback.check_playback()
    except PlaybackError as err:
        assert "\n" not in str(err) and str(err).startswith("--play")
