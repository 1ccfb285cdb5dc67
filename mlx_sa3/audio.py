"""Reading and writing audio files: everything becomes stereo float32 at 44.1 kHz, channels-first (2, N)."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import soundfile as sf

from .options import real_number
from .outputs import MISSING, not_a_file

SAMPLE_RATE = 44100
# Output formats by name: (libsndfile container, default subtype). See the writer section at the end of this file.
WRITE_FORMATS = {
    "wav": ("WAV", "FLOAT"),
    "flac": ("FLAC", "PCM_24"),
    "ogg": ("OGG", "VORBIS"),
    "opus": ("OGG", "OPUS"),
    "mp3": ("MP3", "MPEG_LAYER_III"),
}


class AudioError(ValueError):
    """An audio file or array that cannot be used: unreadable, empty, or with an unsupported channel count."""


# Integer PCM is scaled by 2**(bits - 1), soundfile's convention, so an int16 array and the same samples read from a
# 16-bit file give identical input (the official numpy path divides int16 by 32767: 1 LSB apart, 3e-5 relative).
_INT_SCALE = {np.dtype(np.int8): 2.0**7, np.dtype(np.int16): 2.0**15, np.dtype(np.int32): 2.0**31}


def to_float32(audio, what: str = "audio") -> np.ndarray:
    """Samples as float32 in the usual [-1, 1] scale: floats as they are, int8/16/32 and uint8 PCM scaled."""
    audio = np.asarray(audio)
    dtype = audio.dtype
    if dtype in _INT_SCALE:
        return (audio.astype(np.float64) / _INT_SCALE[dtype]).astype(np.float32)
    if dtype == np.uint8:  # 8-bit WAV is unsigned, centred on 128
        return ((audio.astype(np.float32) - 128.0) / 128.0).astype(np.float32)
    if dtype.kind == "f":
        with np.errstate(over="ignore"):  # values beyond float32 become inf, which check_finite then reports
            return audio.astype(np.float32)
    raise AudioError(f"{what}: unsupported sample type {dtype}; use float32/float64 in [-1, 1] or int8/16/32 PCM")


def to_stereo(audio: np.ndarray, what: str = "audio") -> np.ndarray:
    """Any accepted array layout -> (2, N) float32, finite, at least one sample.

    Layouts: ``(N,)`` mono or channels-first ``(C, N)`` with C in {1, 2}, the official tensor layout. A 2-D array with
    more than two rows and one or two columns can only be channels-last ``(N, C)`` (what ``soundfile.read`` and the
    official numpy path use) and is transposed. Mono is duplicated; more than two channels are refused.
    """
    audio = to_float32(audio, what)
    if audio.ndim == 2 and audio.shape[0] > 2 and audio.shape[1] in (1, 2):
        audio = audio.T
    if audio.ndim == 1:
        audio = audio[None]
    if audio.ndim != 2:
        raise AudioError(f"{what}: expected (samples,) or (channels, samples) audio, got shape {audio.shape}")
    if audio.shape[0] == 1:
        audio = np.repeat(audio, 2, axis=0)
    if audio.shape[0] != 2:
        raise AudioError(
            f"{what}: {audio.shape[0]} channels; mlx_sa3 takes mono or stereo - downmix it first "
            "(e.g. `sox in.wav -c 2 out.wav`)"
        )
    if audio.shape[1] == 0:
        raise AudioError(f"{what}: no samples")
    check_finite(audio, what)
    return np.ascontiguousarray(audio)


def check_finite(audio: np.ndarray, what: str = "audio") -> None:
    """Refuse NaN or infinite samples, saying how many and where the first one is."""
    bad = ~np.isfinite(audio)
    if bad.any():
        frames = bad.any(axis=0) if audio.ndim == 2 else bad  # count sample positions, not channels
        raise AudioError(
            f"{what}: {int(frames.sum())} NaN or infinite samples (the first at sample "
            f"{int(np.argmax(frames))}); the input audio must be finite"
        )


def resample(audio: np.ndarray, sr_in: int, sr_out: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of (C, N) audio with soxr (VHQ)."""
    if sr_in == sr_out:
        return audio
    import soxr

    return np.ascontiguousarray(soxr.resample(audio.T, sr_in, sr_out, quality="VHQ").T.astype(np.float32))


