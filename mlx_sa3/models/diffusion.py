"""The backend-neutral part of a DiT call: the one-shot call, the per-step rule and the official guidance.

A backend's DiT provides ``config``, ``dtype``, ``prepare`` (step-invariant conditioning, whose result has ``batch``,
``cfg`` and ``latent_length``) and ``_velocity`` (the network on channels-first latents, [cond; uncond] rows when
guided). Everything else, the same maths on every backend, is here once.
"""

from __future__ import annotations

import math

import mlx.core as mx

from ..loading import to_mx

# Objectives whose denoised estimate is x - t v, the only one the samplers implement.
RF_OBJECTIVES = ("rectified_flow", "rf_denoiser")
OBJECTIVES = ("v", *RF_OBJECTIVES)
DEFAULT_OBJECTIVE = "rf_denoiser"  # every SA3 checkpoint; the one default of every config class


def sigma_alpha(objective: str, t: mx.array) -> tuple[mx.array, mx.array | None]:
    """Noise and signal scales at time ``t``; alpha None means 1 - sigma is implicit (rectified flow)."""
    if objective == "v":
        return mx.sin(t * math.pi / 2), mx.cos(t * math.pi / 2)
    return t, None


class DiffusionStep:
    """``__call__`` and ``step`` of a DiT on any backend; subclasses add ``prepare`` and ``_velocity``."""

    def __call__(
        self,
        x,
        t,
        cross_attn_cond,
        global_cond,
        local_add_cond=None,
        cfg_scale: float = 1.0,
        apg_scale: float = 1.0,
        negative_cross_attn_cond=None,
        negative_cross_attn_mask=None,
        cfg_interval=(0.0, 1.0),
        scale_phi: float = 0.0,
        cfg_norm_threshold: float = 0.0,
    ) -> mx.array:
        """Velocity (B, io, L) float32 as the official forward, including in-call CFG/APG."""
        prepared = self.prepare(
            cross_attn_cond,
            global_cond,
            local_add_cond,
            negative_cross_attn_cond,
            negative_cross_attn_mask,
            cfg=cfg_scale != 1.0,
        )
        return self.step(
            x,
            t,
            prepared,
            cfg_scale=cfg_scale,
            apg_scale=apg_scale,
            cfg_interval=cfg_interval,
            scale_phi=scale_phi,
            cfg_norm_threshold=cfg_norm_threshold,
        )

    def prepare(
        self,
        cross_attn_cond,
        global_cond,
        local_add_cond=None,
        negative_cross_attn_cond=None,
        negative_cross_attn_mask=None,
        cfg: bool = False,
    ):
        """Compute everything that does not change across sampling steps.

        ``cfg=True`` also prepares the unconditional branch: the all-zero context, or the negative prompt whose
        masked-out tokens are set to zero (as the official code does, not to the learned padding embedding). Without
        guidance the negative prompt plays no part, as in the official model, on every backend.
        """
        negative = negative_cross_attn_cond if cfg else None
        return self._prepare(cross_attn_cond, global_cond, local_add_cond, negative, negative_cross_attn_mask, cfg)

    def step(
        self,
        x,
        t,
        prepared,
        cfg_scale: float = 1.0,
        apg_scale: float = 1.0,
        cfg_interval=(0.0, 1.0),
        scale_phi: float = 0.0,
        cfg_norm_threshold: float = 0.0,
    ) -> mx.array:
        """Velocity (B, io, L) in float32 for latents x (B, io, L) at time t, with optional CFG/APG.

        Guidance runs iff ``cfg_scale != 1`` and ``cfg_interval[0] <= sigma[0] <= cfg_interval[1]`` (the official
        rule, which looks at the first item's noise level only).
        """
        x = to_mx(x, self.dtype)
        batch = x.shape[0]
        if batch != prepared.batch:
            raise ValueError(f"x has batch {batch}, the prepared conditioning {prepared.batch}")
        length = prepared.latent_length
        if length is not None and length != x.shape[2]:
            raise ValueError(f"x has {x.shape[2]} latents, the inpainting input was prepared for {length}")
        t = mx.broadcast_to(to_mx(t, mx.float32).reshape(-1), (batch,))
        sigma, alpha = sigma_alpha(self.config.diffusion_objective, t)
        guided = cfg_scale != 1.0 and cfg_interval[0] <= sigma[0].item() <= cfg_interval[1]
        if not guided:
            return self._velocity(x, t, prepared, guided=False).astype(mx.float32)
        if not prepared.cfg:
            raise ValueError("cfg_scale != 1 needs conditioning prepared with cfg=True")
        v_cond, v_uncond = mx.split(self._velocity(x, t, prepared, guided=True).astype(mx.float32), 2)
        return guide(
            x.astype(mx.float32), v_cond, v_uncond, sigma, alpha, cfg_scale, apg_scale, scale_phi, cfg_norm_threshold
        )


PrepareAndStep = DiffusionStep  # the former name


def _norm_ct(x: mx.array) -> mx.array:
    """L2 norm over channels and time, per batch item, (B, 1, 1)."""
    return mx.sqrt(mx.sum(x * x, axis=(1, 2), keepdims=True))


def guide(
    x,
    v_cond,
    v_uncond,
    sigma,
    alpha,
    cfg_scale: float,
    apg_scale: float,
    scale_phi: float = 0.0,
    cfg_norm_threshold: float = 0.0,
) -> mx.array:
    """Classifier-free guidance with adaptive projected guidance, in the denoised (x0) space, float32.

    ``alpha`` is None for rectified-flow objectives (x0 = x - sigma v) and cos(pi t / 2) for the v objective.
    """
    s = sigma[:, None, None]
    a = 1.0 if alpha is None else alpha[:, None, None]
    denoised_cond = x * a - v_cond * s
    diff = denoised_cond - (x * a - v_uncond * s)
    if cfg_norm_threshold > 0:
        diff = diff * mx.minimum(1.0, cfg_norm_threshold / _norm_ct(diff))
    if apg_scale != 0.0:
        # Keep only (a blend towards) the part of the guidance orthogonal to the conditional prediction.
        direction = denoised_cond / mx.maximum(_norm_ct(denoised_cond), 1e-12)
        orthogonal = diff - mx.sum(diff * direction, axis=(1, 2), keepdims=True) * direction
        diff = orthogonal if apg_scale == 1.0 else apg_scale * orthogonal + (1 - apg_scale) * diff
    v = (x * a - (denoised_cond + (cfg_scale - 1) * diff)) / s
    if scale_phi != 0.0:
        # CFG rescale: match the per-frame channel std of the conditional prediction (unbiased, as torch.std).
        ratio = mx.std(v_cond, axis=1, keepdims=True, ddof=1) / mx.std(v, axis=1, keepdims=True, ddof=1)
        v = scale_phi * (v * ratio) + (1 - scale_phi) * v
    return v
