"""PyTorch CPU fallback: the three networks of SA3 (SAME autoencoder, DiT, T5Gemma encoder) computed by torch in
float32, behind exactly the interface of their MLX counterparts.

Only the networks change backend. Conditioning glue, samplers and guidance stay the shared MLX code of
:mod:`mlx_sa3.model`, :mod:`mlx_sa3.sampling` and :mod:`mlx_sa3.pipeline`: every component here accepts numpy, MLX or
torch inputs and returns MLX arrays.

Weights come through the MLX loaders' own path (``Source.component``, the MLX ``sanitize`` for Hub layouts,
``check_strict`` against the MLX module), so every layout that loads into MLX loads here too; one function per
component then renames mlx_sa3 parameters to the torch modules'.

Reused well-kept modules, and what differs from the official code (``stable_audio_3/models/...``), fixed here:

* T5Gemma: transformers' ``T5GemmaEncoderModel`` with eager attention, encoder-only as the official conditioner
  builds it (conditioners.py:199-201).
* DiT: diffusers' ``StableAudio3DiTModel`` (0.42) holds the weights and its blocks run as they are; the model-level
  forward is written here because diffusers differs from the official DiT: block RMSNorm eps 1e-6 (official 1e-5,
  transformer.py:392), RoPE over ``head_dim // 2`` channels (official ``max(head_dim // 2, 32)``,
  transformer.py:1109), no local conditioning when there is none (official: always added, zeros for text-to-audio,
  transformer.py:978-982), vanilla CFG (official APG, dit.py:311-343). Its fused ``to_qkv`` rows are
  ``[q1|q2|k1|k2|v]`` where the checkpoint has ``[q|k|v|q2|k2]`` (transformer.py:738): reordered at load time.
* SAME: diffusers' ``TransformerBlock`` (DyT norms, attention projections, SwiGLU / sin(pi x) feed-forward). diffusers
  has neither SAME-S's chunked attention with the midpoint shift (autoencoders.py:156-199) nor its kernel-3 mapping
  (autoencoders.py:50), and its band attention builds a T x T mask with positions from 0, so the resampling layout,
  RoPE positions and band attention are written here after the MLX module, whose stream-window arithmetic is reused.
"""

from __future__ import annotations

import importlib
import math
import platform
from dataclasses import dataclass
from typing import Iterator

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from . import dit as mlx_dit
from . import same as mlx_same
from . import t5gemma as mlx_t5
from .loading import Source, check_strict, open_source, parse_dtype, to_mx

INSTALL_HINT = 'pip install "mlx_sa3[torch]"'
_LINUX_HINT = " (on Linux, install a CPU-only build of torch first, or pip pulls a CUDA build of several GB)"
_SAME_BLOCKS = "diffusers.models.autoencoders.autoencoder_same"
_SA3_DIT = "diffusers.models.transformers.transformer_stable_audio3"
_T5GEMMA = "transformers.models.t5gemma"


def require_torch(*modules: str):
    """Import torch (and ``modules``, e.g. a diffusers submodule) or raise an ImportError saying how to install them.

    Returns torch, or ``(torch, *modules)`` when modules are named. Every torch import of mlx_sa3 goes through here,
    so ``import mlx_sa3`` never imports torch.
    """
    names = ("torch", *modules)
    try:
        loaded = tuple(importlib.import_module(name) for name in names)
    except ImportError as err:
        hint = INSTALL_HINT + (_LINUX_HINT if platform.system() == "Linux" else "")
        raise ImportError(f"the torch backend needs torch, diffusers and transformers ({err}); install them with "
                          f"{hint}") from err
    _share_cores_with_openblas(loaded[0])
    return loaded[0] if not modules else loaded


def _share_cores_with_openblas(torch) -> None:
    """Run torch's own ops on one thread when mlx_sa3 preloaded OpenBLAS.

    The globally loaded OpenBLAS also serves torch's GEMMs, with its own thread pool; torch's intra-op threads spin
    between ops and fight those threads for the cores, which made a DiT step about 7x slower on two cores. With
    torch single-threaded the GEMMs still use every core through OpenBLAS.
    """
    from . import _blas

    if _blas.loaded_blas is not None and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------- conversions

