"""Level reports and normalisation of decoded audio: peak, integrated loudness, clipping, gains.

The official pipeline clamps the decoder output to [-1, 1] and says nothing about what it cut. This module measures
the raw decoder output as it is decoded (:class:`LevelMeter`, memory flat: a few numbers per 100 ms), reports it
(:class:`LevelReport`) and computes the gain of the optional normalisations (:func:`normalization_gain`), which
:func:`copy_with_gain` applies while copying a temporary file to the final one, chunk by chunk.

* Peak: the largest absolute sample value of the raw output, in dBFS.
* Integrated loudness: ITU-R BS.1770-4 / EBU R 128 in LUFS. The K-weighting filters are pyloudnorm's, applied with
  scipy's ``lfilter`` carrying the filter state from piece to piece, and the gating is pyloudnorm's
  ``Meter.integrated_loudness`` evaluated on running block sums, so a streamed measurement equals pyloudnorm on the
  whole signal (tests check it). Audio shorter than one 400 ms gating block and silence measure ``-inf``.
* True peak (BS.1770-4 annex 2): the peak of the signal oversampled 4x (2x at 88.2/96 kHz, 1x from 176.4 kHz), with
  soxr's streaming HQ resampler (linear phase) as the interpolator instead of the annex's 48-tap example filter.
* Clipped fraction: the fraction of all samples (all channels) with ``|x| > 1``, i.e. what the official clamp cuts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .options import real_number

DEFAULT_CEILING_DBFS = -1.0  # --ceiling: peak normalisation target, and the true-peak limit of loudness normalisation
DEFAULT_TARGET_LUFS = -14.0  # --target-lufs
CLIP_WARNING_FRACTION = 0.001  # warn when more than 0.1 % of the samples are cut by the clamp
NORMALIZE_MODES = ("peak", "loudness")
COPY_CHUNK_FRAMES = 65536

# BS.1770-4 gating constants, as pyloudnorm's Meter defaults
_BLOCK_SECONDS = 0.4
_OVERLAP = 0.75
_ABSOLUTE_GATE = -70.0
_CHANNEL_GAINS = (1.0, 1.0, 1.0, 1.41, 1.41)


def to_db(value: float) -> float:
    """20 log10(value); -inf for 0."""
    return 20.0 * math.log10(value) if value > 0 else -math.inf


def db_to_gain(db: float) -> float:
    return 10.0 ** (db / 20.0)


@dataclass
class LevelReport:
    """Levels of the raw decoder output (before any gain or clamp) and the gain applied to it afterwards."""

    peak_dbfs: float
    lufs: float
    clipped_fraction: float
    gain_db: float = 0.0
    true_peak_dbfs: float | None = None
    samples: int = 0  # frames measured (per channel)

    def summary(self) -> str:
        """One line for the CLI: ``peak -0.4 dBFS (true peak +0.3 dBTP), -13.9 LUFS, 0.00 % clipped, gain +0.0 dB``."""
        peak = f"peak {_fmt_db(self.peak_dbfs)} dBFS"
        if self.true_peak_dbfs is not None:
            peak += f" (true peak {_fmt_db(self.true_peak_dbfs)} dBTP)"
        return (
            f"{peak}, {_fmt_db(self.lufs, sign=False)} LUFS, {100 * self.clipped_fraction:.2f} % clipped, "
            f"gain {self.gain_db:+.1f} dB"
        )

    def with_gain(self, gain_db: float) -> LevelReport:
        return LevelReport(
            self.peak_dbfs, self.lufs, self.clipped_fraction, float(gain_db), self.true_peak_dbfs, self.samples
        )


def _fmt_db(value: float, sign: bool = True) -> str:
    if value == -math.inf:
        return "-inf"
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def clipping_warning(report: LevelReport, threshold: float = CLIP_WARNING_FRACTION) -> str | None:
    """A one-line warning when more than ``threshold`` of the samples exceed full scale, else None."""
    if report.clipped_fraction <= threshold:
        return None
    return (
        f"{100 * report.clipped_fraction:.2f} % of the samples exceed full scale and are clipped "
        f"(peak {_fmt_db(report.peak_dbfs)} dBFS); try --normalize peak or --normalize loudness"
    )


class LevelMeter:
    """Measure audio piece by piece: ``meter.add(piece)`` for (channels, n) blocks in order, then ``meter.report()``.

    Memory is flat: filter states, one running sum per 100 ms hop and channel, and the resampler state for the
    true peak.
    """

    def __init__(self, sample_rate: int = 44100, channels: int = 2, true_peak: bool = True):
        import pyloudnorm

        if not 1 <= channels <= len(_CHANNEL_GAINS):
            raise ValueError(f"loudness is defined for 1 to {len(_CHANNEL_GAINS)} channels, got {channels}")
        self.sample_rate = int(sample_rate)
        self.channels = int(channels)
        # The K-weighting stages of pyloudnorm's BS.1770 meter (high shelf, then high pass), applied statefully.
        meter = pyloudnorm.Meter(self.sample_rate)
        self._stages = [(f.b, f.a, f.passband_gain) for f in meter._filters.values()]
        self._states = [np.zeros((self.channels, max(len(b), len(a)) - 1)) for b, a, _ in self._stages]
        self._frames = 0
        self._peak = 0.0
        self._over = 0
        # Running sums of the squared K-weighted signal between consecutive block boundaries (segments).
        self._segment_starts = [0]
        self._segment_sums = [np.zeros(self.channels)]
        self._next_block = [0, 0]  # next block index whose lower / upper bound is still ahead
        self._advance_boundary(0)  # 0 is the first segment's start already
        self._oversampler = None
        self._true_peak = 0.0
        if true_peak:
            factor = 4 if self.sample_rate < 88200 else 2 if self.sample_rate < 176400 else 1
            if factor > 1:
                import soxr

                self._oversampler = soxr.ResampleStream(
                    self.sample_rate, factor * self.sample_rate, self.channels, dtype="float32", quality="HQ"
                )
        self._true_peak_enabled = true_peak
        self._report = None

    # -- block boundaries exactly as pyloudnorm computes them
    def _lower(self, j: int) -> int:
        return int(_BLOCK_SECONDS * (j * (1.0 - _OVERLAP)) * self.sample_rate)

    def _upper(self, j: int) -> int:
        return int(_BLOCK_SECONDS * (j * (1.0 - _OVERLAP) + 1) * self.sample_rate)

    def _next_boundary(self) -> int:
        lo, up = self._lower(self._next_block[0]), self._upper(self._next_block[1])
        return min(lo, up)

    def _advance_boundary(self, position: int) -> None:
        while self._lower(self._next_block[0]) <= position:
            self._next_block[0] += 1
        while self._upper(self._next_block[1]) <= position:
            self._next_block[1] += 1

    def add(self, audio) -> None:
        """Measure the next (channels, n) piece of raw (unclamped) audio."""
        if self._report is not None:
            raise RuntimeError("this LevelMeter has already reported; make a new one")
        audio = np.asarray(audio)
        if audio.ndim != 2 or audio.shape[0] != self.channels:
            raise ValueError(f"expected ({self.channels}, n) audio, got shape {audio.shape}")
        n = audio.shape[1]
        if n == 0:
            return
        magnitude = np.abs(audio)
        self._peak = max(self._peak, float(magnitude.max()))
        self._over += int(np.count_nonzero(magnitude > 1.0))
        if self._oversampler is not None:
            up = self._oversampler.resample_chunk(np.ascontiguousarray(audio.T, dtype=np.float32))
            if up.size:
                self._true_peak = max(self._true_peak, float(np.abs(up).max()))
        self._accumulate_loudness(audio.astype(np.float64))
        self._frames += n

    def _accumulate_loudness(self, audio: np.ndarray) -> None:
        from scipy.signal import lfilter

        weighted = audio
        for i, (b, a, gain) in enumerate(self._stages):
            weighted, self._states[i] = lfilter(b, a, weighted, axis=1, zi=self._states[i])
            weighted = gain * weighted
        squared = weighted * weighted
        start, end = self._frames, self._frames + audio.shape[1]
        offset = 0
        boundary = self._next_boundary()
        while boundary <= end:
            cut = boundary - start
            self._segment_sums[-1] += squared[:, offset:cut].sum(axis=1)
            self._segment_starts.append(boundary)
            self._segment_sums.append(np.zeros(self.channels))
            offset = cut
            self._advance_boundary(boundary)
            boundary = self._next_boundary()
        self._segment_sums[-1] += squared[:, offset:].sum(axis=1)

    def _loudness(self) -> float:
        """Integrated loudness with pyloudnorm's block count and gating (BS.1770-4 eq. 3-7)."""
        rate, frames = self.sample_rate, self._frames
        if frames < _BLOCK_SECONDS * rate:  # pyloudnorm refuses these; no gating block fits
            return -math.inf
        step = 1.0 - _OVERLAP
        blocks = int(np.round((frames / rate - _BLOCK_SECONDS) / (_BLOCK_SECONDS * step))) + 1
        starts = np.asarray(self._segment_starts)
        cumulative = np.concatenate([np.zeros((1, self.channels)), np.cumsum(self._segment_sums, axis=0)])
        z = np.zeros((self.channels, blocks))
        for j in range(blocks):
            lo = np.searchsorted(starts, self._lower(j))
            hi = np.searchsorted(starts, min(self._upper(j), frames))
            if hi < len(starts) and starts[hi] == min(self._upper(j), frames):
                total = cumulative[hi] - cumulative[lo]
            else:  # the block runs to the end of the signal: include the open last segment
                total = cumulative[len(starts)] - cumulative[lo]
            z[:, j] = total / (_BLOCK_SECONDS * rate)
        gains = np.asarray(_CHANNEL_GAINS[: self.channels])[:, None]
        with np.errstate(divide="ignore"):
            block_loudness = -0.691 + 10.0 * np.log10(np.sum(gains * z, axis=0))
        gated = block_loudness >= _ABSOLUTE_GATE
        if not gated.any():
            return -math.inf
        relative_gate = -0.691 + 10.0 * np.log10(np.sum(gains[:, 0] * z[:, gated].mean(axis=1))) - 10.0
        gated = (block_loudness > relative_gate) & (block_loudness > _ABSOLUTE_GATE)
        if not gated.any():
            return -math.inf
        power = np.sum(gains[:, 0] * z[:, gated].mean(axis=1))
        return float(-0.691 + 10.0 * math.log10(power)) if power > 0 else -math.inf

    def report(self, gain_db: float = 0.0) -> LevelReport:
        """Finish the measurement (further :meth:`add` calls are refused) and return the levels."""
        if self._report is None:
            true_peak = None
            if self._true_peak_enabled:
                if self._oversampler is not None:
                    tail = self._oversampler.resample_chunk(np.zeros((0, self.channels), np.float32), last=True)
                    if tail.size:
                        self._true_peak = max(self._true_peak, float(np.abs(tail).max()))
                # the oversampled signal's peak, never below the sample peak
                true_peak = to_db(max(self._true_peak, self._peak))
            total = self._frames * self.channels
            self._report = LevelReport(
                to_db(self._peak), self._loudness(), self._over / total if total else 0.0, 0.0, true_peak, self._frames
            )
        return self._report.with_gain(gain_db)


