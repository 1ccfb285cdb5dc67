"""Reading and writing audio files: everything becomes stereo float32 at 44.1 kHz, channels-first (2, N)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 44100
WRITE_FORMATS = {"wav": ("WAV", "FLOAT"), "flac": ("FLAC", "PCM_24")}


class AudioError(ValueError):
    """An audio file or array that cannot be used: unreadable, empty, or with an unsupported channel count."""


def to_stereo(audio: np.ndarray, what: str = "audio") -> np.ndarray:
    """(N,), (C, N) with C in {1, 2} -> (2, N) float32. Mono is duplicated; more channels are refused."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise AudioError(f"{what}: expected (channels, samples) audio, got shape {audio.shape}")
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    if audio.shape[0] != 2:
        raise AudioError(
            f"{what}: {audio.shape[0]} channels; mlx_sa3 takes mono or stereo - downmix it first "
            "(e.g. `sox in.wav -c 2 out.wav`)"
        )
    if audio.shape[1] == 0:
        raise AudioError(f"{what}: no samples")
    return np.ascontiguousarray(audio)


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of (C, N) audio with soxr (VHQ)."""
    if sr_in == sr_out:
        return audio
    import soxr

    return np.ascontiguousarray(soxr.resample(audio.T, sr_in, sr_out, quality="VHQ").T.astype(np.float32))


def prepare_audio(audio, sample_rate: int, what: str = "audio") -> np.ndarray:
    """An in-memory array at any rate, mono or stereo, as (2, N) float32 at 44.1 kHz."""
    if sample_rate is None or int(sample_rate) <= 0:
        raise AudioError(f"{what}: a positive sample rate is required with an audio array")
    return resample(to_stereo(audio, what), int(sample_rate))


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Read wav/flac/ogg/mp3 (whatever libsndfile decodes) as stereo float32 (2, N) at 44.1 kHz."""
    path = Path(path)
    if not path.is_file():
        raise AudioError(f"{path}: no such file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: not a readable audio file ({err})") from None
    return prepare_audio(data.T, sr, what=str(path))


def load_audio_input(audio, what: str = "audio") -> np.ndarray:
    """Accept a path, or an ``(array, sample_rate)`` pair, and return (2, N) float32 at 44.1 kHz."""
    if isinstance(audio, (str, os.PathLike)):
        return read_audio(audio)
    if isinstance(audio, tuple) and len(audio) == 2:
        return prepare_audio(np.asarray(audio[0]), audio[1], what)
    raise AudioError(f"{what}: pass a file path or an (array, sample_rate) pair")


def format_for(path: str | os.PathLike, fmt: str | None = None) -> str:
    fmt = (fmt or Path(path).suffix.lstrip(".") or "wav").lower()
    if fmt not in WRITE_FORMATS:
        raise AudioError(f"cannot write {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    return fmt


def open_writer(path: str | os.PathLike, channels: int = 2, sample_rate: int = SAMPLE_RATE, fmt: str | None = None):
    """A soundfile writer for wav (32-bit float) or flac (24-bit); write (N, C) blocks to it."""
    container, subtype = WRITE_FORMATS[format_for(path, fmt)]
    writer = sf.SoundFile(str(path), "w", samplerate=sample_rate, channels=channels, format=container, subtype=subtype)
    return _without_peak_chunk(writer) if container == "WAV" else writer


SFC_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile's sndfile.h; soundfile has no public call for it


def _without_peak_chunk(writer: sf.SoundFile) -> sf.SoundFile:
    """Drop the PEAK chunk libsndfile adds to float WAV files: it holds the write time, so the same audio written
    twice would differ byte-wise (a distributed run's files must equal a single-process run's). Before any write."""
    from soundfile import _ffi, _snd

    _snd.sf_command(writer._file, SFC_SET_ADD_PEAK_CHUNK, _ffi.NULL, 0)  # 0 = SF_FALSE
    return writer


def write_audio(path: str | os.PathLike, audio, sample_rate: int = SAMPLE_RATE, fmt: str | None = None) -> Path:
    """Write (C, N) audio to wav or flac (format from ``fmt`` or the file suffix)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    with open_writer(path, audio.shape[0], sample_rate, fmt) as f:
        f.write(audio.T)
    return Path(path)
