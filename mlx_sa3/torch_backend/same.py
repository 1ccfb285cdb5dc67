"""SAME on torch: diffusers' ``TransformerBlock`` with the official resampling layout (docs/ARCHITECTURE.md)."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint import ENCODER_HALF, checkpoint_config
from ..loading import Source, check_float_audio, component_weights, open_source
from ..models import keymaps
from ..models import same as mlx_same
from .common import (
    _load_state,
    _state_dict,
    _to_mx,
    _to_torch,
    glu_feed_forward,
    linear,
    linear_threads,
    reorder_rows,
    require_torch,
)

_SAME_BLOCKS = "diffusers.models.autoencoders.autoencoder_same"


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
        outs.append(
            F.scaled_dot_product_attention(q[:, :, start:stop], k[:, :, lo:hi], v[:, :, lo:hi], attn_mask=allowed)
        )
    return torch.cat(outs, dim=2)


def _same_attention(attn, x, positions, band):
    """diffusers ``SAMEAttention`` weights with RoPE at absolute ``positions`` and optional band attention."""
    torch, blocks = require_torch(_SAME_BLOCKS)
    F = torch.nn.functional
    parts = linear(x, attn.to_qkv).unflatten(-1, (-1, attn.heads, attn.dim_heads))  # (B, T, parts, H, d)
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
    return linear(out.transpose(1, 2).flatten(2), attn.to_out)


def _same_block(block, x, positions, band):
    x = x + _same_attention(block.attn, block.norm_attn(x), positions, band)
    return x + glu_feed_forward(block.ff, block.norm_ff(x), block.ff.sinusoidal)


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
            blocks=nn.ModuleList(
                [
                    blocks.TransformerBlock(
                        cfg.width,
                        cfg.head_dim,
                        cfg.differential,
                        cfg.ff_mult,
                        sinusoidal=cfg.depth - i < cfg.sinusoidal_blocks,
                    )
                    for i in range(cfg.depth)
                ]
            ),
        )

    with torch.device("meta"):  # the weights are assigned at load time
        bottleneck = container(
            scale=nn.Parameter(torch.ones(config.latent_dim)), bias=nn.Parameter(torch.zeros(config.latent_dim))
        )
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


def _same_state(weights: dict) -> dict:
    """mlx_sa3 SAME parameters -> torch state: block renames, qkv row order, conv (out, k, in) -> (out, in, k)."""
    return _state_dict(weights, _same_tensor)


def _same_tensor(key: str, value):
    key = keymaps.same_key_to_diffusers(key)
    if key.endswith(".attn.to_qkv.weight") and value.shape[0] == 5 * value.shape[1]:  # differential only
        value = reorder_rows(value, keymaps.official_to_diffusers_qkv(value.shape[0]))
    if key.endswith(".mapping.weight"):
        value = value.transpose(1, 2)
    return key, value.contiguous()


class TorchAutoencoder(mlx_same.AutoencoderInterface):
    """torch counterpart of :class:`mlx_sa3.same.SAMEAutoencoder`: same methods, arguments and MLX outputs.

    Lengths, stream windows and the attention layout are the shared functions of :mod:`mlx_sa3.models.same`, so
    streaming cuts the sequence exactly as it does there.
    """

    def __init__(self, config: mlx_same.SAMEConfig, weights: dict, encoder_loader=None):
        """``weights``: every parameter; with ``encoder_loader`` (returns them all again, strictly checked) only the
        decoder half is taken now and the encoder half is read on the first :meth:`encode` (as the MLX
        ``DecoderFirstSAME``: plain text-to-audio never holds it)."""
        self.config = config
        self.net = _same_net(config)
        self._encoder_loader = encoder_loader
        if encoder_loader is None:
            _load_state(self.net, _same_state(weights))
        else:
            _load_state(self.net, _same_state(_half(weights, encoder=False)), deferred=ENCODER_HALF)
        self.net.eval().requires_grad_(False)

    @property
    def encoder_loaded(self) -> bool:
        return self._encoder_loader is None

    def _load_encoder(self) -> None:
        if self._encoder_loader is not None:
            _load_state(self.net, _same_state(_half(self._encoder_loader(), encoder=True)))
            self.net.eval().requires_grad_(False)
            self._encoder_loader = None

    def encode(self, audio) -> mx.array:
        """(B, io_channels, T) audio -> (B, latent_dim, ceil(T / downsampling_ratio)) latents."""
        torch = require_torch()
        cfg = self.config
        check_float_audio(audio)  # before the encoder's weights are read
        self._load_encoder()
        audio = _to_torch(audio)
        if audio.ndim != 3 or audio.shape[1] != cfg.io_channels or audio.shape[2] == 0:
            raise ValueError(
                f"audio must be (batch, {cfg.io_channels}, samples) with samples > 0, got {tuple(audio.shape)}"
            )
        with torch.inference_mode(), linear_threads(torch.float32):
            frames = self._patch(audio)
            frames = torch.nn.functional.pad(frames, (0, 0, 0, mlx_same.encoder_frame_padding(cfg, frames.shape[1])))
            tokens = self._resample_encode(frames)
            bottleneck = self.net.bottleneck
            latents = linear(tokens, self.net.to_latent) * bottleneck.scale + bottleneck.bias
            if cfg.auto_scale:
                latents = latents / bottleneck.running_std
            return _to_mx(latents[:, : mlx_same.latent_count(cfg, audio.shape[2])].transpose(1, 2))

    def _prepare_latents(self, latents, noise_regularize: bool | None, seed: int | None):
        """(B, C, L) latents -> bottleneck-decoded (B, L, C) torch; the optional noise is drawn by MLX as the MLX
        backend draws it, so a seed gives the same noise on both backends."""
        torch = require_torch()
        cfg = self.config
        z = _to_torch(latents)
        if z.ndim != 3 or z.shape[1] != cfg.latent_dim or z.shape[2] == 0:
            raise ValueError(f"latents must be (batch, {cfg.latent_dim}, length) with length > 0, got {tuple(z.shape)}")
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
        with torch.inference_mode(), linear_threads(torch.float32):
            tokens = linear(z[:, window_start : min(window_stop, z.shape[1])], self.net.from_latent)
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, window_stop - window_start - tokens.shape[1]))
            cuts = mlx_same.window_cuts(cfg, window_start, window_stop, z.shape[1])
            frames = self._resample_decode(tokens, window_start, cuts)
            audio = self._unpatch(frames[:, mlx_same.piece_frames(cfg, window_start, cuts, start, stop)])
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
        """The attention layout of the official TransformerResamplingBlock (shared with the MLX ``Resampler``)."""
        torch = require_torch()
        return mlx_same.run_blocks(
            cfg, blocks, x, first_group, cuts, _same_block, torch.arange, lambda parts: torch.cat(parts, dim=1)
        )


def _half(weights: dict, encoder: bool) -> dict:
    """The encoder half (``checkpoint.ENCODER_HALF``) of SAME ``weights``, or the rest (the decoder's)."""
    return {k: v for k, v in weights.items() if k.startswith(ENCODER_HALF) == encoder}


def load_torch_autoencoder(src, encoder: bool = True) -> TorchAutoencoder:
    """SAME autoencoder on torch from a SAME repo, a full SA3 repo or a converted directory (or an opened Source).

    Every tensor is strictly checked now; without ``encoder`` the encoder half is read on the first ``encode``.
    """
    source = src if isinstance(src, Source) else open_source(src)
    config = checkpoint_config(source).same

    def weights() -> dict:
        module = mlx_same.SAMEAutoencoder(config)  # for the strict check's shapes only (MLX initialises lazily)
        return component_weights(source, "autoencoder", mlx_same.sanitize, module, f"{source.root} autoencoder", True)

    return TorchAutoencoder(config, weights(), encoder_loader=None if encoder else weights)


def torch_autoencoder_from_mlx(module: mlx_same.SAMEAutoencoder) -> TorchAutoencoder:
    return TorchAutoencoder(module.config, dict(tree_flatten(module.parameters())))