def measure(audio, sample_rate: int = 44100, true_peak: bool = True) -> LevelReport:
    """Levels of an in-memory (channels, n) or (n,) signal."""
    audio = np.asarray(audio)
    if audio.ndim == 1:
        audio = audio[None]
    meter = LevelMeter(sample_rate, audio.shape[0], true_peak)
    meter.add(audio)
    return meter.report()


def measure_file(path, chunk_frames: int = COPY_CHUNK_FRAMES, true_peak: bool = True) -> LevelReport:
    """Levels of an audio file, read in chunks (memory flat)."""
    import soundfile as sf

    with sf.SoundFile(str(path)) as f:
        meter = LevelMeter(f.samplerate, f.channels, true_peak)
        for block in f.blocks(blocksize=chunk_frames, dtype="float32", always_2d=True):
            meter.add(block.T)
    return meter.report()


def validate_normalization(
    mode: str | None, ceiling_dbfs: float = DEFAULT_CEILING_DBFS, target_lufs: float = DEFAULT_TARGET_LUFS
) -> None:
    """Refuse unusable normalisation settings (ValueError, one line, before any work)."""
    if mode is not None and mode not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZE_MODES)}, got {mode!r}")
    ceiling_dbfs, target_lufs = real_number(ceiling_dbfs, "ceiling_dbfs"), real_number(target_lufs, "target_lufs")
    if not (math.isfinite(ceiling_dbfs) and ceiling_dbfs <= 0.0):
        raise ValueError(f"the ceiling (--ceiling) must be a finite level <= 0 dBFS, got {ceiling_dbfs:g}")
    if not (math.isfinite(target_lufs) and _ABSOLUTE_GATE < target_lufs <= 0.0):
        raise ValueError(f"the loudness target (--target-lufs) must be in (-70, 0] LUFS, got {target_lufs:g}")