def check_sample_rate(sample_rate, what: str = "audio") -> int:
    """A sample rate must be a positive whole number of Hz."""
    if isinstance(sample_rate, bool) or sample_rate is None:
        raise AudioError(f"{what}: a positive sample rate is required with an audio array, got {sample_rate!r}")
    try:
        rate = float(sample_rate)
    except (TypeError, ValueError):
        raise AudioError(f"{what}: the sample rate must be a number of Hz, got {sample_rate!r}") from None
    if not math.isfinite(rate) or rate <= 0 or not rate.is_integer():
        raise AudioError(f"{what}: the sample rate must be a positive whole number of Hz, got {sample_rate!r}")
    return int(rate)


def prepare_audio(audio, sample_rate: int, what: str = "audio") -> np.ndarray:
    """An in-memory array at any rate, mono or stereo (layouts: :func:`to_stereo`), as (2, N) float32 at 44.1 kHz."""
    rate = check_sample_rate(sample_rate, what)
    out = resample(to_stereo(audio, what), rate)
    if out.shape[1] == 0:
        raise AudioError(f"{what}: too short to resample to {SAMPLE_RATE} Hz")
    return out


def read_audio(path: str | os.PathLike) -> np.ndarray:
    """Read wav/flac/ogg/mp3 (whatever libsndfile decodes) as stereo float32 (2, N) at 44.1 kHz."""
    path = Path(path)
    problem = not_a_file(path)
    if problem == MISSING:
        raise AudioError(f"{path}: no such file")
    if problem is not None:  # never opened: a FIFO or device would block or stream without end
        raise AudioError(f"{path} is {problem}; an audio input must be a regular file")
    try:
        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as err:
        raise AudioError(f"{path}: not a readable audio file ({err})") from None
    return prepare_audio(data.T, sr, what=f"{path} (input file)")


def _is_rate(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


def load_audio_input(audio, what: str = "audio") -> np.ndarray:
    """The one way audio comes in; returns (2, N) float32 at 44.1 kHz, validated.

    Accepts a file path; an ``(array, sample_rate)`` pair (the official ``(sample_rate, array)`` order too); or a
    bare array, taken to be at 44.1 kHz. Arrays are numpy-convertible (numpy, mx.array, CPU torch tensors) in the
    layouts of :func:`to_stereo`, float in [-1, 1] or integer PCM (scaled, see :func:`to_float32`).
    """
    if isinstance(audio, (str, os.PathLike)):
        return read_audio(audio)
    if isinstance(audio, tuple):
        if len(audio) == 2 and _is_rate(audio[1]) and not _is_rate(audio[0]):
            return prepare_audio(audio[0], audio[1], what)
        if len(audio) == 2 and _is_rate(audio[0]) and not _is_rate(audio[1]):
            return prepare_audio(audio[1], audio[0], what)
        raise AudioError(f"{what}: pass a file path, an (array, sample_rate) pair or an array at {SAMPLE_RATE} Hz")
    try:
        array = np.asarray(audio)
    except (TypeError, ValueError, RuntimeError):
        array = None
    if array is None or array.dtype == object or array.ndim == 0:
        raise AudioError(f"{what}: pass a file path, an (array, sample_rate) pair or an array at {SAMPLE_RATE} Hz")
    return prepare_audio(array, SAMPLE_RATE, what)


def format_seconds(seconds: float, digits: int = 3) -> str:
    """``seconds`` rounded *down* to ``digits`` decimals, trailing zeros dropped: a stated limit is always allowed."""
    scale = 10**digits
    return f"{math.floor(seconds * scale + 1e-9) / scale:.{digits}f}".rstrip("0").rstrip(".")


def check_duration(duration, sample_rate: int = SAMPLE_RATE, max_samples: int | None = None) -> int:
    """Validate a requested duration in seconds; returns its length in samples, ``round(duration * sample_rate)``.

    Refused: non-numbers, NaN/inf, zero or negative, less than one sample, and more than ``max_samples`` (the
    model's canvas). The messages give the real limits: the maximum rounded down to the millisecond, the request
    as given (``repr``), so they never read "47.6 exceeds 47.6".
    """
    try:
        seconds = real_number(duration, "duration")
    except ValueError:
        raise ValueError(f"duration must be a number of seconds, got {duration!r}") from None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"duration must be a positive number of seconds, got {duration!r}")
    samples = round(seconds * sample_rate)
    if seconds * sample_rate < 1:
        scale = 10 ** (2 - math.floor(math.log10(1 / sample_rate)))  # three significant digits, rounded up
        shortest = math.ceil(scale / sample_rate) / scale
        raise ValueError(
            f"duration {seconds!r} s is less than one sample at {sample_rate} Hz (at least {shortest:g} s)"
        )
    if max_samples is not None and samples > max_samples:
        raise ValueError(
            f"duration {seconds!r} s is too long: this model makes at most "
            f"{format_seconds(max_samples / sample_rate)} s"
        )
    return samples