def _to_torch(x, dtype=None):
    """numpy / MLX / torch -> torch tensor (float32 unless ``dtype`` says otherwise)."""
    torch = require_torch()
    dtype = dtype or torch.float32
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    if isinstance(x, mx.array) and x.dtype == mx.bfloat16:
        x = x.astype(mx.float32)  # numpy has no bfloat16
    return torch.from_numpy(np.array(x)).to(dtype)


def _to_mx(t) -> mx.array:
    return mx.array(t.detach().numpy())


def _state_dict(weights: dict) -> dict:
    return {k: _to_torch(v) for k, v in weights.items()}


def _load_state(module, state: dict, computed: tuple = ()) -> None:
    """Make ``state``'s tensors the parameters of ``module`` (built on the meta device: no init, no copy).

    Every tensor must land, and only the ``computed`` ones (set up by the caller) may be absent from ``state``.
    """
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    stray = sorted(set(missing) - set(computed))
    unset = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if stray or unexpected or unset:
        raise RuntimeError(f"torch parameter mapping is incomplete: missing {stray}, unexpected {sorted(unexpected)}, "
                           f"uninitialised {unset}")


def _mlx_shapes(module) -> dict:
    return {k: v.shape for k, v in tree_flatten(module.parameters())}


def _checked_weights(source: Source, component: str, sanitize, mlx_module, what: str) -> dict:
    """A component's tensors in mlx_sa3 naming, strictly checked against the MLX module (whose init is lazy)."""
    weights = source.component(component)
    if not source.converted:
        weights = sanitize(weights)
    check_strict(_mlx_shapes(mlx_module), weights, what)
    return weights


def _official_to_diffusers_qkv(weight):
    """Fused self-attention rows: checkpoint ``[q|k|v|q2|k2]`` -> diffusers ``[q1|q2|k1|k2|v]`` (MHA: unchanged)."""
    torch = require_torch()
    if weight.shape[0] != 5 * weight.shape[1]:
        return weight
    q, k, v, q2, k2 = weight.chunk(5)
    return torch.cat([q, q2, k, k2, v])


# ------------------------------------------------------------------------------------------------------------ SAME

def _band_attention(q, k, v, left: int, right: int, block: int = 256):
    """Attention of query i to keys i - left .. i + right (truncated at the ends), q/k/v (B, H, T, d).

    Queries go in blocks against their own neighbourhood only, so memory grows linearly with T.
    """
    torch = require_torch()
    F = torch.nn.functional
    T = q.shape[2]
    outs = []
    for start in range(0, T, block):
        stop = min(start + block, T)
        lo, hi = max(0, start - left), min(T, stop + right)
        offset = torch.arange(lo, hi)[None, :] - torch.arange(start, stop)[:, None]
        allowed = (offset >= -left) & (offset <= right)
        outs.append(F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi],
                                                   attn_mask=allowed))
    return torch.cat(outs, dim=2)


def _same_attention(attn, x, positions, band):
    """diffusers ``SAMEAttention`` weights with RoPE at absolute ``positions`` and optional band attention."""
    torch, blocks = require_torch(_SAME_BLOCKS)
    F = torch.nn.functional
    parts = attn.to_qkv(x).unflatten(-1, (-1, attn.heads, attn.dim_heads))  # (B, T, parts, H, d)
    pairs = parts.shape[2] // 2  # diffusers rows [q1|q2|k1|k2|v] or [q|k|v]
    angles = torch.outer(positions.to(torch.float32), attn.rope.inv_freq)
    freqs = torch.cat([angles, angles], dim=-1)

    def heads(i, norm):
        return blocks._apply_rotary_partial(norm(parts[:, :, i]), freqs).transpose(1, 2)

    v = parts[:, :, -1].transpose(1, 2)
    out = 0
    for i, sign in zip(range(pairs), (1, -1)):
        q, k = heads(i, attn.q_norm), heads(pairs + i, attn.k_norm)
        a = F.scaled_dot_product_attention(q, k, v) if band is None else _band_attention(q, k, v, *band)
        out = out + sign * a
    return attn.to_out(out.transpose(1, 2).flatten(2))


