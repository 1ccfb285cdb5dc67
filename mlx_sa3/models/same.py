"""SAME autoencoders of Stable Audio 3 (SAME-S and SAME-L): 44.1 kHz stereo <-> 256-d latents at 4096x.

Pipeline (official ``AudioAutoencoder`` with a ``PatchedPretransform``)::

    encode: audio -> patches (2 ch x 256 samples = 512-d frames) -> mapping conv -> groups of 16 frames + 1 learned
            token -> transformer blocks -> keep the learned token -> Linear -> soft-norm bottleneck
    decode: bottleneck -> Linear -> each latent + 16 learned tokens -> transformer blocks -> keep the 16 learned tokens
            -> mapping conv -> frames -> audio

Everything runs channels-last ``(B, T, C)`` inside; the public API takes and returns channels-first arrays.

The two variants (SAME-S: chunked attention, SAME-L: band attention) differ only in config values; how lengths
are padded, trimmed and streamed: docs/ARCHITECTURE.md, "SAME length handling".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading import CheckpointError, check_float_audio, fold_weight_norm, to_mx
from ..options import at_least, whole_number
from . import kernels
from .kernels import _attention, _swiglu, dyt, masked_attention_cpu, sin

ROPE_BASE = 10000.0
SIN_GATE_PI = 3.14159265359  # the official constant (not math.pi) for the sin(pi x) gate
NOISE_REGULARIZE_SCALE = 1e-3  # inference-time latent noise of the official bottleneck, relative to its scale


@dataclass
class ResamplerConfig:
    """One transformer resampling block (the official ``TransformerResamplingBlock``) of the encoder or decoder."""

    width: int = 768
    stride: int = 16
    depth: int = 6
    head_dim: int = 64
    ff_mult: float = 3
    differential: bool = True
    chunk_size: int = 32  # frames per attention chunk; unused when sliding_window is set
    chunk_midpoint_shift: bool = False
    sliding_window: tuple[int, int] | None = None  # latent groups attended on the (left, right) of each token
    mapping_kernel: int = 1
    sinusoidal_blocks: int = 0  # blocks i with depth - i < sinusoidal_blocks gate with sin(pi x)
    shared_new_token: bool = True  # official ``variable_stride``: one learned token broadcast over the stride

    @classmethod
    def from_dict(cls, d: dict, decoder: bool) -> "ResamplerConfig":
        """Read the official SAMEEncoder/SAMEDecoder ``config``; unknown keys are ignored."""
        for key in ("c_mults", "strides", "transformer_depths"):
            if len(d.get(key, [None])) != 1:
                raise ValueError(f"SAME {key} must have exactly one level, got {d.get(key)}")
        unsupported = [k for k in ("conformer", "layer_scale", "cross_attn", "feat_scale", "mask_noise") if d.get(k)]
        if not d.get("dyt", True):
            unsupported.append("dyt=False")
        if not d.get("mapping_bias", True):
            unsupported.append("mapping_bias=False")
        if unsupported:
            raise ValueError(f"SAME options not supported by mlx_sa3: {', '.join(unsupported)}")
        window = d.get("sliding_window")
        sinusoidal = d.get("sinusoidal_blocks", [0]) if decoder else [0]  # the official encoder has no sin gates
        return cls(
            width=d["channels"] * d["c_mults"][0],
            stride=d["strides"][0],
            depth=d["transformer_depths"][0],
            head_dim=d.get("dim_heads", 128),
            ff_mult=d.get("ff_mult", 3),
            differential=d.get("differential", True),
            chunk_size=d.get("chunk_size", 128),
            chunk_midpoint_shift=d.get("chunk_midpoint_shift", False),
            sliding_window=None if window is None else (int(window[0]), int(window[1])),
            mapping_kernel=3 if d.get("conv_mapping", False) else 1,
            sinusoidal_blocks=sinusoidal[0],
            shared_new_token=d.get("variable_stride", False),
        )

    def __post_init__(self):
        for name in ("width", "stride", "depth", "head_dim", "chunk_size", "mapping_kernel"):  # one line, not 1/0
            setattr(self, name, at_least(getattr(self, name), 1, f"SAME {name}"))
        self.head_dim = min(self.head_dim, self.width)
        if self.width % self.head_dim:
            raise ValueError(f"width {self.width} is not a multiple of head_dim {self.head_dim}")
        if self.sliding_window is None and self.chunk_size % self.stride:
            raise ValueError(f"chunk_size {self.chunk_size} must be a multiple of the stride {self.stride}")
        if self.mapping_kernel % 2 == 0:
            raise ValueError("mapping_kernel must be odd ('same' padding)")
        if self.sliding_window is None and self.chunk_midpoint_shift and self.latent_multiple % 2:
            raise ValueError("chunk_midpoint_shift needs an even number of latents per chunk (whole groups)")

    @property
    def group(self) -> int:
        """Tokens per latent group: the stride frames plus the one latent/learned token."""
        return self.stride + 1

    @property
    def latent_multiple(self) -> int:
        """Latent counts are zero-padded to a multiple of this (whole attention chunks)."""
        return 1 if self.sliding_window is not None else self.chunk_size // self.stride

    @property
    def chunk_tokens(self) -> int:
        return self.latent_multiple * self.group

    @property
    def cut_trim(self) -> tuple[int, int]:
        """Latent groups dropped next to an artificial (left, right) cut while the blocks run (band attention only).

        A token within one window of a cut misses part of its neighbourhood, so after every block that many tokens
        are wrong on the cut side and nothing exact depends on them any more: they are dropped as we go.
        """
        if self.sliding_window is None:
            return 0, 0
        return tuple(self.depth * w for w in self.sliding_window)

    @property
    def cut_margin(self) -> tuple[int, int]:
        """Latents next to an artificial (left, right) cut whose output differs from the uncut sequence.

        Band attention: one window per block (``cut_trim``). Chunked attention on chunk-aligned cuts is only
        disturbed by the repeat-padded half chunk of the shifted layout. A mapping kernel > 1 reaches across group
        borders, so it needs whole neighbouring groups on top.
        """
        conv = math.ceil((self.mapping_kernel // 2) / self.stride)
        shifted = self.latent_multiple // 2 if self.sliding_window is None and self.chunk_midpoint_shift else 0
        trim_left, trim_right = self.cut_trim
        return trim_left + shifted + conv, trim_right + shifted + conv


@dataclass
class SAMEConfig:
    latent_dim: int = 256
    io_channels: int = 2
    patch_size: int = 256
    sample_rate: int = 44100
    encoder: ResamplerConfig = field(default_factory=ResamplerConfig)
    decoder: ResamplerConfig = field(default_factory=ResamplerConfig)
    auto_scale: bool = True  # the bottleneck carries a running_std
    noise_regularize: bool = False
    soft_clip: bool = False

    def __post_init__(self):
        for name in ("latent_dim", "io_channels", "patch_size", "sample_rate"):  # one line, not a division by zero
            setattr(self, name, at_least(getattr(self, name), 1, f"SAME {name}"))

    @classmethod
    def from_dict(cls, d: dict, sample_rate: int | None = None) -> "SAMEConfig":
        """Read the ``model`` section of a SAME repo's model_config.json, or the ``model.pretransform.config``
        section (or whole ``model`` section) of a full SA3 repo. Unknown keys are ignored."""
        if "encoder" not in d and "pretransform" in d:
            d = d["pretransform"]["config"]
        patched = d["pretransform"]
        if patched.get("type", "patched") != "patched":
            raise ValueError(f"unsupported SAME pretransform {patched.get('type')!r}")
        patch = patched["config"]
        if patch.get("oversampling", 1) != 1 or patch.get("postfilter_channels", 0):
            raise ValueError("SAME pretransform oversampling / postfilter are not supported")
        bottleneck = d["bottleneck"]
        if bottleneck.get("type", "softnorm") != "softnorm":
            raise ValueError(f"unsupported SAME bottleneck {bottleneck.get('type')!r}")
        if bottleneck["config"].get("noise_augment_dim", 0):
            raise ValueError("SAME bottleneck noise_augment_dim > 0 is not supported")
        config = cls(
            latent_dim=d["latent_dim"],
            io_channels=patch["channels"],
            patch_size=patch["patch_size"],
            sample_rate=int(sample_rate or d.get("sample_rate", 44100)),
            encoder=ResamplerConfig.from_dict(d["encoder"]["config"], decoder=False),
            decoder=ResamplerConfig.from_dict(d["decoder"]["config"], decoder=True),
            auto_scale=bottleneck["config"].get("auto_scale", False),
            noise_regularize=bottleneck["config"].get("noise_regularize", False),
            soft_clip=d["decoder"]["config"].get("soft_clip", False),
        )
        if d.get("downsampling_ratio", config.downsampling_ratio) != config.downsampling_ratio:
            raise ValueError(
                f"downsampling_ratio {d['downsampling_ratio']} != patch_size x stride = {config.downsampling_ratio}"
            )
        return config

    @classmethod
    def preset(cls, name: str) -> "SAMEConfig":
        """Full-size configs: "same-s" (stabilityai/SAME-S, SA3 small) or "same-l" (stabilityai/SAME-L, SA3 medium)."""
        if name == "same-s":
            block = dict(width=768, depth=6, chunk_size=32, chunk_midpoint_shift=True)
            return cls(encoder=ResamplerConfig(**block), decoder=ResamplerConfig(**block, mapping_kernel=3))
        if name == "same-l":
            block = dict(width=1536, depth=12, sliding_window=(1, 1))
            return cls(encoder=ResamplerConfig(**block), decoder=ResamplerConfig(**block, sinusoidal_blocks=8))
        raise ValueError(f"unknown SAME preset {name!r}; choose same-s or same-l")

    @property
    def frame_dim(self) -> int:
        return self.io_channels * self.patch_size

    @property
    def downsampling_ratio(self) -> int:
        return self.patch_size * self.encoder.stride


# ----------------------------------------------------------------------------------------------------------------
# Lengths, stream windows and attention layouts: pure functions of the config, shared by every backend


def padded_length(config: SAMEConfig, length: int) -> int:
    """Latents the decoder runs on for ``length`` latents: whole attention chunks."""
    multiple = config.decoder.latent_multiple
    return -(-length // multiple) * multiple


def encoder_frame_padding(config: SAMEConfig, frames: int) -> int:
    """Zero frames appended before the encoder so that it sees whole attention units."""
    return -frames % (config.encoder.latent_multiple * config.encoder.stride)


def latent_count(config: SAMEConfig, samples: int) -> int:
    """Latents kept for ``samples`` audio samples: ceil(samples / downsampling_ratio)."""
    return -(-samples // config.downsampling_ratio)


def default_chunk_latents(config: SAMEConfig) -> int:
    """Stream chunk of at most ~1/12 extra work for the cut margins (band margins cost half: they shrink as the
    blocks run), rounded to whole attention chunks. Windows stay well below the 30 s of a typical request, so
    memory does not grow with the length."""
    multiple = config.decoder.latent_multiple
    size = max(96, 12 * sum(config.decoder.cut_margin))
    return -(-size // multiple) * multiple


def stream_windows(
    config: SAMEConfig, length: int, chunk_latents: int | None = None, keep_latents: int | None = None
) -> list[tuple[int, int, int, int]]:
    """(window_start, window_stop, start, stop) latent ranges: piece [start, stop) decodes from the window.

    The pieces cover latents [0, ``keep_latents``) (default: all ``length``) of a ``length``-latent sequence: a
    caller that keeps only the first seconds (the pipeline drops the DiT's headroom) decodes no window past them,
    and the pieces are what the full decode gives. With the default chunk the pieces are balanced: n windows of
    ~keep / n latents, n = ceil(keep / default_chunk_latents), never a short tail window with its own margins.
    """
    keep = length if keep_latents is None else min(whole_number(keep_latents, "keep_latents"), length)
    if keep < 1:
        raise ValueError(f"keep_latents must be >= 1, got {keep_latents}")
    multiple = config.decoder.latent_multiple
    if chunk_latents is None:
        # Whole attention chunks dealt out evenly: sizes differ by at most one chunk (and the end's remainder).
        units = -(-keep // multiple)
        count = -(-keep // default_chunk_latents(config))
        bounds = [min(keep, multiple * (i * units // count)) for i in range(count + 1)]
    else:
        chunk = whole_number(chunk_latents, "chunk_latents")
        if chunk < 1:
            raise ValueError(f"chunk_latents must be >= 1, got {chunk_latents}")
        bounds = [*range(0, keep, chunk), keep]
    padded = padded_length(config, length)
    margin_left, margin_right = config.decoder.cut_margin
    windows = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        window_start = max(0, (start - margin_left) // multiple * multiple)
        window_stop = min(padded, -(-(stop + margin_right) // multiple) * multiple)
        windows.append((window_start, window_stop, start, stop))
    return windows


def window_cuts(config: SAMEConfig, window_start: int, window_stop: int, length: int) -> tuple[bool, bool]:
    """Which ends of a decode window are artificial cuts rather than the ends of the (padded) sequence."""
    return window_start > 0, window_stop < padded_length(config, length)


def piece_frames(config: SAMEConfig, window_start: int, cuts: tuple[bool, bool], start: int, stop: int) -> slice:
    """The decoded frames of the window that belong to latents [start, stop) (cut-side groups already dropped)."""
    first = window_start + (config.decoder.cut_trim[0] if cuts[0] else 0)  # latent of the first frame
    stride = config.decoder.stride
    return slice((start - first) * stride, (stop - first) * stride)


def run_blocks(cfg: ResamplerConfig, blocks, x, first_group: int, cuts, run_block, arange, concat):
    """The attention layout of the official TransformerResamplingBlock over (B, T, D) tokens, for any backend.

    ``run_block(block, x, positions, band)`` runs one block, ``arange`` / ``concat`` (along the token axis) are the
    backend's. Band attention counts RoPE positions over the whole sequence and drops ``cut_trim`` tokens next to
    artificial cuts after every block; chunked attention restarts positions in every chunk, and the shifted half
    of the blocks repeat-pads half a chunk at both ends so that chunks straddle the old borders.
    """
    if cfg.sliding_window is not None:
        start = first_group * cfg.group
        positions = arange(start, start + x.shape[1])
        band = tuple(w * cfg.group for w in cfg.sliding_window)
        drop_left, drop_right = (w if cut else 0 for w, cut in zip(band, cuts))
        for block in blocks:
            x = run_block(block, x, positions, band)
            stop = x.shape[1] - drop_right
            x, positions = x[:, drop_left:stop], positions[drop_left:stop]
        return x
    if first_group % cfg.latent_multiple:
        raise ValueError(f"chunked attention needs chunk-aligned input, got first latent {first_group}")

    def chunked(x, blocks):
        batch, tokens, dim = x.shape
        size = cfg.chunk_tokens
        positions = arange(0, size)
        x = x.reshape(batch * tokens // size, size, dim)
        for block in blocks:
            x = run_block(block, x, positions, None)
        return x.reshape(batch, tokens, dim)

    split = cfg.depth // 2 if cfg.chunk_midpoint_shift else cfg.depth
    x = chunked(x, blocks[:split])
    if split < cfg.depth:
        half = cfg.chunk_tokens // 2
        x = chunked(concat([x[:, :half], x, x[:, -half:]]), blocks[split:])[:, half:-half]
    return x


# ----------------------------------------------------------------------------------------------------------------
# Transformer pieces


class DyT(nn.Module):
    """Dynamic tanh, the norm of every SAME block: gamma * tanh(alpha * x) + beta with a scalar alpha."""

    def __init__(self, dim: int):
        super().__init__()
        self.alpha = mx.full((1,), 4.0)
        self.gamma = mx.ones((dim,))
        self.beta = mx.zeros((dim,))

    def __call__(self, x: mx.array) -> mx.array:
        return dyt(x, self.alpha, self.gamma, self.beta)


def rope_inv_freq(rotary_dims: int) -> mx.array:
    """Inverse frequencies of the official RotaryEmbedding, computed the same way in float32."""
    return 1.0 / mx.power(ROPE_BASE, mx.arange(0, rotary_dims, 2, dtype=mx.float32) / rotary_dims)


def apply_partial_rope(x: mx.array, angles: mx.array) -> mx.array:
    """Rotate the first 2 * angles.shape[-1] dims of x (B, T, H, d) in half-split pairs; keep the rest."""
    half = angles.shape[-1]
    cos = mx.cos(angles)[:, None, :]
    sin = mx.sin(angles)[:, None, :]
    x1 = x[..., :half].astype(mx.float32)
    x2 = x[..., half : 2 * half].astype(mx.float32)
    rotated = mx.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)
    return mx.concatenate([rotated, x[..., 2 * half :]], axis=-1)


def softmax_attention(q: mx.array, k: mx.array, v: mx.array, mask: mx.array | None = None) -> mx.array:
    """Attention over the last two axes, any leading axes; ``mask`` (bool, True = attend) broadcasts."""
    scale = q.shape[-1] ** -0.5
    if not kernels._use_fused_kernels():
        # The CPU's base-2 softmax kernels (MLX's exp is scalar there): the chunked SAME-S decoder layer 38 -> 21 ms.
        if mask is None:
            return _attention(q, k, v, scale)
        return masked_attention_cpu(q, k, v, scale, mask)
    scores = (q * scale) @ k.swapaxes(-1, -2)
    if mask is not None:
        scores = mx.where(mask, scores, -mx.inf)
    return mx.softmax(scores, axis=-1, precise=True) @ v


def banded_attention(q: mx.array, k: mx.array, v: mx.array, left: int, right: int) -> mx.array:
    """Attention of token i to tokens i - left .. i + right (truncated at the ends) for q, k, v (B, H, T, d).

    Queries go in blocks of ``block`` tokens, each against its own block plus ``left`` / ``right`` neighbouring
    keys, so memory and work grow linearly with T (never a T x T mask).
    """
    B, H, T, d = q.shape
    block = max(64, left, right)
    n = -(-T // block)
    qb = mx.pad(q, [(0, 0), (0, 0), (0, n * block - T), (0, 0)]).reshape(B, H, n, block, d)

    def neighbourhoods(x):
        x = mx.pad(x, [(0, 0), (0, 0), (block, (n + 1) * block - T), (0, 0)]).reshape(B, H, n + 2, block, d)
        return mx.concatenate([x[:, :, :-2, block - left :], x[:, :, 1:-1], x[:, :, 2:, :right]], axis=3)

    query_pos = mx.arange(n * block).reshape(n, block, 1)
    key_pos = (mx.arange(n) * block)[:, None, None] + mx.arange(-left, block + right)[None, None, :]
    offset = key_pos - query_pos
    mask = (key_pos >= 0) & (key_pos < T) & (offset >= -left) & (offset <= right)
    out = softmax_attention(qb, neighbourhoods(k), neighbourhoods(v), mask)
    return out.reshape(B, H, n * block, d)[:, :, :T]


class Attention(nn.Module):
    """Self-attention with DyT q/k norms and RoPE on half of each head; differential: A(q,k)v - A(q2,k2)v."""

    def __init__(self, dim: int, head_dim: int, differential: bool):
        super().__init__()
        self.heads = dim // head_dim
        self.head_dim = head_dim
        self.differential = differential
        # Fused projection, rows ordered [q | k | v | q2 | k2] as in the official checkpoint.
        self.qkv = nn.Linear(dim, dim * (5 if differential else 3), bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        self.q_norm = DyT(head_dim)
        self.k_norm = DyT(head_dim)
        self._inv_freq = rope_inv_freq(head_dim // 2)

    def __call__(self, x: mx.array, positions: mx.array, band: tuple[int, int] | None) -> mx.array:
        B, T, _ = x.shape
        parts = self.qkv(x).reshape(B, T, -1, self.heads, self.head_dim)
        angles = positions.astype(mx.float32)[:, None] * self._inv_freq[None, :]

        def query(i):
            return apply_partial_rope(self.q_norm(parts[:, :, i]), angles).transpose(0, 2, 1, 3)

        def key(i):
            return apply_partial_rope(self.k_norm(parts[:, :, i]), angles).transpose(0, 2, 1, 3)

        def attend(q, k, v):
            return softmax_attention(q, k, v) if band is None else banded_attention(q, k, v, *band)

        v = parts[:, :, 2].transpose(0, 2, 1, 3)
        out = attend(query(0), key(1), v)
        if self.differential:
            out = out - attend(query(3), key(4), v)
        return self.out(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class GatedFeedForward(nn.Module):
    """GLU feed-forward: proj_out(a * gate(b)) with [a | b] = proj_in(x); gate SiLU, or sin(pi x) in late blocks."""

    def __init__(self, dim: int, hidden: int, sin_gate: bool):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * hidden)
        self.proj_out = nn.Linear(hidden, dim)
        self.sin_gate = sin_gate

    def __call__(self, x: mx.array) -> mx.array:
        projected = self.proj_in(x)
        if not self.sin_gate:
            return self.proj_out(_swiglu(projected))  # a * silu(b), with the CPU kernel there
        a, b = mx.split(projected, 2, axis=-1)
        return self.proj_out(a * sin(b, SIN_GATE_PI))  # the CPU kernel there (MLX's sin is scalar)


class TransformerBlock(nn.Module):
    def __init__(self, cfg: ResamplerConfig, sin_gate: bool):
        super().__init__()
        self.attn_norm = DyT(cfg.width)
        self.attn = Attention(cfg.width, cfg.head_dim, cfg.differential)
        self.ff_norm = DyT(cfg.width)
        self.ff = GatedFeedForward(cfg.width, int(cfg.width * cfg.ff_mult), sin_gate)

    def __call__(self, x: mx.array, positions: mx.array, band: tuple[int, int] | None) -> mx.array:
        x = x + self.attn(self.attn_norm(x), positions, band)
        return x + self.ff(self.ff_norm(x))


class Resampler(nn.Module):
    """Folds ``stride`` frames into one latent token (encoder) or unfolds one into ``stride`` frames (decoder).

    Each latent group is 17 tokens: the encoder appends one learned token after the 16 frames and keeps it, the
    decoder follows the latent token with 16 learned tokens and keeps those.
    """

    def __init__(self, cfg: ResamplerConfig, frame_dim: int, decoder: bool):
        super().__init__()
        self.cfg = cfg
        k = cfg.mapping_kernel
        dims = (cfg.width, frame_dim) if decoder else (frame_dim, cfg.width)
        self.mapping = nn.Conv1d(*dims, kernel_size=k, padding=k // 2)
        per_group = 1 if cfg.shared_new_token or not decoder else cfg.stride
        self.new_tokens = mx.zeros((1, per_group, cfg.width))
        self.blocks = [TransformerBlock(cfg, cfg.depth - i < cfg.sinusoidal_blocks) for i in range(cfg.depth)]

    def encode(self, frames: mx.array) -> mx.array:
        """(B, n * stride, frame_dim) frames, n a multiple of ``latent_multiple`` -> (B, n, width) tokens."""
        x = self.mapping(frames)
        B, F, D = x.shape
        n, S = F // self.cfg.stride, self.cfg.stride
        learned = mx.broadcast_to(self.new_tokens.reshape(1, 1, 1, D), (B, n, 1, D)).astype(x.dtype)
        x = mx.concatenate([x.reshape(B, n, S, D), learned], axis=2).reshape(B, n * (S + 1), D)
        x = self.transform(x, first_group=0)
        return x.reshape(B, n, S + 1, D)[:, :, -1]

    def decode(self, tokens: mx.array, first_group: int, cuts: tuple[bool, bool] = (False, False)) -> mx.array:
        """(B, n, width) latent tokens starting at latent ``first_group`` -> (B, m * stride, frame_dim) frames.

        ``cuts`` marks (left, right) ends that are artificial cuts rather than the sequence ends; the ``cut_trim``
        groups next to them are dropped, so m = n less those.
        """
        B, n, D = tokens.shape
        S = self.cfg.stride
        learned = mx.broadcast_to(self.new_tokens.reshape(1, 1, -1, D), (B, n, S, D)).astype(tokens.dtype)
        x = mx.concatenate([tokens[:, :, None], learned], axis=2).reshape(B, n * (S + 1), D)
        x = self.transform(x, first_group, cuts)
        x = x.reshape(B, -1, S + 1, D)[:, :, 1:].reshape(B, -1, D)
        return self.mapping(x)

    def transform(self, x: mx.array, first_group: int, cuts: tuple[bool, bool] = (False, False)) -> mx.array:
        """Run the blocks over (B, T, D) tokens whose first token belongs to latent ``first_group``."""
        return run_blocks(
            self.cfg,
            self.blocks,
            x,
            first_group,
            cuts,
            lambda block, *a: block(*a),
            mx.arange,
            lambda parts: mx.concatenate(parts, axis=1),
        )


class SoftNormBottleneck(nn.Module):
    """encode: (x * scale + bias) / running_std; decode only multiplies by running_std (scale/bias not inverted)."""

    def __init__(self, dim: int, auto_scale: bool):
        super().__init__()
        self.scale = mx.ones((dim,))
        self.bias = mx.zeros((dim,))
        if auto_scale:
            self.running_std = mx.ones((1,))

    def encode(self, x: mx.array) -> mx.array:
        x = x * self.scale + self.bias
        return x / self.running_std if "running_std" in self else x

    def decode(self, z: mx.array, noise: mx.array | None = None) -> mx.array:
        """``noise`` (standard normal, z's shape) adds the official noise regularisation."""
        if "running_std" in self:
            z = z * self.running_std
        if noise is not None:
            # Without a running std the official code scales by each channel's std over time.
            scaling = self.running_std if "running_std" in self else mx.std(z, axis=1, keepdims=True, ddof=1)
            z = z + noise * scaling * NOISE_REGULARIZE_SCALE
        return z


# ----------------------------------------------------------------------------------------------------------------
# The autoencoder


class AutoencoderInterface:
    """What every backend's SAME autoencoder derives from its ``config`` alone: sizes, stream windows, ``decode``.

    A backend provides ``_prepare_latents`` (validated, bottleneck-decoded (B, L, C) latents) and ``_decode_window``.
    """

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def latent_dim(self) -> int:
        return self.config.latent_dim

    @property
    def downsampling_ratio(self) -> int:
        return self.config.downsampling_ratio

    @property
    def default_chunk_latents(self) -> int:
        return default_chunk_latents(self.config)

    def stream_windows(
        self, length: int, chunk_latents: int | None = None, keep_latents: int | None = None
    ) -> list[tuple[int, int, int, int]]:
        """(window_start, window_stop, start, stop) latent ranges: piece [start, stop) decodes from the window."""
        return stream_windows(self.config, length, chunk_latents, keep_latents)

    def _padded_length(self, length: int) -> int:
        return padded_length(self.config, length)

    def decode(self, latents, *, noise_regularize: bool | None = None, seed: int | None = None) -> mx.array:
        """(B, latent_dim, L) latents -> (B, io_channels, L * downsampling_ratio) audio.

        ``noise_regularize`` (default: the config's value) adds the official N(0, 1) * running_std * 1e-3 latent
        noise; ``seed`` makes it reproducible. An odd latent count for SAME-S is zero-padded as the official code
        does, and the padding's audio is dropped.
        """
        z = self._prepare_latents(latents, noise_regularize, seed)
        length = z.shape[1]
        return self._decode_window(z, 0, self._padded_length(length), 0, length)

    def decode_stream(
        self,
        latents,
        chunk_latents: int | None = None,
        *,
        noise_regularize: bool | None = None,
        seed: int | None = None,
        keep_latents: int | None = None,
    ) -> Iterator[mx.array]:
        """Yield (B, io_channels, n) audio pieces of ``chunk_latents`` latents each that concatenate to ``decode``.

        ``chunk_latents`` defaults to ``default_chunk_latents`` (balanced over the pieces); any size >= 1 is exact.
        Each piece is decoded from a window that extends past it by the config's cut margins (aligned to whole
        attention chunks), so the result is exact, not cross-faded. Each piece is evaluated before it is yielded:
        memory is bounded by the window. ``keep_latents`` stops after the audio of the first that many latents
        (exactly the start of the full decode): work past them is never done.
        """
        z = self._prepare_latents(latents, noise_regularize, seed)
        for window in self.stream_windows(z.shape[1], chunk_latents, keep_latents):
            piece = self._decode_window(z, *window)
            mx.eval(piece)
            yield piece


class SAMEAutoencoder(AutoencoderInterface, nn.Module):
    def __init__(self, config: SAMEConfig):
        super().__init__()
        self.config = config
        self.encoder = Resampler(config.encoder, config.frame_dim, decoder=False)
        self.to_latent = nn.Linear(config.encoder.width, config.latent_dim)
        self.bottleneck = SoftNormBottleneck(config.latent_dim, config.auto_scale)
        self.from_latent = nn.Linear(config.latent_dim, config.decoder.width)
        self.decoder = Resampler(config.decoder, config.frame_dim, decoder=True)

    # -- encode ----------------------------------------------------------------------------------------------

    def encode(self, audio) -> mx.array:
        """(B, io_channels, T) audio at ``sample_rate`` -> (B, latent_dim, ceil(T / downsampling_ratio)) latents.

        Like the official code, the audio is zero-padded to whole patches and the frames to whole attention units.
        """
        check_float_audio(audio)
        audio = to_mx(audio, mx.float32)
        if audio.ndim != 3 or audio.shape[1] != self.config.io_channels or audio.shape[2] == 0:
            raise ValueError(
                f"audio must be (batch, {self.config.io_channels}, samples) with samples > 0, got {audio.shape}"
            )
        cfg = self.config
        frames = self._patch(audio)
        frames = mx.pad(frames, [(0, 0), (0, encoder_frame_padding(cfg, frames.shape[1])), (0, 0)])
        dtype = self.to_latent.weight.dtype
        tokens = self.encoder.encode(frames.astype(dtype))
        latents = self.bottleneck.encode(self.to_latent(tokens).astype(mx.float32))
        return latents[:, : latent_count(cfg, audio.shape[2])].transpose(0, 2, 1)

    def _patch(self, audio: mx.array) -> mx.array:
        B, C, T = audio.shape
        P = self.config.patch_size
        audio = mx.pad(audio, [(0, 0), (0, 0), (0, -T % P)])
        return audio.reshape(B, C, -1, P).transpose(0, 2, 1, 3).reshape(B, -1, C * P)

    def _unpatch(self, frames: mx.array) -> mx.array:
        B, F, _ = frames.shape
        P = self.config.patch_size
        return frames.reshape(B, F, -1, P).transpose(0, 2, 1, 3).reshape(B, -1, F * P)

    # -- decode ----------------------------------------------------------------------------------------------

    def _prepare_latents(self, latents, noise_regularize: bool | None, seed: int | None) -> mx.array:
        z = to_mx(latents, mx.float32)
        if z.ndim != 3 or z.shape[1] != self.config.latent_dim or z.shape[2] == 0:
            raise ValueError(
                f"latents must be (batch, {self.config.latent_dim}, length) with length > 0, got {z.shape}"
            )
        z = z.transpose(0, 2, 1)
        if noise_regularize is None:
            noise_regularize = self.config.noise_regularize
        noise = None
        if noise_regularize:
            key = None if seed is None else mx.random.key(seed)
            noise = mx.random.normal(z.shape, key=key)
        return self.bottleneck.decode(z, noise)

    def _decode_window(self, z: mx.array, window_start: int, window_stop: int, start: int, stop: int) -> mx.array:
        """Audio of latents [start, stop) decoded from the latent window [window_start, window_stop).

        Windows may run past the end of z up to a whole chunk: those latents are the official zero padding,
        applied after the input projection.
        """
        tokens = self.from_latent(z[:, window_start : min(window_stop, z.shape[1])])
        tokens = mx.pad(tokens, [(0, 0), (0, window_stop - window_start - tokens.shape[1]), (0, 0)])
        cuts = window_cuts(self.config, window_start, window_stop, z.shape[1])
        frames = self.decoder.decode(tokens, window_start, cuts)
        audio = self._unpatch(frames[:, piece_frames(self.config, window_start, cuts, start, stop)])
        return mx.tanh(audio) if self.config.soft_clip else audio


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints

_RENAMES = (
    (r"^encoder\.layers\.0\.", "encoder."),
    (r"^encoder\.layers\.2\.", "to_latent."),
    (r"^decoder\.layers\.1\.", "from_latent."),
    (r"^decoder\.layers\.3\.", "decoder."),
    (r"\.transformers\.(\d+)\.", r".blocks.\1."),
    (r"\.pre_norm\.", ".attn_norm."),
    (r"\.self_attn\.to_qkv\.", ".attn.qkv."),
    (r"\.self_attn\.to_out\.", ".attn.out."),
    (r"\.self_attn\.", ".attn."),
    (r"\.ff\.ff\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.ff\.2\.", ".ff.proj_out."),
    (r"^bottleneck\.scaling_factor$", "bottleneck.scale"),
)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Official SAME tensor names (prefix already stripped) -> SAMEAutoencoder parameter names and layouts.

    Weight norm is folded; conv weights go from (out, in, k) to MLX's (out, k, in); the bottleneck's (1, C, 1)
    tensors become (C,). ``rope.inv_freq`` buffers are checked against the recomputed frequencies and dropped, as
    is the empty ``noise_scaling_factor``. Anything else keeps its name, so check_strict reports it.
    """
    out = {}
    for key, value in fold_weight_norm(weights).items():
        if key.endswith(".rope.inv_freq"):
            if value.ndim != 1 or not np.allclose(
                np.array(value, dtype=np.float32), np.array(rope_inv_freq(2 * value.shape[0])), rtol=1e-6, atol=0
            ):
                raise CheckpointError(f"{key} differs from the RoPE frequencies base {ROPE_BASE:g} gives")
            continue
        if key == "bottleneck.noise_scaling_factor" and value.size == 0:
            continue
        for pattern, replacement in _RENAMES:
            key = re.sub(pattern, replacement, key)
        if key.endswith(".mapping.weight") and value.ndim == 3:
            value = value.transpose(0, 2, 1)
        if key in ("bottleneck.scale", "bottleneck.bias"):
            value = value.reshape(-1)
        out[key] = value
    return out