# ---------------------------------------------------------------------------------------------------------------
# Writing. Bit depth applies to the PCM formats only: wav 16/24-bit integer or 32-bit float (the default), flac
# 16/24-bit (default 24). ogg (Vorbis), opus and mp3 are lossy codecs without a bit depth; they need a libsndfile with
# their encoders (mp3 and opus from libsndfile 1.1.0), checked at run time. Opus only codes 8/12/16/24/48 kHz, so
# opus output is always 48 kHz: the writer resamples (soxr VHQ, streamed) rather than refusing 44.1 kHz audio.

BIT_DEPTHS = {"wav": {16: "PCM_16", 24: "PCM_24", 32: "FLOAT"}, "flac": {16: "PCM_16", 24: "PCM_24"}}
FORMAT_ALIASES = {"vorbis": "ogg", "wave": "wav"}
OPUS_SAMPLE_RATE = 48000
# soundfile's string fields that the formats above can carry (libsndfile drops the ones a format lacks, e.g.
# ``software`` in mp3)
TAG_NAMES = ("title", "artist", "album", "comment", "software", "date", "copyright", "license", "genre")
_GENERATION_FIELDS = ("seed", "steps", "model")


def format_for(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The output format name for ``path``: ``fmt`` if given, else the file suffix (wav when there is none)."""
    fmt = (fmt or Path(path).suffix.lstrip(".") or "wav").lower()
    fmt = FORMAT_ALIASES.get(fmt, fmt)
    if fmt not in WRITE_FORMATS:
        raise AudioError(f"cannot write {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    return fmt


def subtype_for(fmt: str, bit_depth: int | None = None) -> tuple[str, str]:
    """(container, subtype) for a format name and optional bit depth, checked against this libsndfile.

    Raises AudioError with one line naming the format (and the libsndfile version when it lacks the encoder).
    """
    fmt = format_for("", fmt)
    container, subtype = WRITE_FORMATS[fmt]
    if bit_depth is not None:
        depths = BIT_DEPTHS.get(fmt)
        if depths is None:
            raise AudioError(
                f"{fmt} is a lossy format without a bit depth; --bit-depth applies to wav (16, 24, 32) "
                "and flac (16, 24)"
            )
        depth = int(bit_depth) if isinstance(bit_depth, (int, float, str)) and str(bit_depth).isdigit() else None
        if depth not in depths:
            raise AudioError(f"{fmt} bit depth must be {', '.join(map(str, depths))}, got {bit_depth}")
        subtype = depths[depth]
    if container not in sf.available_formats() or subtype not in sf.available_subtypes(container):
        raise AudioError(
            f"cannot write {fmt}: this libsndfile ({sf.__libsndfile_version__}) has no "
            f"{container}/{subtype} encoder (mp3 and opus need libsndfile 1.1.0 or later)"
        )
    return container, subtype


SFC_SET_ADD_PEAK_CHUNK = 0x1050  # libsndfile's sndfile.h; soundfile has no public call for it


def _without_peak_chunk(writer: sf.SoundFile) -> sf.SoundFile:
    """Drop the PEAK chunk libsndfile adds to float WAV files: it holds the write time, so the same audio written
    twice would differ byte-wise (a distributed run's files must equal a single-process run's). Before any write."""
    from soundfile import _ffi, _snd

    _snd.sf_command(writer._file, SFC_SET_ADD_PEAK_CHUNK, _ffi.NULL, 0)  # 0 = SF_FALSE
    return writer


def is_float_output(fmt: str, bit_depth: int | None = None) -> bool:
    """Whether the format keeps samples beyond [-1, 1] (32-bit float wav), i.e. where --no-clamp is meaningful."""
    return subtype_for(fmt, bit_depth)[1] == "FLOAT"


def output_sample_rate(fmt: str, sample_rate: int = SAMPLE_RATE) -> int:
    """The rate a file of this format is written at (opus: always 48 kHz)."""
    return OPUS_SAMPLE_RATE if format_for("", fmt) == "opus" else int(sample_rate)


def generation_tags(prompt=None, seed=None, model=None, steps=None, **extra) -> dict:
    """String tags describing a generation: the prompt as ``title``, ``seed=...; steps=...; model=...`` (and any
    ``extra`` key=value pairs) as ``comment``, and ``software``. :func:`read_tags` parses them back."""
    from . import __version__

    fields = {"seed": seed, "steps": steps, "model": model, **extra}
    comment = "; ".join(f"{k}={v}" for k, v in fields.items() if v is not None)
    tags = {"software": f"mlx_sa3 {__version__}"}
    if prompt:
        tags["title"] = str(prompt)
    if comment:
        tags["comment"] = comment
    return tags


def read_tags(path: str | os.PathLike) -> dict:
    """The string tags of an audio file, plus ``prompt``, ``seed``, ``steps``, ``model`` parsed from the tags that
    :func:`generation_tags` writes (seed and steps as int)."""
    with sf.SoundFile(str(path)) as f:
        tags = {k: v for k, v in f.copy_metadata().items() if v}
        if f.format == "MP3":
            tags = {k: _utf8_from_latin1(v) for k, v in tags.items()}
    if "title" in tags:
        tags["prompt"] = tags["title"]
    for item in tags.get("comment", "").split("; "):
        key, sep, value = item.partition("=")
        if sep and key not in tags:
            tags[key] = int(value) if key in ("seed", "steps") and value.lstrip("-").isdigit() else value
    return tags


def _utf8_from_latin1(text: str) -> str:
    """libsndfile hands mp3 (ID3) text back as Latin-1 although it stored our UTF-8 bytes: undo that when it fits."""
    try:
        return text.encode("latin-1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text


def _set_tags(f, tags: dict | None) -> None:
    for key, value in (tags or {}).items():
        if key not in TAG_NAMES:
            raise AudioError(f"unknown audio tag {key!r}; use one of {', '.join(TAG_NAMES)}")
        if value is not None and str(value):
            setattr(f, key, str(value))


class _ResamplingWriter:
    """A soundfile writer behind a streaming resampler (for opus, which cannot store 44.1 kHz)."""

    def __init__(self, inner, sample_rate: int, channels: int):
        import soxr

        self.inner = inner
        self.samplerate = inner.samplerate
        self.channels = channels
        self._stream = soxr.ResampleStream(sample_rate, inner.samplerate, channels, dtype="float32", quality="VHQ")

    @property
    def closed(self) -> bool:
        return self.inner.closed

    def write(self, block) -> None:
        out = self._stream.resample_chunk(np.ascontiguousarray(block, dtype=np.float32).reshape(-1, self.channels))
        if len(out):
            self.inner.write(out)

    def close(self) -> None:
        if not self.inner.closed:
            try:
                tail = self._stream.resample_chunk(np.zeros((0, self.channels), np.float32), last=True)
                if len(tail):
                    self.inner.write(tail)
            finally:
                self.inner.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_writer(
    path: str | os.PathLike,
    channels: int = 2,
    sample_rate: int = SAMPLE_RATE,
    fmt: str | None = None,
    *,
    bit_depth: int | None = None,
    tags: dict | None = None,
):
    """A writer for ``path`` in ``fmt`` (default: from the suffix); write (N, C) float blocks to it, then close it.

    wav defaults to 32-bit float, flac to 24-bit; ``bit_depth`` picks 16/24/32 (see :data:`BIT_DEPTHS`). ``tags``
    (see :func:`generation_tags`) are written where the format has string fields. Opus is resampled to 48 kHz.
    """
    fmt = format_for(path, fmt)
    container, subtype = subtype_for(fmt, bit_depth)
    rate = output_sample_rate(fmt, sample_rate)
    f = sf.SoundFile(str(path), "w", samplerate=rate, channels=channels, format=container, subtype=subtype)
    try:
        if container == "WAV":
            _without_peak_chunk(f)
        _set_tags(f, tags)  # before the first write: flac, ogg and mp3 write their tags with the header
    except BaseException:
        f.close()
        raise
    return _ResamplingWriter(f, sample_rate, channels) if rate != sample_rate else f


def write_audio(
    path: str | os.PathLike,
    audio,
    sample_rate: int = SAMPLE_RATE,
    fmt: str | None = None,
    *,
    bit_depth: int | None = None,
    tags: dict | None = None,
) -> Path:
    """Write (C, N) audio in any of :data:`WRITE_FORMATS` (format from ``fmt`` or the file suffix)."""
    audio = np.asarray(audio, dtype=np.float32)
    if audio.ndim == 1:
        audio = audio[None]
    with open_writer(path, audio.shape[0], sample_rate, fmt, bit_depth=bit_depth, tags=tags) as f:
        f.write(audio.T)
    return Path(path)