def _same_block(block, x, positions, band):
    x = x + _same_attention(block.attn, block.norm_attn(x), positions, band)
    return x + block.ff(block.norm_ff(x))


def _same_net(config: mlx_same.SAMEConfig):
    """Torch modules named as the MLX ``SAMEAutoencoder`` parameters, except inside diffusers' blocks."""
    torch, blocks = require_torch(_SAME_BLOCKS)
    nn = torch.nn

    def container(**children):
        module = nn.Module()
        for name, child in children.items():
            setattr(module, name, child)
        return module

    def resampler(cfg: mlx_same.ResamplerConfig, decoder: bool):
        dims = (cfg.width, config.frame_dim) if decoder else (config.frame_dim, cfg.width)
        per_group = 1 if cfg.shared_new_token or not decoder else cfg.stride
        return container(
            mapping=nn.Conv1d(*dims, cfg.mapping_kernel, padding=cfg.mapping_kernel // 2),
            new_tokens=nn.Parameter(torch.zeros(1, per_group, cfg.width)),
            blocks=nn.ModuleList([
                blocks.TransformerBlock(cfg.width, cfg.head_dim, cfg.differential, cfg.ff_mult,
                                        sinusoidal=cfg.depth - i < cfg.sinusoidal_blocks)
                for i in range(cfg.depth)
            ]),
        )

    with torch.device("meta"):  # the weights are assigned at load time
        bottleneck = container(scale=nn.Parameter(torch.ones(config.latent_dim)),
                               bias=nn.Parameter(torch.zeros(config.latent_dim)))
        if config.auto_scale:
            bottleneck.running_std = nn.Parameter(torch.ones(1))
        net = container(
            encoder=resampler(config.encoder, decoder=False),
            to_latent=nn.Linear(config.encoder.width, config.latent_dim),
            bottleneck=bottleneck,
            from_latent=nn.Linear(config.latent_dim, config.decoder.width),
            decoder=resampler(config.decoder, decoder=True),
        )
    for block in (*net.encoder.blocks, *net.decoder.blocks):  # RoPE frequencies are computed, not stored
        block.attn.rope = blocks.RotaryEmbedding(block.attn.dim_heads // 2)
    return net


_SAME_RENAMES = ((".attn_norm.", ".norm_attn."), (".ff_norm.", ".norm_ff."), (".attn.qkv.", ".attn.to_qkv."),
                 (".attn.out.", ".attn.to_out."))


def _same_state(weights: dict) -> dict:
    """mlx_sa3 SAME parameters -> torch state: block renames, qkv row order, conv (out, k, in) -> (out, in, k)."""
    state = {}
    for key, value in _state_dict(weights).items():
        for old, new in _SAME_RENAMES:
            key = key.replace(old, new)
        if key.endswith(".attn.to_qkv.weight"):
            value = _official_to_diffusers_qkv(value)
        if key.endswith(".mapping.weight"):
            value = value.transpose(1, 2)
        state[key] = value.contiguous()
    return state


class TorchAutoencoder:
    """torch counterpart of :class:`mlx_sa3.same.SAMEAutoencoder`: same methods, arguments and MLX outputs.

    The stream-window arithmetic is the MLX class's own, so streaming cuts the sequence exactly as it does there.
    """

    sample_rate = mlx_same.SAMEAutoencoder.sample_rate
    latent_dim = mlx_same.SAMEAutoencoder.latent_dim
    downsampling_ratio = mlx_same.SAMEAutoencoder.downsampling_ratio
    default_chunk_latents = mlx_same.SAMEAutoencoder.default_chunk_latents
    stream_windows = mlx_same.SAMEAutoencoder.stream_windows
    _padded_length = mlx_same.SAMEAutoencoder._padded_length

    def __init__(self, config: mlx_same.SAMEConfig, weights: dict):
        self.config = config
        self.net = _same_net(config)
        _load_state(self.net, _same_state(weights))
        self.net.eval().requires_grad_(False)

    def encode(self, audio) -> mx.array:
        """(B, io_channels, T) audio -> (B, latent_dim, ceil(T / downsampling_ratio)) latents."""
        torch = require_torch()
        cfg = self.config
        audio = _to_torch(audio)
        if audio.ndim != 3 or audio.shape[1] != cfg.io_channels or audio.shape[2] == 0:
            raise ValueError(f"audio must be (batch, {cfg.io_channels}, samples) with samples > 0, got "
                             f"{tuple(audio.shape)}")
        with torch.inference_mode():
            frames = self._patch(audio)
            unit = cfg.encoder.latent_multiple * cfg.encoder.stride
            frames = torch.nn.functional.pad(frames, (0, 0, 0, -frames.shape[1] % unit))
            tokens = self._resample_encode(frames)
            bottleneck = self.net.bottleneck
            latents = self.net.to_latent(tokens) * bottleneck.scale + bottleneck.bias
            if cfg.auto_scale:
                latents = latents / bottleneck.running_std
            n_latents = -(-audio.shape[2] // cfg.downsampling_ratio)
            return _to_mx(latents[:, :n_latents].transpose(1, 2))

    def decode(self, latents, *, noise_regularize: bool | None = None, seed: int | None = None) -> mx.array:
        """(B, latent_dim, L) latents -> (B, io_channels, L * downsampling_ratio) audio (see the MLX ``decode``)."""
        z = self._prepare_latents(latents, noise_regularize, seed)
        length = z.shape[1]
        return self._decode_window(z, 0, self._padded_length(length), 0, length)

    def decode_stream(self, latents, chunk_latents: int | None = None, *, noise_regularize: bool | None = None,
                      seed: int | None = None) -> Iterator[mx.array]:
        """Yield audio pieces of ``chunk_latents`` latents each that concatenate to ``decode``."""
        z = self._prepare_latents(latents, noise_regularize, seed)
        for window in self.stream_windows(z.shape[1], chunk_latents):
            yield self._decode_window(z, *window)

    def _prepare_latents(self, latents, noise_regularize: bool | None, seed: int | None):
        """(B, C, L) latents -> bottleneck-decoded (B, L, C) torch; the optional noise is drawn by MLX as the MLX
        backend draws it, so a seed gives the same noise on both backends."""
        torch = require_torch()
        cfg = self.config
        z = _to_torch(latents)
        if z.ndim != 3 or z.shape[1] != cfg.latent_dim or z.shape[2] == 0:
            raise ValueError(f"latents must be (batch, {cfg.latent_dim}, length) with length > 0, got "
                             f"{tuple(z.shape)}")
        z = z.transpose(1, 2)
        with torch.inference_mode():
            if cfg.auto_scale:
                z = z * self.net.bottleneck.running_std
            if cfg.noise_regularize if noise_regularize is None else noise_regularize:
                key = None if seed is None else mx.random.key(seed)
                noise = _to_torch(mx.random.normal(tuple(z.shape), key=key))
                scaling = self.net.bottleneck.running_std if cfg.auto_scale else z.std(dim=1, keepdim=True)
                z = z + noise * scaling * mlx_same.NOISE_REGULARIZE_SCALE
        return z

    def _decode_window(self, z, window_start: int, window_stop: int, start: int, stop: int) -> mx.array:
        """Audio of latents [start, stop) decoded from the latent window [window_start, window_stop) (see MLX)."""
        torch = require_torch()
        cfg = self.config
        with torch.inference_mode():
            tokens = self.net.from_latent(z[:, window_start:min(window_stop, z.shape[1])])
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, window_stop - window_start - tokens.shape[1]))
            cuts = (window_start > 0, window_stop < self._padded_length(z.shape[1]))
            frames = self._resample_decode(tokens, window_start, cuts)
            first = window_start + (cfg.decoder.cut_trim[0] if cuts[0] else 0)
            S = cfg.decoder.stride
            audio = self._unpatch(frames[:, (start - first) * S:(stop - first) * S])
            return _to_mx(torch.tanh(audio) if cfg.soft_clip else audio)

    def _patch(self, audio):
        B, C, T = audio.shape
        P = self.config.patch_size
        audio = require_torch().nn.functional.pad(audio, (0, -T % P))
        return audio.reshape(B, C, -1, P).transpose(1, 2).reshape(B, -1, C * P)

    def _unpatch(self, frames):
        B, F, _ = frames.shape
        P = self.config.patch_size
        return frames.reshape(B, F, -1, P).transpose(1, 2).reshape(B, -1, F * P)

    @staticmethod
    def _map(resampler, x):
        """The mapping conv on channels-last x."""
        return resampler.mapping(x.transpose(1, 2)).transpose(1, 2)

    def _resample_encode(self, frames):
        """(B, n * stride, frame_dim) -> (B, n, width): each group's learned token after the blocks."""
        torch = require_torch()
        enc, S = self.net.encoder, self.config.encoder.stride
        x = self._map(enc, frames)
        B, F, D = x.shape
        n = F // S
        learned = enc.new_tokens.reshape(1, 1, 1, D).expand(B, n, 1, D)
        x = torch.cat([x.reshape(B, n, S, D), learned], dim=2).reshape(B, n * (S + 1), D)
        x = self._transform(enc.blocks, self.config.encoder, x, first_group=0)
        return x.reshape(B, n, S + 1, D)[:, :, -1]

    def _resample_decode(self, tokens, first_group: int, cuts):
        """(B, n, width) latent tokens -> (B, m * stride, frame_dim) frames (cut-side groups dropped)."""
        torch = require_torch()
        dec, S = self.net.decoder, self.config.decoder.stride
        B, n, D = tokens.shape
        learned = dec.new_tokens.reshape(1, 1, -1, D).expand(B, n, S, D)
        x = torch.cat([tokens[:, :, None], learned], dim=2).reshape(B, n * (S + 1), D)
        x = self._transform(dec.blocks, self.config.decoder, x, first_group, cuts)
        return self._map(dec, x.reshape(B, -1, S + 1, D)[:, :, 1:].reshape(B, -1, D))

    @staticmethod
    def _transform(blocks, cfg: mlx_same.ResamplerConfig, x, first_group: int, cuts=(False, False)):
        """The attention layout of the official TransformerResamplingBlock, as in the MLX ``Resampler.transform``."""
        torch = require_torch()
        if cfg.sliding_window is not None:
            start = first_group * cfg.group  # RoPE counts positions over the whole sequence
            positions = torch.arange(start, start + x.shape[1])
            band = tuple(w * cfg.group for w in cfg.sliding_window)
            drop_left, drop_right = (w if cut else 0 for w, cut in zip(band, cuts))
            for block in blocks:
                x = _same_block(block, x, positions, band)
                stop = x.shape[1] - drop_right
                x, positions = x[:, drop_left:stop], positions[drop_left:stop]
            return x
        if first_group % cfg.latent_multiple:
            raise ValueError(f"chunked attention needs chunk-aligned input, got first latent {first_group}")
        split = cfg.depth // 2 if cfg.chunk_midpoint_shift else cfg.depth
        x = TorchAutoencoder._run_chunked(blocks[:split], cfg, x)
        if split < cfg.depth:
            # Shifted layout: half a chunk of repeat padding on both ends, so chunks straddle the old borders.
            half = cfg.chunk_tokens // 2
            x = torch.cat([x[:, :half], x, x[:, -half:]], dim=1)
            x = TorchAutoencoder._run_chunked(blocks[split:], cfg, x)[:, half:-half]
        return x

    @staticmethod
    def _run_chunked(blocks, cfg: mlx_same.ResamplerConfig, x):
        B, T, D = x.shape
        c = cfg.chunk_tokens
        positions = require_torch().arange(c)  # RoPE restarts in every chunk
        x = x.reshape(B * T // c, c, D)
        for block in blocks:
            x = _same_block(block, x, positions, None)
        return x.reshape(B, T, D)


def load_torch_autoencoder(src) -> TorchAutoencoder:
    """SAME autoencoder on torch from a SAME repo, a full SA3 repo or a converted directory (or an opened Source)."""
    source = src if isinstance(src, Source) else open_source(src)
    model_config = source.model_config
    config = mlx_same.SAMEConfig.from_dict(model_config["model"], sample_rate=model_config.get("sample_rate"))
    weights = _checked_weights(source, "autoencoder", mlx_same.sanitize, mlx_same.SAMEAutoencoder(config),
                               f"{source.root} autoencoder")
    return TorchAutoencoder(config, weights)


def torch_autoencoder_from_mlx(module: mlx_same.SAMEAutoencoder) -> TorchAutoencoder:
    return TorchAutoencoder(module.config, dict(tree_flatten(module.parameters())))


# ------------------------------------------------------------------------------------------------------------- DiT

@dataclass
class TorchPrepared:
    """Step-invariant DiT inputs (torch): projected context(s), global embedding, local conditioning."""

    global_embed: object  # (B, E)
    context: object  # (B, Tc, E)
    uncond_context: object | None  # (B, Tc, E) when prepared for guidance
    local: object | None  # (B, L, local) channels-last, None: all zero
    cfg: bool

    @property
    def batch(self) -> int:
        return self.global_embed.shape[0]


_DIT_MLP_NAMES = ("to_timestep_embed", "to_cond_embed", "to_global_embed", "global_cond_embedder", "to_local_embed")


def _dit_state(weights: dict) -> dict:
    """mlx_sa3 DiT parameters -> ``StableAudio3DiTModel`` state."""
    state = {}
    for key, value in _state_dict(weights).items():
        if key == "memory_tokens" and value.numel() == 0:
            continue  # diffusers has no memory-token parameter without memory tokens
        key = key.replace("layers.", "transformer_blocks.", 1) if key.startswith("layers.") else key
        key = {"project_in.weight": "proj_in.weight", "project_out.weight": "proj_out.weight"}.get(key, key)
        for name in _DIT_MLP_NAMES:
            key = key.replace(f"{name}.fc1.", f"{name}.0.").replace(f"{name}.fc2.", f"{name}.2.")
        if key.endswith("norm.weight"):
            key = key[: -len("weight")] + "gamma"
        if key.endswith("self_attn.to_qkv.weight"):
            value = _official_to_diffusers_qkv(value)
        if key in ("preprocess_conv.weight", "postprocess_conv.weight"):
            value = value.transpose(1, 2)  # MLX (out, k, in) -> torch (out, in, k)
        state[key] = value.contiguous()
    return state


class TorchDiT(mlx_dit.PrepareAndStep):
    """torch counterpart of :class:`mlx_sa3.dit.DiT`: ``__call__``, ``prepare``, ``step``, ``dtype``, ``config``.

    Guidance is the MLX :func:`mlx_sa3.dit.guide` (CFG with APG in float32) on the velocities torch computes.
    """

    def __init__(self, config: mlx_dit.DiTConfig, weights: dict):
        torch, sa3 = require_torch(_SA3_DIT)
        self.config = config
        with torch.device("meta"):  # the weights are assigned at load time
            net = sa3.StableAudio3DiTModel(
                io_channels=config.io_channels, embed_dim=config.embed_dim, depth=config.depth,
                num_heads=config.num_heads, cond_token_dim=config.cond_token_dim,
                global_cond_dim=config.global_cond_dim, local_add_cond_dim=config.local_add_cond_dim,
                timestep_features_dim=config.timestep_features_dim, ff_mult=config.ff_mult,
                num_memory_tokens=config.num_memory_tokens, use_differential_attention=config.differential,
            )
        # prompt_padding_embedding only acts with a context mask, which the official DiT never applies: inert zeros.
        net.prompt_padding_embedding = torch.nn.Parameter(torch.zeros(config.cond_token_dim))
        # Official values where diffusers differs: RoPE width max(head_dim // 2, 32), block norm eps 1e-5.
        net.rotary_pos_emb = sa3.StableAudio3RotaryEmbedding(config.rope_dims, base=config.rope_base)
        for block in net.transformer_blocks:
            for norm in (block.pre_norm, block.cross_attend_norm, block.ff_norm):
                norm.eps = config.norm_eps
            for attn in (block.self_attn, block.cross_attn):
                attn.q_norm.eps = attn.k_norm.eps = config.qk_norm_eps
        _load_state(net, _dit_state(weights), computed=("rotary_pos_emb.inv_freq", "prompt_padding_embedding"))
        self.net = net.eval().requires_grad_(False)

    @property
    def dtype(self) -> mx.Dtype:
        return mx.float32

    def prepare(self, cross_attn_cond, global_cond, local_add_cond=None, negative_cross_attn_cond=None,
                negative_cross_attn_mask=None, cfg: bool = False) -> TorchPrepared:
        """Step-invariant conditioning (see :meth:`mlx_sa3.dit.DiT.prepare` for the semantics)."""
        torch = require_torch()
        with torch.inference_mode():
            context = self.net.to_cond_embed(_to_torch(cross_attn_cond))
            global_embed = self.net.to_global_embed(_to_torch(global_cond))
            uncond = None
            if negative_cross_attn_cond is not None:
                if not cfg:
                    raise ValueError("a negative prompt only acts with guidance: pass cfg=True")
                negative = _to_torch(negative_cross_attn_cond)
                if negative_cross_attn_mask is not None:
                    # The official code zeroes masked-out negative tokens (not the learned padding embedding).
                    negative = negative * _to_torch(negative_cross_attn_mask, torch.bool)[..., None]
                uncond = self.net.to_cond_embed(negative)
            elif cfg:
                uncond = torch.zeros_like(context)  # to_cond_embed has no biases: the null context embeds to zero
            local = None if local_add_cond is None else _to_torch(local_add_cond).transpose(1, 2)
        return TorchPrepared(global_embed, context, uncond, local, cfg)

    def step(self, x, t, prepared: TorchPrepared, cfg_scale: float = 1.0, apg_scale: float = 1.0,
             cfg_interval=(0.0, 1.0), scale_phi: float = 0.0, cfg_norm_threshold: float = 0.0) -> mx.array:
        """Velocity (B, io, L) float32; guidance iff ``cfg_scale != 1`` and sigma of the first item lies in
        ``cfg_interval`` (the official rule, as :meth:`mlx_sa3.dit.DiT.step`)."""
        x = to_mx(x, mx.float32)
        batch = x.shape[0]
        if batch != prepared.batch:
            raise ValueError(f"x has batch {batch}, the prepared conditioning {prepared.batch}")
        t = mx.broadcast_to(to_mx(t, mx.float32).reshape(-1), (batch,))
        if self.config.diffusion_objective == "v":
            sigma, alpha = mx.sin(t * math.pi / 2), mx.cos(t * math.pi / 2)
        else:
            sigma, alpha = t, None
        if cfg_scale == 1.0 or not cfg_interval[0] <= sigma[0].item() <= cfg_interval[1]:
            return self._velocity(x, t, prepared, guided=False)
        if not prepared.cfg:
            raise ValueError("cfg_scale != 1 needs conditioning prepared with cfg=True")
        v_cond, v_uncond = mx.split(self._velocity(x, t, prepared, guided=True), 2)
        return mlx_dit.guide(x, v_cond, v_uncond, sigma, alpha, cfg_scale, apg_scale, scale_phi, cfg_norm_threshold)

    def _velocity(self, x: mx.array, t: mx.array, prepared: TorchPrepared, guided: bool) -> mx.array:
        """The network on channels-first x; with ``guided`` the rows are [cond; uncond] (2B)."""
        torch = require_torch()
        net, memory_count = self.net, self.config.num_memory_tokens
        with torch.inference_mode():
            h = _to_torch(x)
            h = net.proj_in((net.preprocess_conv(h) + h).transpose(1, 2))
            temb = net.to_timestep_embed(net.timestep_features(_to_torch(t)))
            global_mod = net.global_cond_embedder(prepared.global_embed + temb)
            context = prepared.context
            # The official DiT always adds to_local_embed(local): with no inpainting, that of zeros.
            local = prepared.local
            if local is None:
                local = torch.zeros(h.shape[0], h.shape[1], self.config.local_add_cond_dim)
            elif local.shape[1] != h.shape[1]:
                raise ValueError(f"local_add_cond was prepared for {local.shape[1]} latents, x has {h.shape[1]}")
            if guided:
                h, global_mod, local = (torch.cat([a, a]) for a in (h, global_mod, local))
                context = torch.cat([context, prepared.uncond_context])
            if memory_count:
                h = torch.cat([net.memory_tokens.expand(h.shape[0], -1, -1), h], dim=1)
            rope = net.rotary_pos_emb(h.shape[1], h.device)
            for block in net.transformer_blocks:
                h = block(h, context=context, global_modulation=global_mod, rope=rope, local_seq=local,
                          num_memory_tokens=memory_count)
            out = net.proj_out(h[:, memory_count:]).transpose(1, 2)
            return _to_mx(net.postprocess_conv(out) + out)

    def update_weights(self, weights: dict) -> None:
        """Replace some parameters, given in mlx_sa3 names and MLX layouts (e.g. LoRA-merged weights)."""
        torch = require_torch()
        params = dict(self.net.named_parameters())
        state = _dit_state(weights)
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"no such torch DiT parameters: {', '.join(unknown)}")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)


