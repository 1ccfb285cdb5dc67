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
    reorder_rows,
    require_torch,
)

_SA3_DIT = "diffusers.models.transformers.transformer_stable_audio3"


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
            uncond = None
            if negative is not None:
                negative = _to_torch(negative, dtype)
                if negative_mask is not None:
                    # The official code zeroes masked-out negative tokens (not the learned padding embedding).
                    negative = negative * _to_torch(negative_mask, torch.bool)[..., None]
                uncond = self.net.to_cond_embed(negative)
            elif cfg:
                uncond = torch.zeros_like(context)  # to_cond_embed has no biases: the null context embeds to zero
            local = None if local_add_cond is None else _to_torch(local_add_cond, dtype).transpose(1, 2)
        return TorchPrepared(global_embed, context, uncond, local, cfg)

    def _velocity(self, x: mx.array, t: mx.array, prepared: TorchPrepared, guided: bool) -> mx.array:
        """The network on channels-first x; with ``guided`` the rows are [cond; uncond] (2B)."""
        torch, dtype = require_torch(), self._torch_dtype
        net, memory_count = self.net, self.config.num_memory_tokens
        with torch.inference_mode(), compute_threads(dtype):
            h = _to_torch(x, dtype)
            h = net.proj_in((net.preprocess_conv(h) + h).transpose(1, 2))
            # Fourier features of the float32 t in float32 (diffusers computes them in t's dtype), then cast
            temb = net.to_timestep_embed(net.timestep_features(_to_torch(t)).to(dtype))
            global_mod = net.global_cond_embedder(prepared.global_embed + temb)
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
            out = net.proj_out(h[:, memory_count:]).transpose(1, 2)
            return _to_mx((net.postprocess_conv(out) + out).float())

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
