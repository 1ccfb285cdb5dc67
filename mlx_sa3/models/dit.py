"""Stable Audio 3 diffusion transformer (DiT): small (standard attention) and medium (differential attention).

The network predicts the flow velocity ``v`` of a noisy latent ``x`` (channels-first, (B, io, L)) at time ``t``,
conditioned on cross-attention tokens (prompt + duration), a global vector (duration, through adaLN) and a local
additive signal (inpainting mask + known latents). Classifier-free guidance with APG is done inside the call, as the
official ``DiffusionTransformer.forward`` does.

Everything that stays fixed during sampling (context embedding, cross-attention keys/values of every block, the
local-conditioning embeddings, the global embedding) is computed once by :meth:`DiT.prepare`; :meth:`DiT.step` only
does the per-step work. Internally the layout is channels-last (B, T, C).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, fields
from typing import Iterator

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading import CheckpointError, to_mx
from ..options import at_least
from ..storage import for_calls, row_blocks
from .diffusion import DEFAULT_OBJECTIVE, OBJECTIVES, DiffusionStep, PrepareAndStep, guide  # noqa: F401  (guide: public here too)
from .kernels import _SCORES_PER_CHUNK, _attention, _swiglu, _swiglu_parts, _use_fused_kernels  # noqa: F401

# Settings of the official DiffusionTransformer / ContinuousTransformer this port implements, with the only value
# it supports. A config asking for anything else is refused instead of being silently run with different maths.
_FIXED_SETTINGS = {
    "patch_size": 1,
    "transformer_type": "continuous_transformer",
    "global_cond_type": "adaLN",
    "timestep_cond_type": "global",
    "timestep_features_type": "expo",
    "timestep_features_logsnr": False,
    "project_cond_tokens": True,
    "project_global_cond": True,
    "input_concat_dim": 0,
    "prepend_cond_dim": 0,
    "norm_type": "rms_norm",
    "conformer": False,
    "layer_scale": False,
    "causal": False,
    "sliding_window": None,
    "cross_attn_rotary_pos_emb": False,
    "rotary_pos_emb": True,
    "modular_local_cond_configs": None,
}
_FIXED_ATTN_SETTINGS = {"qk_norm": "rms", "feat_scale": False}

#: hidden values (batch x tokens x 2 inner) per token chunk of the CPU feed-forward: 16 MB in float32, so the small
#: DiT runs 512 tokens at a time (10 s of audio, 300 tokens, stays one call)
_FF_CHUNK_ELEMENTS = 1 << 22


@dataclass
class DiTConfig:
    io_channels: int
    embed_dim: int
    depth: int
    num_heads: int
    cond_token_dim: int
    global_cond_dim: int
    local_add_cond_dim: int
    num_memory_tokens: int = 0
    differential: bool = False
    ff_mult: float = 4.0
    timestep_features_dim: int = 256
    norm_eps: float = 1e-5
    qk_norm_eps: float = 1e-6
    rope_base: float = 10000.0
    diffusion_objective: str = DEFAULT_OBJECTIVE

    def __post_init__(self):
        if self.diffusion_objective not in OBJECTIVES:
            raise ValueError(f"unsupported diffusion_objective {self.diffusion_objective!r}")
        # a malformed config fails here in one line, not as range("x") or a division by zero while building
        for name in ("io_channels", "embed_dim", "depth", "num_heads", "cond_token_dim", "global_cond_dim"):
            setattr(self, name, at_least(getattr(self, name), 1, f"DiT {name}"))
        self.local_add_cond_dim = at_least(self.local_add_cond_dim, 0, "DiT local_add_cond_dim")
        self.num_memory_tokens = at_least(self.num_memory_tokens, 0, "DiT num_memory_tokens")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"DiT embed_dim {self.embed_dim} is not a multiple of num_heads {self.num_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Build from ``model_config["model"]["diffusion"]["config"]`` (unknown keys are ignored)."""
        attn = d.get("attn_kwargs", {})
        bad = [f"{k}={d[k]!r}" for k, v in _FIXED_SETTINGS.items() if k in d and d[k] != v]
        bad += [f"attn_kwargs.{k}={attn[k]!r}" for k, v in _FIXED_ATTN_SETTINGS.items() if k in attn and attn[k] != v]
        if "qk_norm" not in attn:
            bad.append("attn_kwargs.qk_norm missing (only 'rms' is supported)")
        if bad:
            raise ValueError(f"unsupported DiT settings: {', '.join(bad)}")
        flat = {k: v for k, v in d.items() if k not in ("attn_kwargs", "ff_kwargs", "norm_kwargs")}
        flat["differential"] = attn.get("differential", False)
        flat["qk_norm_eps"] = attn.get("qk_norm_eps", cls.qk_norm_eps)
        flat["ff_mult"] = d.get("ff_kwargs", {}).get("mult", cls.ff_mult)
        flat["norm_eps"] = d.get("norm_kwargs", {}).get("eps", cls.norm_eps)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in flat.items() if k in names})

    @classmethod
    def from_model_config(cls, model_config: dict) -> "DiTConfig":
        """Build from a whole Hub ``model_config.json`` (the objective lives one level above the DiT config)."""
        diffusion = model_config["model"]["diffusion"]
        return cls.from_dict(
            {**diffusion["config"], "diffusion_objective": diffusion.get("diffusion_objective", DEFAULT_OBJECTIVE)}
        )

    @classmethod
    def small(cls) -> "DiTConfig":
        """Full-size stable-audio-3-small(-music/-sfx) DiT."""
        return cls(
            io_channels=256,
            embed_dim=1024,
            depth=20,
            num_heads=16,
            cond_token_dim=768,
            global_cond_dim=768,
            local_add_cond_dim=257,
            num_memory_tokens=64,
            diffusion_objective="rf_denoiser",
        )

    @classmethod
    def medium(cls) -> "DiTConfig":
        """Full-size stable-audio-3-medium DiT (differential attention)."""
        return cls(
            io_channels=256,
            embed_dim=1536,
            depth=24,
            num_heads=24,
            cond_token_dim=768,
            global_cond_dim=768,
            local_add_cond_dim=257,
            num_memory_tokens=64,
            differential=True,
            diffusion_objective="rf_denoiser",
        )

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def rope_dims(self) -> int:
        # The official ContinuousTransformer builds RotaryEmbedding(max(dim_heads // 2, 32)).
        return max(self.head_dim // 2, 32)

    @property
    def ff_inner(self) -> int:
        return int(self.embed_dim * self.ff_mult)


# ----------------------------------------------------------------------------------------------------------- helpers


def timestep_features(t: mx.array, dim: int, min_freq: float = 0.5, max_freq: float = 10000.0) -> mx.array:
    """Exponentially spaced Fourier features [cos | sin] of ``t`` (B,), computed in float32."""
    half = dim // 2
    ramp = np.linspace(0.0, 1.0, half, dtype=np.float32)
    log_min, log_max = math.log(min_freq), math.log(max_freq)
    exponent = ramp * np.float32(log_max - log_min) + np.float32(log_min)
    # exp in float64 then rounded: the correctly rounded fp32 frequency, so the highest features (f ~ 1e4, where one
    # ulp of f moves the phase by ~1e-3 rad) agree with any accurate fp32 implementation.
    freqs = mx.array(np.exp(exponent.astype(np.float64)).astype(np.float32))
    args = t.astype(mx.float32)[:, None] * freqs * 2.0 * np.float32(math.pi)
    return mx.concatenate([mx.cos(args), mx.sin(args)], axis=-1)


def _norm_modulate(x: mx.array, weight: mx.array, scale_plus_one: mx.array, shift: mx.array, eps: float) -> mx.array:
    """adaLN input: RMSNorm with float32 statistics and weight (force_fp32), then ``x * (1 + scale) + shift``.

    Not compiled: mx.compile made it slower (measured), the fused rms_norm kernel already does the heavy part."""
    normed = mx.fast.rms_norm(x.astype(mx.float32), weight.astype(mx.float32), eps).astype(x.dtype)
    return normed * scale_plus_one + shift


@mx.compile  # measured ~1.5x faster than the two separate elementwise ops
def _gated_residual(residual: mx.array, branch: mx.array, gate: mx.array) -> mx.array:
    return residual + branch * gate


def _add_per_item(h: mx.array, delta: mx.array) -> mx.array:
    """``h + delta`` where ``delta`` holds one entry per conditioning item and ``h`` may hold the CFG copies of them."""
    if delta.shape[0] in (1, h.shape[0]):
        return h + delta
    copies = h.shape[0] // delta.shape[0]
    return (h.reshape(copies, *delta.shape) + delta).reshape(h.shape)


def _split_heads(x: mx.array, parts: int, heads: int) -> list[mx.array]:
    """(B, T, parts*heads*D) -> ``parts`` arrays (B, T, heads, D), in the fused chunk order of the checkpoint."""
    b, t, width = x.shape
    x = x.reshape(b, t, parts, heads, width // (parts * heads))
    return [x[:, :, i] for i in range(parts)]


def _merge_heads(x: mx.array) -> mx.array:
    b, h, t, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * d)


# ----------------------------------------------------------------------------------------------------------- modules


class MLP(nn.Module):
    """Linear -> SiLU -> Linear (the official ``nn.Sequential`` indices 0 and 2 are ``fc1`` and ``fc2``)."""

    def __init__(self, dims_in: int, dims_hidden: int, dims_out: int, bias: bool):
        super().__init__()
        self.fc1 = nn.Linear(dims_in, dims_hidden, bias=bias)
        self.fc2 = nn.Linear(dims_hidden, dims_out, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.fc2(nn.silu(self.fc1(x)))


class HeadNorm(nn.Module):
    """qk RMSNorm over the head channels, in the activation dtype (statistics accumulate in float32)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight.astype(x.dtype), self.eps)


class SelfAttention(nn.Module):
    """Fused [q|k|v] (or differential [q|k|v|q2|k2]) projection, qk-norm, partial RoPE, full attention."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.embed_dim
        self.heads = config.num_heads
        self.differential = config.differential
        self.rope_dims = config.rope_dims
        self.rope_base = config.rope_base
        self.scale = config.head_dim**-0.5
        self.to_qkv = nn.Linear(dim, dim * (5 if config.differential else 3), bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.q_norm = HeadNorm(config.head_dim, config.qk_norm_eps)
        self.k_norm = HeadNorm(config.head_dim, config.qk_norm_eps)

    def _rope(self, x: mx.array) -> mx.array:
        # Positions 0..N-1 run over memory tokens and latents alike; half-split pairing (rotate_half).
        return mx.fast.rope(
            x.transpose(0, 2, 1, 3), self.rope_dims, traditional=False, base=self.rope_base, scale=1.0, offset=0
        )

    def _projections(self, x: mx.array) -> list[mx.array]:
        """q, k, v (and q2, k2) as (B, T, heads, D) each."""
        parts = 5 if self.differential else 3
        blocks = None if _use_fused_kernels() else row_blocks(self.to_qkv, x.dtype, parts)
        if blocks is None:
            return _split_heads(self.to_qkv(x), parts, self.heads)
        # CPU: one GEMM per part, each output contiguous for its norm and RoPE, and a bfloat16-stored weight
        # widened part by part (the medium DiT's whole 47 MB [q|k|v|q2|k2] missed MLX's buffer cache; measured)
        b, t, _ = x.shape
        return [block(x).reshape(b, t, self.heads, -1) for block in blocks]

    def __call__(self, x: mx.array) -> mx.array:
        chunks = self._projections(x)
        q, k = self._rope(self.q_norm(chunks[0])), self._rope(self.k_norm(chunks[1]))
        v = chunks[2].transpose(0, 2, 1, 3)
        out = _attention(q, k, v, self.scale)
        if self.differential:
            q2, k2 = self._rope(self.q_norm(chunks[3])), self._rope(self.k_norm(chunks[4]))
            # Plain difference of the two softmax attentions: no lambda, no group norm in SA3.
            out = out - _attention(q2, k2, v, self.scale)
        return self.to_out(_merge_heads(out))


class CrossAttention(nn.Module):
    """Attention from the sequence to the context tokens: [q|q2] and [k|k2|v] for differential, no RoPE, no mask."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.embed_dim
        self.heads = config.num_heads
        self.differential = config.differential
        self.scale = config.head_dim**-0.5
        self.to_q = nn.Linear(dim, dim * (2 if config.differential else 1), bias=False)
        self.to_kv = nn.Linear(dim, dim * (3 if config.differential else 2), bias=False)
        self.to_out = nn.Linear(dim, dim, bias=False)
        self.q_norm = HeadNorm(config.head_dim, config.qk_norm_eps)
        self.k_norm = HeadNorm(config.head_dim, config.qk_norm_eps)

    def keys_values(self, context: mx.array) -> tuple[mx.array, ...]:
        """Normalised keys and values of the context, (B, H, Tc, D) each: ``(k, v)`` or ``(k, k2, v)``."""
        chunks = _split_heads(self.to_kv(context), 3 if self.differential else 2, self.heads)
        keys = [self.k_norm(c).transpose(0, 2, 1, 3) for c in chunks[:-1]]
        return (*keys, chunks[-1].transpose(0, 2, 1, 3))

    def __call__(self, x: mx.array, kv: tuple[mx.array, ...]) -> mx.array:
        queries = _split_heads(self.to_q(x), 2 if self.differential else 1, self.heads)
        queries = [self.q_norm(q).transpose(0, 2, 1, 3) for q in queries]
        v = kv[-1]
        out = _attention(queries[0], kv[0], v, self.scale)
        if self.differential:
            out = out - _attention(queries[1], kv[1], v, self.scale)
        return self.to_out(_merge_heads(out))


class FeedForward(nn.Module):
    """SwiGLU; ``proj_in`` rows are [value | gate].

    On the CPU path a long sequence runs in token chunks of at most ``_FF_CHUNK_ELEMENTS`` hidden values (the same
    maths row by row): the (B, T, 2 inner) projection and its SwiGLU temporaries then never exist for all T tokens
    at once (at 120 s, small: 46 + 3 x 23 MB), and value and gate are two GEMMs (:func:`~mlx_sa3.storage.row_blocks`;
    docs/ARCHITECTURE.md, "Weight storage"). GPUs keep one call (one graph for mx.compile).
    """

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * inner)
        self.proj_out = nn.Linear(inner, dim)

    def __call__(self, x: mx.array) -> mx.array:
        if _use_fused_kernels():
            return self.proj_out(_swiglu(self.proj_in(x)))
        batch, tokens, _ = x.shape
        chunks = max(1, math.ceil(batch * tokens * self.proj_in.weight.shape[0] / _FF_CHUNK_ELEMENTS))
        rows = math.ceil(tokens / chunks)
        proj_out = for_calls(self.proj_out, x.dtype)
        halves = row_blocks(self.proj_in, x.dtype, 2)
        if halves is None:  # e.g. a quantized proj_in: one projection, split after
            proj_in = for_calls(self.proj_in, x.dtype)

            def hidden(part):
                return _swiglu(proj_in(part))
        else:
            # value and gate as two GEMMs: both contiguous (no gate copy, no strided product), and a bfloat16-stored
            # weight widens in two halves (the small DiT's whole 32 MB proj_in missed MLX's buffer cache and
            # malloc's heap, costing ~13 ms of page faults per block; measured)
            value, gate = halves

            def hidden(part):
                return _swiglu_parts(value(part), gate(part))

        if chunks == 1:
            return proj_out(hidden(x))
        outs = []
        for start in range(0, tokens, rows):
            outs.append(proj_out(hidden(x[:, start : start + rows])))
            # Evaluated chunk by chunk (as the CPU attention): left lazy, MLX did not free one chunk's temporaries
            # before the next and the step was slower (measured).
            mx.eval(outs[-1])
        return mx.concatenate(outs, axis=1)


class RMSNorm(nn.Module):
    """Block RMSNorm with learnable weight; normalised in float32 (the official ``force_fp32``)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x.astype(mx.float32), self.weight.astype(mx.float32), self.eps).astype(x.dtype)


class TransformerBlock(nn.Module):
    def __init__(self, config: DiTConfig):
        super().__init__()
        dim = config.embed_dim
        self.pre_norm = RMSNorm(dim, config.norm_eps)
        self.self_attn = SelfAttention(config)
        self.cross_attend_norm = RMSNorm(dim, config.norm_eps)
        self.cross_attn = CrossAttention(config)
        self.ff_norm = RMSNorm(dim, config.norm_eps)
        self.ff = FeedForward(dim, config.ff_inner)
        self.to_scale_shift_gate = mx.zeros((6 * dim,))
        self.to_local_embed = MLP(config.local_add_cond_dim, dim, dim, bias=True)

    def modulation(self, global_mod: mx.array) -> list[mx.array]:
        """(1 + scale_sa, shift_sa, sigmoid(1 - gate_sa), 1 + scale_ff, shift_ff, sigmoid(1 - gate_ff)), (B, 1, E)."""
        scale_sa, shift_sa, gate_sa, scale_ff, shift_ff, gate_ff = mx.split(
            (self.to_scale_shift_gate + global_mod)[:, None, :], 6, axis=-1
        )
        # The official gate form is sigmoid(1 - gate), not gate.
        return [1 + scale_sa, shift_sa, mx.sigmoid(1 - gate_sa), 1 + scale_ff, shift_ff, mx.sigmoid(1 - gate_ff)]

    def __call__(self, h: mx.array, mod: list[mx.array], kv, local: mx.array, cross_rows: int) -> mx.array:
        """One block. ``kv`` holds keys/values for the first ``cross_rows`` rows of ``h``; the remaining rows (the
        null-context CFG branch) get an exactly zero cross-attention output, so it is not computed for them."""
        scale_sa, shift_sa, gate_sa, scale_ff, shift_ff, gate_ff = mod
        attn_in = _norm_modulate(h, self.pre_norm.weight, scale_sa, shift_sa, self.pre_norm.eps)
        h = _gated_residual(h, self.self_attn(attn_in), gate_sa)

        rows = h if cross_rows == h.shape[0] else h[:cross_rows]
        cross = self.cross_attn(self.cross_attend_norm(rows), kv)
        if cross_rows != h.shape[0]:
            cross = mx.concatenate([cross, mx.zeros((h.shape[0] - cross_rows, *cross.shape[1:]), cross.dtype)])
        h = _add_per_item(h + cross, local)

        ff_in = _norm_modulate(h, self.ff_norm.weight, scale_ff, shift_ff, self.ff_norm.eps)
        return _gated_residual(h, self.ff(ff_in), gate_ff)


@dataclass
class PreparedConditioning:
    """Step-invariant inputs of one generation, made by :meth:`DiT.prepare`.

    ``kv[i]`` are block i's cross-attention keys/values for the B conditioned items; ``guided_kv[i]`` those for the
    2B rows [cond; uncond] when the unconditional branch has a (negative-prompt) context, or None when it is the
    all-zero context, whose cross-attention output is exactly zero. ``local_seq[i]`` is block i's local embedding
    left-padded with zeros over the memory tokens, (B, M+L, E); when the local conditioning is all zero it is
    replaced by the constant per-block vectors ``local_const`` (depth, E).
    """

    global_embed: mx.array
    kv: list
    guided_kv: list | None
    cfg: bool
    local_seq: list | None
    local_const: mx.array | None
    latent_length: int | None = None  # latents of the inpainting input (None: any length)

    @property
    def batch(self) -> int:
        return self.global_embed.shape[0]

    def arrays(self) -> list:
        return [self.global_embed, self.kv, self.guided_kv, self.local_seq, self.local_const]


class DiT(DiffusionStep, nn.Module):
    """Stable Audio 3 DiT. ``v = dit(x, t, cross_attn_cond=c, global_cond=g, local_add_cond=l, cfg_scale, apg_scale)``
    with channels-first x (B, io, L), t (B,) or scalar, c (B, Tc, cond), g (B, global), l (B, local, L) or None."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.to_timestep_embed = MLP(config.timestep_features_dim, dim, dim, bias=True)
        self.to_cond_embed = MLP(config.cond_token_dim, dim, dim, bias=False)
        self.to_global_embed = MLP(config.global_cond_dim, dim, dim, bias=False)
        # 1x1 convolutions used residually around the transformer, kept as Conv1d for the checkpoint layout.
        self.preprocess_conv = nn.Conv1d(config.io_channels, config.io_channels, 1, bias=False)
        self.postprocess_conv = nn.Conv1d(config.io_channels, config.io_channels, 1, bias=False)
        self.project_in = nn.Linear(config.io_channels, dim, bias=False)
        self.project_out = nn.Linear(dim, config.io_channels, bias=False)
        self.memory_tokens = mx.zeros((config.num_memory_tokens, dim))
        self.global_cond_embedder = MLP(dim, dim, 6 * dim, bias=True)
        self.layers = [TransformerBlock(config) for _ in range(config.depth)]

    @property
    def dtype(self) -> mx.Dtype:
        return self.project_in.weight.dtype

    # ---------------------------------------------------------------------------------------------- conditioning

    def _prepare(self, cross_attn_cond, global_cond, local_add_cond, negative, negative_mask, cfg: bool):
        """:meth:`prepare` on MLX (evaluated before returning); ``negative`` is None unless guided."""
        dtype = self.dtype
        cond = to_mx(cross_attn_cond, dtype)
        global_embed = self.to_global_embed(to_mx(global_cond, dtype))
        kv = self._keys_values(cond)

        guided_kv = None
        if negative is not None:
            negative = to_mx(negative, dtype)
            if negative_mask is not None:
                keep = to_mx(negative_mask, mx.bool_)[..., None]
                negative = mx.where(keep, negative, mx.zeros_like(negative))
            uncond_kv = self._keys_values(negative)
            guided_kv = [tuple(mx.concatenate([a, b]) for a, b in zip(c, u)) for c, u in zip(kv, uncond_kv)]

        local_seq, local_const = self._local_embeddings(local_add_cond, cond.shape[0])
        length = None if local_seq is None else local_seq[0].shape[1] - self.config.num_memory_tokens
        prepared = PreparedConditioning(global_embed, kv, guided_kv, cfg, local_seq, local_const, length)
        mx.eval(prepared.arrays())
        return prepared

    def _keys_values(self, cross_attn_cond: mx.array) -> list:
        context = self.to_cond_embed(cross_attn_cond)
        return [layer.cross_attn.keys_values(context) for layer in self.layers]

    def _local_embeddings(self, local_add_cond, batch: int):
        """Per-block inpainting embeddings; an absent or all-zero input gives the constant W2 silu(b1) + b2."""
        if local_add_cond is not None:
            local = to_mx(local_add_cond, self.dtype).transpose(0, 2, 1)
            if bool(mx.any(local != 0)):
                pad = mx.zeros((batch, self.config.num_memory_tokens, self.config.embed_dim), self.dtype)
                return [mx.concatenate([pad, layer.to_local_embed(local)], axis=1) for layer in self.layers], None
        const = mx.stack([layer.to_local_embed.fc2(nn.silu(layer.to_local_embed.fc1.bias)) for layer in self.layers])
        return None, const

    def _block_locals(self, prepared: PreparedConditioning, tokens: int) -> list[mx.array]:
        """Per-block inpainting terms for ``tokens`` = memory + latent positions (memory tokens get none)."""
        return list(self._iter_block_locals(prepared, tokens))

    def _iter_block_locals(self, prepared: PreparedConditioning, tokens: int) -> Iterator[mx.array]:
        """:meth:`_block_locals` one block at a time: a constant term (B, T, E) is made when its block runs and freed
        after it, instead of all ``depth`` of them staying resident through the step (116 MB at 120 s, small)."""
        if prepared.local_seq is not None:
            yield from prepared.local_seq
            return
        latent_rows = (mx.arange(tokens) >= self.config.num_memory_tokens).astype(self.dtype)[None, :, None]
        for const in prepared.local_const:
            yield latent_rows * const

    def _velocity(self, x: mx.array, t: mx.array, prepared: PreparedConditioning, guided: bool) -> mx.array:
        """The network itself on channels-first x; with ``guided`` the rows are [cond; uncond] (2B)."""
        config, dtype = self.config, self.dtype
        h = x.transpose(0, 2, 1)
        h = h + self.preprocess_conv(h)
        h = self.project_in(h)
        temb = self.to_timestep_embed(timestep_features(t, config.timestep_features_dim).astype(dtype))
        global_mod = self.global_cond_embedder(prepared.global_embed + temb)
        kv, cross_rows = prepared.kv, h.shape[0]
        if guided:
            h = mx.concatenate([h, h])
            global_mod = mx.concatenate([global_mod, global_mod])
            if prepared.guided_kv is not None:
                kv, cross_rows = prepared.guided_kv, h.shape[0]

        batch, _, dim = h.shape
        memory = mx.broadcast_to(self.memory_tokens.astype(dtype), (batch, config.num_memory_tokens, dim))
        h = mx.concatenate([memory, h], axis=1)
        for layer, layer_kv, local in zip(self.layers, kv, self._iter_block_locals(prepared, h.shape[1])):
            h = layer(h, layer.modulation(global_mod), layer_kv, local, cross_rows)

        h = self.project_out(h[:, config.num_memory_tokens :])
        h = h + self.postprocess_conv(h)
        return h.transpose(0, 2, 1)


# ------------------------------------------------------------------------------------------------------ loading

_MLP_NAMES = "to_timestep_embed|to_cond_embed|to_global_embed|global_cond_embedder|to_local_embed"
_ROPE_KEY = "transformer.rotary_pos_emb.inv_freq"
_RENAMES = [
    (re.compile(r"^transformer\."), ""),
    (re.compile(rf"(^|\.)({_MLP_NAMES})\.0\."), r"\1\2.fc1."),
    (re.compile(rf"(^|\.)({_MLP_NAMES})\.2\."), r"\1\2.fc2."),
    (re.compile(r"\.ff\.ff\.0\.proj\."), ".ff.proj_in."),
    (re.compile(r"\.ff\.ff\.2\."), ".ff.proj_out."),
    (re.compile(r"\.gamma$"), ".weight"),
]


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Hub DiT tensors (``model.model.`` prefix removed) -> DiT module names and MLX layouts.

    Fused chunk orders are kept as stored. The RoPE ``inv_freq`` buffer is checked against the frequencies the
    model recomputes (base 10000) and dropped.
    """
    out = {}
    for key, value in weights.items():
        if key == _ROPE_KEY:
            _check_rope_buffer(value)
            continue
        for pattern, repl in _RENAMES:
            key = pattern.sub(repl, key)
        if key in ("preprocess_conv.weight", "postprocess_conv.weight"):
            value = value.transpose(0, 2, 1)  # torch (out, in, k) -> MLX (out, k, in)
        out[key] = value
    return out


def _check_rope_buffer(inv_freq: mx.array) -> None:
    dims = 2 * inv_freq.shape[0]
    expected = 1.0 / 10000.0 ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    if not np.allclose(np.asarray(inv_freq.astype(mx.float32)), expected, rtol=1e-6, atol=0):
        raise CheckpointError(f"{_ROPE_KEY} does not hold base-10000 RoPE frequencies for {dims} dims")
