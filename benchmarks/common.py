"""Helpers shared by the benchmarks (not a benchmark itself): FLOP counts, lengths, timing and peak memory.

Benchmarks run as scripts (``python benchmarks/bench_x.py``), so this folder is on ``sys.path`` and they import it as
``common``.
"""

from __future__ import annotations

import os
import resource
import statistics
import sys
import time
from pathlib import Path

from mlx_sa3.models.dit import DiTConfig
from mlx_sa3.models.same import ResamplerConfig, SAMEConfig

SAMPLE_RATE, LATENT_HOP, CONTEXT_TOKENS = 44100, 4096, 257


def latent_length(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE / LATENT_HOP)


def step_flops(config: DiTConfig, length: int, rows: int, cross_rows: int, context: int = CONTEXT_TOKENS) -> float:
    """Multiply-add FLOPs (x2) of one forward over ``rows`` sequences, ``cross_rows`` of them cross-attending."""
    e, n, c = config.embed_dim, config.num_memory_tokens + length, config.io_channels
    pairs = 2 if config.differential else 1
    self_attn = 2 * n * e * (5 if config.differential else 3) * e + pairs * 4 * n * n * e + 2 * n * e * e
    cross = 2 * n * e * pairs * e + pairs * 4 * n * context * e + 2 * n * e * e
    ff = 2 * n * e * 2 * config.ff_inner + 2 * n * config.ff_inner * e
    edges = 2 * (2 * length * c * c) + 2 * (2 * length * c * e)
    return config.depth * (rows * (self_attn + ff) + cross_rows * cross) + rows * edges


def latents_for(seconds: float, config: SAMEConfig) -> int:
    return round(seconds * config.sample_rate / config.downsampling_ratio)


def decoder_flops(
    cfg: ResamplerConfig, latents: int, latent_dim: int, frame_dim: int, cuts: tuple[bool, bool] = (False, False)
) -> float:
    """FLOPs (2 per multiply-add) of decoding one window of ``latents`` latents.

    With band attention, a window side that is an artificial cut loses one window of groups after every block.
    """
    D, hidden = cfg.width, int(cfg.width * cfg.ff_mult)
    dropped_per_block = sum(w for w, cut in zip(cfg.sliding_window or (0, 0), cuts) if cut)

    def block(n):
        tokens = n * cfg.group
        if cfg.sliding_window is None:
            keys = cfg.chunk_tokens
        else:
            keys = min(tokens, sum(cfg.sliding_window) * cfg.group + 1)  # band width, ignoring the ends
        projections = 2 * tokens * D * ((5 if cfg.differential else 3) * D + D + 3 * hidden)
        return projections + 2 * 2 * tokens * keys * D * (2 if cfg.differential else 1)

    blocks = sum(block(latents - i * dropped_per_block) for i in range(cfg.depth))
    frames = (latents - cfg.depth * dropped_per_block) * cfg.stride
    return blocks + 2 * latents * latent_dim * D + 2 * frames * D * frame_dim * cfg.mapping_kernel


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS mark at the current RSS (Linux >= 4.0), so ru_maxrss covers what follows only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def timed(fn, repeats: int) -> float:
    """Median wall time of ``fn`` (which must evaluate its result) over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