def normalization_gain(
    report: LevelReport,
    mode: str | None,
    ceiling_dbfs: float = DEFAULT_CEILING_DBFS,
    target_lufs: float = DEFAULT_TARGET_LUFS,
) -> float:
    """The gain in dB that a normalisation applies to the measured audio (0 for ``mode=None`` and for silence).

    ``peak``: the sample peak goes to ``ceiling_dbfs``. ``loudness``: the integrated loudness goes to
    ``target_lufs``, reduced if needed so that the true peak (the sample peak without a true-peak measurement) stays
    at or below ``ceiling_dbfs``.
    """
    validate_normalization(mode, ceiling_dbfs, target_lufs)
    if mode is None or report.peak_dbfs == -math.inf:
        return 0.0
    if mode == "peak":
        return float(ceiling_dbfs - report.peak_dbfs)
    if report.lufs == -math.inf:  # too short or too quiet for BS.1770 gating: nothing to aim at
        return 0.0
    gain = target_lufs - report.lufs
    peak = report.true_peak_dbfs if report.true_peak_dbfs is not None else report.peak_dbfs
    return float(min(gain, ceiling_dbfs - peak))


def apply_gain(audio: np.ndarray, gain_db: float = 0.0, clamp: bool = True) -> np.ndarray:
    """``audio * 10^(gain/20)`` as float32, then the official clamp to [-1, 1] unless ``clamp=False``."""
    out = np.asarray(audio, dtype=np.float32)
    if gain_db != 0.0:
        out = out * np.float32(db_to_gain(gain_db))
    return np.clip(out, -1.0, 1.0) if clamp else out


def copy_with_gain(
    source, writer, gain_db: float = 0.0, clamp: bool = True, chunk_frames: int = COPY_CHUNK_FRAMES
) -> int:
    """Copy the (raw, float) audio file ``source`` into ``writer`` (anything with ``write((n, channels))``, e.g. an
    :func:`mlx_sa3.audio.open_writer`), applying ``gain_db`` and the clamp chunk by chunk. Returns the frames copied."""
    import soundfile as sf

    frames = 0
    with sf.SoundFile(str(Path(source))) as f:
        for block in f.blocks(blocksize=chunk_frames, dtype="float32", always_2d=True):
            writer.write(apply_gain(block, gain_db, clamp))
            frames += block.shape[0]
    return frames


__all__ = [
    "CLIP_WARNING_FRACTION",
    "DEFAULT_CEILING_DBFS",
    "DEFAULT_TARGET_LUFS",
    "NORMALIZE_MODES",
    "LevelMeter",
    "LevelReport",
    "apply_gain",
    "clipping_warning",
    "copy_with_gain",
    "db_to_gain",
    "measure",
    "measure_file",
    "normalization_gain",
    "to_db",
    "validate_normalization",
]
