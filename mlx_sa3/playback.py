"""``--play``: play audio through the default output device with sounddevice (the optional ``play`` extra).

Playback streams in blocks through one ``sounddevice.OutputStream`` (files are read block by block too, so memory
stays flat) and blocks until the sound has finished; Ctrl-C stops it and propagates. Everything that can be missing,
the extra, the PortAudio library behind it, an output device, raises :class:`PlaybackError` with one line, and
:func:`check_playback` finds that out before any expensive work.
"""

from __future__ import annotations

import os

import numpy as np

PLAY_BLOCK_FRAMES = 8192


class PlaybackError(RuntimeError):
    """Audio cannot be played here: no sounddevice, no PortAudio, or no output device."""


def _import_sounddevice():
    import sounddevice

    return sounddevice


def load_sounddevice():
    """The sounddevice module, or PlaybackError saying what to install."""
    try:
        return _import_sounddevice()
    except ImportError:
        raise PlaybackError("--play needs the sounddevice package: pip install 'mlx_sa3[play]'") from None
    except OSError as err:  # sounddevice imports but cannot load the PortAudio library
        raise PlaybackError(
            f"--play cannot reach an audio output: {err} (install PortAudio, e.g. "
            "`apt install libportaudio2` on Debian/Ubuntu)"
        ) from None


def check_playback(sample_rate: int = 44100, channels: int = 2):
    """Raise PlaybackError unless the default output device can play float32 audio at this rate and channel count."""
    sd = load_sounddevice()
    try:
        sd.check_output_settings(samplerate=sample_rate, channels=channels, dtype="float32")
    except (sd.PortAudioError, ValueError) as err:  # no device, or it cannot take this rate or channel count
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise PlaybackError(f"--play found no usable audio output device ({message})") from None
    return sd


def play(audio, sample_rate: int = 44100, block_frames: int = PLAY_BLOCK_FRAMES) -> None:
    """Play (channels, n) or (n,) float audio and return when it has finished."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    _play_blocks(
        (audio[:, i : i + block_frames].T for i in range(0, audio.shape[1], block_frames)), sample_rate, audio.shape[0]
    )


def play_file(path: str | os.PathLike, block_frames: int = PLAY_BLOCK_FRAMES) -> None:
    """Play an audio file from disk, block by block."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        _play_blocks(f.blocks(blocksize=block_frames, dtype="float32", always_2d=True), f.samplerate, f.channels)


def _play_blocks(blocks, sample_rate: int, channels: int) -> None:
    sd = check_playback(sample_rate, channels)
    try:
        with sd.OutputStream(samplerate=sample_rate, channels=channels, dtype="float32") as stream:
            for block in blocks:
                stream.write(np.ascontiguousarray(block, dtype=np.float32))
    except sd.PortAudioError as err:
        raise PlaybackError(f"playback failed: {str(err).splitlines()[0]}") from None


__all__ = ["PlaybackError", "check_playback", "load_sounddevice", "play", "play_file"]