def _check_float32(dtype) -> None:
    dtype = parse_dtype(dtype)
    if dtype is not None and dtype != mx.float32:
        raise ValueError(f"the torch backend computes in float32, got dtype {dtype}")


def load_torch_dit(source, dtype=None) -> TorchDiT:
    """DiT on torch from a full SA3 checkpoint (directory, repo id or Source); float32 only."""
    _check_float32(dtype)
    source = source if isinstance(source, Source) else open_source(source)
    config = mlx_dit.DiTConfig.from_model_config(source.model_config)
    weights = _checked_weights(source, "dit", mlx_dit.sanitize, mlx_dit.DiT(config), "DiT checkpoint")
    return TorchDiT(config, weights)


def torch_dit_from_mlx(module: mlx_dit.DiT) -> TorchDiT:
    return TorchDiT(module.config, dict(tree_flatten(module.parameters())))


# -------------------------------------------------------------------------------------------------------- T5Gemma

def _hf_t5gemma(config: mlx_t5.T5GemmaConfig, weights: dict):
    """transformers' T5GemmaEncoderModel (eager attention, encoder-only as the official conditioner builds it)."""
    torch, t5 = require_torch(_T5GEMMA)
    section = {
        "hidden_size": config.hidden_size, "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads, "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim, "intermediate_size": config.intermediate_size, "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps, "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping, "hidden_activation": config.hidden_activation,
        "attention_bias": config.attention_bias, "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    hf_config = t5.T5GemmaConfig(encoder=section, decoder=dict(section), vocab_size=config.vocab_size,
                                 is_encoder_decoder=False)
    hf_config._attn_implementation = "eager"
    model = t5.T5GemmaEncoderModel(hf_config)
    _load_state(model, {mlx_t5.ENCODER_PREFIX + k: v for k, v in _state_dict(weights).items()})
    return model.eval().requires_grad_(False)


