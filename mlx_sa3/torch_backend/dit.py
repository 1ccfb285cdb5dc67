"""The DiT on torch: diffusers' ``StableAudio3DiTModel`` blocks run with the official model-level forward."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint import checkpoint_config, dit_weights
from ..loading import Source, open_source
from ..models import dit as mlx_dit
from ..models import keymaps
from ..models.diffusion import DiffusionStep
from .common import (
    _load_state,
    _state_dict,
    _to_mx,
    _to_torch,
    _torch_dtype,
    check_dtype,
    compute_threads,
    glu_feed_forward,
    linear,
    linear_threads,
    reorder_rows,
    require_torch,
)

_SA3_DIT = "diffusers.models.transformers.transformer_stable_audio3"


@dataclass
class TorchPrepared:
    """Step-invariant DiT inputs (torch): projected context(s), global embedding, local conditioning, and what the
    blocks derive from them (cross-attention keys/values, the local-conditioning terms)."""

    global_embed: object  # (B, E)
    context: object  # (B, Tc, E)
    uncond_context: object | None  # (B, Tc, E) when prepared for guidance
    local: object | None  # (B, L, local) channels-last, None: all zero
    cfg: bool
    #: per block: the cross-attention's normalised keys and its values, (B, H, Tc, D) each: (k, v) or (k, k2, v)
    kv: list | None = None
    #: per block: the same for the 2B rows [cond; uncond] when the unconditional context is a negative prompt; None
    #: when it is the all-zero context, whose cross-attention output is exactly zero (not computed)
    guided_kv: list | None = None
    #: per block: ``to_local_embed(local)`` (B, L, E); None when the local conditioning is all zero
    local_terms: list | None = None
    #: (depth, E): the per-block ``to_local_embed`` of a zero row, which every latent position then gets
    local_const: object | None = None

    @property
    def batch(self) -> int:
        return self.global_embed.shape[0]

    @property
    def latent_length(self) -> int | None:
        return None if self.local is None else self.local.shape[1]


def _dit_state(weights: dict, dtype=None) -> dict:
    """mlx_sa3 DiT parameters (tensors or the strict load path's TensorRefs) -> ``StableAudio3DiTModel`` state,
    float32 or the torch ``dtype`` (cast tensor by tensor as read)."""
    return _state_dict(weights, _dit_tensor, dtype)


def _dit_tensor(key: str, value):
    if key == "memory_tokens" and value.numel() == 0:
        return None  # diffusers has no memory-token parameter without memory tokens
    key = keymaps.dit_key_to_diffusers(key)
    if key.endswith("self_attn.to_qkv.weight") and value.shape[0] == 5 * value.shape[1]:  # differential only
        value = reorder_rows(value, keymaps.official_to_diffusers_qkv(value.shape[0]))
    if key in ("preprocess_conv.weight", "postprocess_conv.weight"):
        value = value.transpose(1, 2)  # MLX (out, k, in) -> torch (out, in, k)
    return key, value.contiguous()


# ------------------------------------------------------------------------------------------------- the blocks
# diffusers' StableAudio3DiTBlock forward, leaner (the same maths, tests/test_torch_dit_blocks.py checks it against
# diffusers' modules): cross-attention keys/values and local-conditioning terms come from ``prepare`` (diffusers
# recomputes them in every block of every step), the RoPE angles are computed once per step for all blocks, the q/k
# norm and RoPE write one float32 tensor in place, and residual updates are in place.


#: the blocks run on the token count rounded up to a multiple of this (zero rows that no position attends to,
#: dropped at the end): oneDNN's GEMMs ran some row counts at ~0.7x the rate of their neighbours (451, the
#: small DiT at 30 s: 183 GFLOP/s against 250-270 at 448-464, measured on 20 distinct weights)
_ROW_ALIGN = 16


def _rope_tables(inv_freq, tokens: int) -> tuple:
    """cos and sin of the RoPE angles of positions 0..tokens-1, float32 (tokens, 1, rot_dim / 2): diffusers'
    ``StableAudio3RotaryEmbedding`` repeats the frequencies over both halves of the rotated channels, so half is all."""
    torch = require_torch()
    angles = torch.outer(torch.arange(tokens, dtype=inv_freq.dtype), inv_freq)[:, None, :]
    return angles.cos(), angles.sin()


def _rms_norm(x, norm):
    """diffusers' ``StableAudio3RMSNorm`` (``force_fp32``): float32 statistics and weight, in float32."""
    return require_torch().nn.functional.rms_norm(x.float(), (x.shape[-1],), norm.gamma.float(), norm.eps)


def _norm_modulate(h, norm, scale, shift):
    """adaLN input ``rms_norm(h) * (1 + scale) + shift`` (scale, shift (B, 1, E)), in h's dtype."""
    return require_torch().addcmul(shift, _rms_norm(h, norm).to(h.dtype), 1 + scale)


def _head_norm_rope(x, norm, rope):
    """q/k norm of (B, S, H, D) ``x`` then, with ``rope`` tables, diffusers' partial RoPE (rotate_half pairing over
    the first rot_dim channels), both in float32 (as diffusers), rounded to x's dtype once; as (B, H, S, D)."""
    out = _rms_norm(x, norm)
    if rope is not None:
        cos, sin = (table[: x.shape[1]] for table in rope)  # positions 0.. of x's rows
        half = cos.shape[-1]
        x1, x2 = out[..., :half], out[..., half : 2 * half]
        first = x1 * cos - x2 * sin
        x2.mul_(cos).addcmul_(x1, sin)
        x1.copy_(first)
    return out.to(x.dtype).transpose(1, 2)


def _module_linear(x, layer):
    """``layer(x)``: the module's own forward (diffusers' path, :meth:`TorchDiT._reference_velocity`)."""
    return layer(x)


def _attention(q, k, v):
    return require_torch().nn.functional.scaled_dot_product_attention(q, k, v)


def _merge_heads(x):
    b, heads, s, d = x.shape
    return x.transpose(1, 2).reshape(b, s, heads * d)


def _self_attention(attn, x, rope, tokens: int):
    """diffusers' ``StableAudio3SelfAttnProcessor``: fused [q|k|v] or differential [q1|q2|k1|k2|v] rows; only the
    first ``tokens`` positions are keys (the rest is row padding, :data:`_ROW_ALIGN`)."""
    b, s, _ = x.shape
    parts = 5 if attn.use_differential else 3
    qkv = linear(x, attn.to_qkv).view(b, s, parts, attn.heads, attn.dim_heads)
    v = qkv[:, :tokens, -1].transpose(1, 2)
    queries = [_head_norm_rope(qkv[:, :, i], attn.q_norm, rope) for i in range((parts - 1) // 2)]
    keys = [_head_norm_rope(qkv[:, :tokens, i], attn.k_norm, rope) for i in range((parts - 1) // 2, parts - 1)]
    out = _attention(queries[0], keys[0], v)
    if attn.use_differential:
        out = out - _attention(queries[1], keys[1], v)
    return linear(_merge_heads(out), attn.to_out)


def _cross_keys_values(attn, context) -> tuple:
    """diffusers' cross-attention keys (k_norm applied) and values of ``context``, (B, H, Tc, D) each."""
    b, tokens, _ = context.shape
    parts = 3 if attn.use_differential else 2
    kv = attn.to_kv(context).view(b, tokens, parts, attn.heads, attn.dim_heads)
    keys = [attn.k_norm(kv[:, :, i]).transpose(1, 2).contiguous() for i in range(parts - 1)]
    return (*keys, kv[:, :, -1].transpose(1, 2).contiguous())


def _cross_attention(attn, x, kv):
    """diffusers' ``StableAudio3CrossAttnProcessor`` (no mask: the official DiT never applies one) on prepared kv."""
    b, s, _ = x.shape
    parts = 2 if attn.use_differential else 1
    q = linear(x, attn.to_q).view(b, s, parts, attn.heads, attn.dim_heads)
    queries = [_head_norm_rope(q[:, :, i], attn.q_norm, None) for i in range(parts)]
    out = _attention(queries[0], kv[0], kv[-1])
    if attn.use_differential:
        out = out - _attention(queries[1], kv[1], kv[-1])
    return linear(_merge_heads(out), attn.to_out)


def _block(block, h, global_mod, rope, kv, cross_rows: int, local, memory: int, tokens: int):
    """One ``StableAudio3DiTBlock`` on ``h`` (R, T, E), updated in place and returned; its first ``tokens`` = M + L
    positions are the memory tokens and latents, the rest row padding. ``kv``: keys/values for the first
    ``cross_rows`` rows (the rest, the null-context CFG branch, get an exactly zero cross-attention output);
    ``local``: the block's local term, (E,) for every latent position or (B, L, E) with R a multiple of B."""
    torch = require_torch()
    mod = (block.to_scale_shift_gate + global_mod)[:, None, :]
    scale_sa, shift_sa, gate_sa, scale_ff, shift_ff, gate_ff = mod.chunk(6, dim=-1)
    attn_out = _self_attention(block.self_attn, _norm_modulate(h, block.pre_norm, scale_sa, shift_sa), rope, tokens)
    h.addcmul_(attn_out, torch.sigmoid(1 - gate_sa))

    rows = h[:cross_rows]
    cross = _cross_attention(block.cross_attn, _rms_norm(rows, block.cross_attend_norm).to(h.dtype), kv)
    rows.add_(cross)

    audio = h[:, memory:tokens]
    if local.dim() == 1:
        audio.add_(local)
    else:
        audio.unflatten(0, (-1, local.shape[0])).add_(local)

    ff_out = glu_feed_forward(block.ff, _norm_modulate(h, block.ff_norm, scale_ff, shift_ff))
    return h.addcmul_(ff_out, torch.sigmoid(1 - gate_ff))


class TorchDiT(DiffusionStep):
    """torch counterpart of :class:`mlx_sa3.dit.DiT`: ``__call__``, ``prepare``, ``step``, ``dtype``, ``config``.

    ``__call__`` / ``step`` (guidance included) are the shared :class:`~mlx_sa3.models.diffusion.DiffusionStep`;
    torch computes only ``prepare`` and the velocities.

    ``dtype`` (float32 or bfloat16, :data:`~mlx_sa3.torch_backend.common.COMPUTE_DTYPES`) is the compute dtype, as
    in the MLX DiT's half path: every parameter is held in it (cast as read) and the activations run in it, while
    diffusers' blocks keep the official ``force_fp32`` RMSNorms (q/k norms too) and the RoPE rotation in float32, the
    timestep Fourier features are computed in float32 (then cast), the RoPE frequencies stay a float32 buffer, and
    the velocities come back as float32.
    """

    def __init__(self, config: mlx_dit.DiTConfig, weights: dict, dtype=None):
        torch, sa3 = require_torch(_SA3_DIT)
        self.config = config
        self._dtype = check_dtype(dtype)
        self._torch_dtype = _torch_dtype(self._dtype)
        with torch.device("meta"):  # the weights are assigned at load time
            net = sa3.StableAudio3DiTModel(
                io_channels=config.io_channels,
                embed_dim=config.embed_dim,
                depth=config.depth,
                num_heads=config.num_heads,
                cond_token_dim=config.cond_token_dim,
                global_cond_dim=config.global_cond_dim,
                local_add_cond_dim=config.local_add_cond_dim,
                timestep_features_dim=config.timestep_features_dim,
                ff_mult=config.ff_mult,
                num_memory_tokens=config.num_memory_tokens,
                use_differential_attention=config.differential,
            )
        # prompt_padding_embedding only acts with a context mask, which the official DiT never applies: inert zeros.
        net.prompt_padding_embedding = torch.nn.Parameter(torch.zeros(config.cond_token_dim, dtype=self._torch_dtype))
        # Official values where diffusers differs: RoPE width max(head_dim // 2, 32), block norm eps 1e-5. Its
        # frequencies are a float32 buffer whatever the compute dtype: positions up to ~1400 need float32.
        net.rotary_pos_emb = sa3.StableAudio3RotaryEmbedding(config.rope_dims, base=config.rope_base)
        for block in net.transformer_blocks:
            for norm in (block.pre_norm, block.cross_attend_norm, block.ff_norm):
                norm.eps = config.norm_eps
            for attn in (block.self_attn, block.cross_attn):
                attn.q_norm.eps = attn.k_norm.eps = config.qk_norm_eps
        _load_state(net, _dit_state(weights, self._torch_dtype))  # rotary_pos_emb, prompt_padding_embedding: above
        self.net = net.eval().requires_grad_(False)

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype; the sampler holds its latents in it, as with the MLX DiT (``SA3Model.sample_iter``)."""
        return self._dtype

    def _prepare(self, cross_attn_cond, global_cond, local_add_cond, negative, negative_mask, cfg: bool):
        """:meth:`prepare` on torch; ``negative`` is None unless guided."""
        torch, dtype = require_torch(), self._torch_dtype
        with torch.inference_mode(), compute_threads(dtype):
            context = self.net.to_cond_embed(_to_torch(cross_attn_cond, dtype))
            global_embed = self.net.to_global_embed(_to_torch(global_cond, dtype))
            kv = self._keys_values(context)
            uncond, guided_kv = None, None
            if negative is not None:
                negative = _to_torch(negative, dtype)
                if negative_mask is not None:
                    # The official code zeroes masked-out negative tokens (not the learned padding embedding).
                    negative = negative * _to_torch(negative_mask, torch.bool)[..., None]
                uncond = self.net.to_cond_embed(negative)
                guided_kv = [
                    tuple(torch.cat([c, u]) for c, u in zip(cond, unc))
                    for cond, unc in zip(kv, self._keys_values(uncond))
                ]
            elif cfg:
                uncond = torch.zeros_like(context)  # to_cond_embed has no biases: the null context embeds to zero
            local = None if local_add_cond is None else _to_torch(local_add_cond, dtype).transpose(1, 2)
            local_terms, local_const = self._local_terms(local)
        return TorchPrepared(global_embed, context, uncond, local, cfg, kv, guided_kv, local_terms, local_const)

    def _keys_values(self, context) -> list:
        return [_cross_keys_values(block.cross_attn, context) for block in self.net.transformer_blocks]

    def _local_terms(self, local):
        """Per-block inpainting terms, computed once per generation (diffusers recomputes them in every block of
        every step); an absent or all-zero input gives each block's constant ``to_local_embed`` of a zero row."""
        torch, blocks = require_torch(), self.net.transformer_blocks
        if local is not None and bool(torch.any(local != 0)):
            return [block.to_local_embed(local) for block in blocks], None
        zero = torch.zeros(1, self.config.local_add_cond_dim, dtype=self._torch_dtype)
        return None, torch.cat([block.to_local_embed(zero) for block in blocks])

    def _embed(self, x: mx.array, t: mx.array, prepared: TorchPrepared, linear) -> tuple:
        """The blocks' input (B, L, E) from channels-first x and the global modulation, ``linear(x, layer)`` running
        the input projection (inside the caller's inference mode and threads)."""
        net, dtype = self.net, self._torch_dtype
        h = _to_torch(x, dtype)
        h = linear((net.preprocess_conv(h) + h).transpose(1, 2), net.proj_in)
        # Fourier features of the float32 t in float32 (diffusers computes them in t's dtype), then cast
        temb = net.to_timestep_embed(net.timestep_features(_to_torch(t)).to(dtype))
        return h, net.global_cond_embedder(prepared.global_embed + temb)

    def _project_out(self, h, linear) -> mx.array:
        """The velocity (float32, channels-first) from the blocks' latent positions."""
        out = linear(h, self.net.proj_out).transpose(1, 2)
        return _to_mx((self.net.postprocess_conv(out) + out).float())

    def _velocity(self, x: mx.array, t: mx.array, prepared: TorchPrepared, guided: bool) -> mx.array:
        """The network on channels-first x; with ``guided`` the rows are [cond; uncond] (2B)."""
        torch, dtype = require_torch(), self._torch_dtype
        net, memory_count = self.net, self.config.num_memory_tokens
        with torch.inference_mode(), linear_threads(dtype):
            h, global_mod = self._embed(x, t, prepared, linear)
            kv, cross_rows = prepared.kv, h.shape[0]
            if guided:
                h, global_mod = torch.cat([h, h]), torch.cat([global_mod, global_mod])
                if prepared.guided_kv is not None:
                    kv, cross_rows = prepared.guided_kv, h.shape[0]
            rows, length, width = h.shape
            tokens = memory_count + length
            padding = -tokens % _ROW_ALIGN
            h = torch.cat([net.memory_tokens.expand(rows, -1, -1), h, h.new_zeros(rows, padding, width)], dim=1)
            rope = _rope_tables(net.rotary_pos_emb.inv_freq, h.shape[1])
            locals_ = prepared.local_terms or prepared.local_const
            for block, block_kv, local in zip(net.transformer_blocks, kv, locals_):
                h = _block(block, h, global_mod, rope, block_kv, cross_rows, local, memory_count, tokens)
            return self._project_out(h[:, memory_count:tokens], linear)

    def _reference_velocity(self, x: mx.array, t: mx.array, prepared: TorchPrepared, guided: bool) -> mx.array:
        """:meth:`_velocity` with diffusers' ``StableAudio3DiTBlock`` forwards as they are (every block recomputing
        its cross-attention keys/values and local term): what the lean blocks are tested and benchmarked against."""
        torch, dtype = require_torch(), self._torch_dtype
        net, memory_count = self.net, self.config.num_memory_tokens
        with torch.inference_mode(), compute_threads(dtype):
            h, global_mod = self._embed(x, t, prepared, _module_linear)
            context = prepared.context
            # The official DiT always adds to_local_embed(local): with no inpainting, that of zeros.
            local = prepared.local
            if local is None:
                local = torch.zeros(h.shape[0], h.shape[1], self.config.local_add_cond_dim, dtype=dtype)
            if guided:
                h, global_mod, local = (torch.cat([a, a]) for a in (h, global_mod, local))
                context = torch.cat([context, prepared.uncond_context])
            if memory_count:
                h = torch.cat([net.memory_tokens.expand(h.shape[0], -1, -1), h], dim=1)
            rope = net.rotary_pos_emb(h.shape[1], h.device)
            for block in net.transformer_blocks:
                h = block(
                    h,
                    context=context,
                    global_modulation=global_mod,
                    rope=rope,
                    local_seq=local,
                    num_memory_tokens=memory_count,
                )
            return self._project_out(h[:, memory_count:], _module_linear)

    def update_weights(self, weights: dict) -> None:
        """Replace some parameters, given in mlx_sa3 names and MLX layouts (e.g. LoRA-merged weights), rounded to
        the compute dtype as they are converted (a bfloat16 DiT never holds a float32 copy of a batch)."""
        torch = require_torch()
        params = dict(self.net.named_parameters())
        state = _dit_state(weights, self._torch_dtype)
        unknown = sorted(set(state) - set(params))
        if unknown:
            raise KeyError(f"no such torch DiT parameters: {', '.join(unknown)}")
        with torch.no_grad():
            for key, value in state.items():
                params[key].copy_(value)


def load_torch_dit(source, dtype=None) -> TorchDiT:
    """DiT on torch from a full SA3 checkpoint (directory, repo id or Source), computing in ``dtype``: float32
    (default) or bfloat16 (fast on CPUs with bf16 matrix units, ``platform.has_fast_bf16_matmul``).

    bfloat16 weights are cast tensor by tensor from the memory-mapped file, whose float32 pages are given back as
    each one is read: the float32 network is never resident, the bfloat16 one holds half its bytes.
    """
    dtype = check_dtype(dtype)
    source = source if isinstance(source, Source) else open_source(source)
    # a quantized checkpoint (convert.py --quantize) is dequantized to float32: torch has no affine int kernels here
    _, weights = dit_weights(source, dequantize=True, refs=True)
    return TorchDiT(checkpoint_config(source).dit, weights, dtype)


def torch_dit_from_mlx(module: mlx_dit.DiT, dtype=None) -> TorchDiT:
    """The same DiT on torch, computing in ``dtype`` (default float32)."""
    return TorchDiT(module.config, dict(tree_flatten(module.parameters())), dtype)