class TorchTextEncoder:
    """torch counterpart of :class:`mlx_sa3.t5gemma.TextEncoder`, sharing its tokenizer."""

    def __init__(self, config: mlx_t5.T5GemmaConfig, weights: dict, tokenizer: mlx_t5.T5GemmaTokenizer):
        self.model = _hf_t5gemma(config, weights)
        self.tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def encode(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """-> (hidden float32 (B, max_length, hidden), mask bool (B, max_length)); padded rows are not replaced."""
        torch = require_torch()
        ids, mask = self.tokenizer(prompts)
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
            hidden = out.last_hidden_state.float()
        return _to_mx(hidden), mx.array(mask)


def load_torch_text_encoder(source, max_length: int) -> TorchTextEncoder:
    """T5Gemma encoder on torch from a full SA3 checkpoint (Hub layout or converted; directory, repo id or Source)."""
    source = source if isinstance(source, Source) else open_source(source)
    directory = source.text_encoder_dir()
    config = mlx_t5.T5GemmaConfig.from_dir(directory)
    weights = _checked_weights(source, "text_encoder", lambda w: mlx_t5.sanitize(w)[0],
                               mlx_t5.T5GemmaEncoder(config), "T5Gemma encoder checkpoint")
    return TorchTextEncoder(config, weights, mlx_t5.T5GemmaTokenizer.from_dir(directory, max_length))


def torch_text_encoder_from_mlx(text_encoder: mlx_t5.TextEncoder) -> TorchTextEncoder:
    model = text_encoder.model
    return TorchTextEncoder(model.config, dict(tree_flatten(model.parameters())), text_encoder.tokenizer)
