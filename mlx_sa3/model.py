"""A whole Stable Audio 3 checkpoint: text encoder, duration conditioner, DiT and SAME autoencoder.

``load_model`` opens any layout mlx_sa3 reads (full Hub repo, repo id, converted directory). The
:class:`SA3Model` it returns exposes the building blocks exactly as the official code composes them, in the
official channels-first layout: ``encode_text``, ``encode_seconds``, ``conditioning``, ``schedule``, ``sample``.
The generation modes and file output live in :mod:`mlx_sa3.pipeline`.
"""

from __future__ import annotations

import gc
import os
import warnings
from typing import Callable, Iterator, Sequence

import mlx.core as mx
import numpy as np

from . import backend as backends
from . import platform
from .checkpoint import SA3Config, checkpoint_config, dit_weights
from .loading import CheckpointError, Source, open_source, to_mx
from .models.conditioners import Conditioners
from .models.diffusion import RF_OBJECTIVES
from .options import real_number, whole_number
from .sampling import Step, build_schedule, gaussian_noise, sample_iter

default_dtype = backends.default_dtype
__all__ = ["Conditioners", "SA3Config", "SA3Model", "default_dtype", "load_model"]


#: The networks an SA3Model can load on first use and release (see :meth:`SA3Model.release`).
COMPONENTS = ("text_encoder", "dit", "autoencoder")


def _component(name: str) -> property:
    def get(self):
        if self._parts[name] is None and name in self._loaders:
            self._parts[name] = self._loaders[name]()
        return self._parts[name]

    def set(self, value):
        self._parts[name] = value

    return property(get, set, doc=f"The {name} network (loaded on first access when it has a loader).")


class SA3Model:
    """Every component of one SA3 checkpoint, with the official conditioning and sampling semantics.

    ``loaders`` (name -> zero-argument function) make a component lazy: a network passed as None is loaded when
    first used, and :meth:`release` drops it again (it is reloaded if used afterwards). This is how one-shot use
    keeps only one stage's network resident (``load_model(..., lazy=True)``; ``StableAudio3(keep_loaded=False)``).
    """

    dit = _component("dit")
    autoencoder = _component("autoencoder")
    text_encoder = _component("text_encoder")

    def __init__(
        self,
        config: SA3Config,
        dit,
        autoencoder,
        text_encoder,
        conditioners: Conditioners,
        source=None,
        loaders: dict[str, Callable] | None = None,
    ):
        self.config = config
        self._loaders = dict(loaders or {})
        self._parts = {"dit": dit, "autoencoder": autoencoder, "text_encoder": text_encoder}
        self.conditioners = conditioners
        self.source = source

    @property
    def loaded(self) -> list[str]:
        """Names of the networks resident now."""
        return [name for name in COMPONENTS if self._parts[name] is not None]

    def release(self, *names: str) -> None:
        """Free the named networks (all with no names) that can be loaded again, MLX's buffer cache and the C heap's
        free pages (``platform.trim_heap``).

        Networks without a loader (passed in built) are kept: dropping them could not be undone.
        """
        for name in names or COMPONENTS:
            if name not in COMPONENTS:
                raise ValueError(f"unknown component {name!r}; choose from {', '.join(COMPONENTS)}")
            stack = getattr(self, "_lora_stack", None)
            if name == "dit" and stack is not None and stack.adapters:
                continue  # LoRA-adapted weights are not in the checkpoint: reloading would silently drop them
            if name in self._loaders:
                self._parts[name] = None
        gc.collect()
        mx.clear_cache()
        platform.trim_heap()

    @property
    def downsampling_ratio(self) -> int:
        """Audio samples per latent, from the loaded autoencoder or (without loading it) the checkpoint config."""
        if self._parts["autoencoder"] is None and self.source is not None:
            return checkpoint_config(self.source).same.downsampling_ratio
        return self.autoencoder.downsampling_ratio

    @property
    def sample_rate(self) -> int:
        return self.config.sample_rate

    @property
    def latent_dim(self) -> int:
        return self.config.io_channels

    # -- conditioning --------------------------------------------------------------------------------------------

    def encode_text(self, prompts: Sequence[str]):
        """(B, max_length, 768) float32, padded positions replaced by the learned padding embedding, and the mask."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not len(prompts):
            raise ValueError("encode_text needs at least one prompt")
        _warn_on_truncation(self.text_encoder.tokenizer, list(prompts))
        hidden, mask = self.text_encoder.encode(list(prompts))
        emb = mx.where(mask[..., None], hidden.astype(mx.float32), self.conditioners.padding_embedding)
        return emb, mask

    def encode_seconds(self, seconds) -> mx.array:
        """The ``seconds_total`` embedding (B, 1, 768) of the requested durations."""
        return self.conditioners.seconds(seconds)

    def conditioning(
        self, prompts, seconds, inpaint_mask=None, inpaint_known_latents=None, length=None, negative_prompts=None
    ) -> dict:
        """The DiT inputs exactly as the official code builds them.

        ``inpaint_mask`` is (B, 1, L) or (B, L) with 1 = keep the known latent; ``inpaint_known_latents`` (B, C, L)
        are multiplied by the mask here. Without a mask the local conditioning is all zeros (and still used).
        With ``negative_prompts`` the dict also holds ``negative_cross_attn_cond`` / ``negative_cross_attn_mask``.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        batch = len(prompts)
        seconds = _seconds_per_prompt(seconds, batch)
        if length is not None and whole_number(length, "length") < 1:
            raise ValueError(f"length must be at least 1 latent, got {length}")
        emb, mask = self.encode_text(prompts)
        sec = self.encode_seconds(seconds)
        cond = {
            "cross_attn_cond": self._cross_attn(emb, sec),
            "global_cond": self._global(sec),
            "local_add_cond": self.local_conditioning(batch, length, inpaint_mask, inpaint_known_latents),
        }
        if negative_prompts is not None:
            if isinstance(negative_prompts, str):
                negative_prompts = [negative_prompts] * batch
            neg_emb, neg_mask = self.encode_text(negative_prompts)
            cond["negative_cross_attn_cond"] = self._cross_attn(neg_emb, sec)
            cond["negative_cross_attn_mask"] = mx.concatenate([neg_mask, mx.ones((batch, 1), dtype=mx.bool_)], axis=1)
        return cond

    def _cross_attn(self, prompt_emb: mx.array, seconds_emb: mx.array) -> mx.array:
        parts = {"prompt": prompt_emb, "seconds_total": seconds_emb}
        return mx.concatenate([parts[k] for k in self.config.cross_attention_cond_ids], axis=1)

    def _global(self, seconds_emb: mx.array) -> mx.array:
        parts = {"seconds_total": seconds_emb[:, 0]}
        return mx.concatenate([parts[k] for k in self.config.global_cond_ids], axis=-1)

    def local_conditioning(self, batch: int, length: int | None, inpaint_mask=None, known=None) -> mx.array:
        """``[mask, known * mask]`` on the channel axis, (B, C + 1, L)."""
        if inpaint_mask is None:
            if length is None:
                raise ValueError("length is required when no inpaint mask is given")
            return mx.zeros((batch, self.latent_dim + 1, length), dtype=mx.float32)
        mask = to_mx(inpaint_mask)
        if mask.ndim == 2:
            mask = mask[:, None, :]
        mask = mx.broadcast_to(mask, (batch, 1, mask.shape[-1]))
        known = mx.zeros((batch, self.latent_dim, mask.shape[-1])) if known is None else to_mx(known)
        if length is not None and mask.shape[-1] != length:
            raise ValueError(f"inpaint mask has {mask.shape[-1]} latents, expected length {length}")
        return mx.concatenate([mask, known * mask], axis=1)

    # -- sampling ------------------------------------------------------------------------------------------------

    def schedule(
        self, steps: int, sigma_max: float = 1.0, length: int = 1, dist_shift: dict | None = None
    ) -> np.ndarray:
        """The official inference schedule (``steps + 1`` float32 values; LogSNR shift unless the config says so).

        ``dist_shift`` replaces the checkpoint's ``sampling_distribution_shift_options`` (None: the checkpoint's).
        """
        shift = self.config.sampling_shift if dist_shift is None else dist_shift
        return build_schedule(steps, sigma_max, length, shift)

    def sample_iter(
        self,
        noise,
        cond: dict,
        steps: int = 8,
        sampler: str | None = None,
        cfg_scale: float = 1.0,
        apg_scale: float = 1.0,
        init_latents=None,
        init_noise_level: float = 1.0,
        noise_fn=None,
        key: mx.array | None = None,
        schedule_length: int | None = None,
        cfg_interval=(0.0, 1.0),
        scale_phi: float = 0.0,
        cfg_norm_threshold: float = 0.0,
        sigma_max: float = 1.0,
        dist_shift: dict | None = None,
    ) -> Iterator[Step]:
        """Generator over sampling steps; see :meth:`sample`. Yields a :class:`~mlx_sa3.sampling.Step` per step.

        ``cfg_interval``, ``scale_phi`` and ``cfg_norm_threshold`` go to every ``DiT.step`` (official guidance).
        ``sigma_max`` starts a text-to-audio schedule below 1 (the noise is used as given); with ``init_latents`` the
        start level is ``init_noise_level``. ``dist_shift`` replaces the checkpoint's schedule shift.
        """
        if self.config.diffusion_objective not in RF_OBJECTIVES:
            raise ValueError(
                f"diffusion_objective {self.config.diffusion_objective!r} is not supported: the samplers "
                f"are rectified-flow only ({', '.join(RF_OBJECTIVES)})"
            )
        sampler = sampler or self.config.default_sampler
        steps = whole_number(steps, "steps")
        x = to_mx(noise)
        self._check_latents(x, cond, "noise")
        if init_latents is not None:
            self._check_latents(to_mx(init_latents), cond, "init_latents", x.shape)
        batch, _, length = x.shape
        sigma_max = float(init_noise_level) if init_latents is not None else float(sigma_max)
        sigmas = self.schedule(steps, sigma_max, schedule_length or length, dist_shift)
        if init_latents is not None:
            x = to_mx(init_latents) * (1 - sigma_max) + x * sigma_max
        guided = cfg_scale != 1.0

        def prepare():
            return self.dit.prepare(
                cond["cross_attn_cond"],
                cond["global_cond"],
                cond.get("local_add_cond"),
                negative_cross_attn_cond=cond.get("negative_cross_attn_cond"),
                negative_cross_attn_mask=cond.get("negative_cross_attn_mask"),
                cfg=guided,
            )

        self._lora_at(sigmas[0])
        prepared = prepare()
        dtype = self.dit.dtype
        x = x.astype(dtype)

        def velocity(x, t):
            nonlocal prepared
            if self._lora_at(t):  # a LoRA's sigma interval switched it: the prepared conditioning is stale
                prepared = prepare()
            return self.dit.step(
                x,
                mx.full((batch,), t, dtype=mx.float32),
                prepared,
                cfg_scale=cfg_scale,
                apg_scale=apg_scale,
                cfg_interval=cfg_interval,
                scale_phi=scale_phi,
                cfg_norm_threshold=cfg_norm_threshold,
            )

        if noise_fn is None and sampler == "pingpong":
            noise_fn = gaussian_noise(key if key is not None else mx.random.key(0))
        try:
            yield from sample_iter(velocity, x, sigmas, sampler, noise_fn)
        finally:
            self._lora_at(None)  # outside sampling every LoRA acts again, whatever its sigma interval

    def _check_latents(self, x: mx.array, cond: dict, what: str, shape=None) -> None:
        """(B, C, L) latents that fit the model and the conditioning, or a ValueError that says how they do not."""
        if x.ndim != 3 or x.shape[1] != self.latent_dim or x.shape[2] < 1:
            raise ValueError(f"{what} must be (batch, {self.latent_dim}, length >= 1), got {tuple(x.shape)}")
        if shape is not None and tuple(x.shape) != tuple(shape):
            raise ValueError(f"{what} must have the noise's shape {tuple(shape)}, got {tuple(x.shape)}")
        local = cond.get("local_add_cond")
        if local is not None and local.shape[-1] != x.shape[2]:
            raise ValueError(
                f"{what} has {x.shape[2]} latents but the conditioning was made for {local.shape[-1]}: "
                f"build it with conditioning(..., length={x.shape[2]})"
            )

    def sample(
        self,
        noise,
        cond: dict,
        steps: int = 8,
        sampler: str | None = None,
        cfg_scale: float = 1.0,
        apg_scale: float = 1.0,
        init_latents=None,
        init_noise_level: float = 1.0,
        **kwargs,
    ) -> mx.array:
        """Sample latents (B, C, L) from ``noise`` (B, C, L) with the conditioning dict of :meth:`conditioning`.

        ``init_latents`` (audio-to-audio) are mixed with the noise at ``init_noise_level`` and the schedule starts
        there; ``sampler`` defaults to the checkpoint's official default.
        """
        last = None
        for last in self.sample_iter(
            noise, cond, steps, sampler, cfg_scale, apg_scale, init_latents, init_noise_level, **kwargs
        ):
            pass
        return last.x.astype(mx.float32)

    # -- LoRA adapters (logic in mlx_sa3.lora) --------------------------------------------------------------------

    def load_lora(self, paths, strength=1.0, interval=None, layer_filter: str = "") -> list[int]:
        """Load LoRA files (a path or a list) after those already loaded: ``lora_index`` 0, 1, ... in that order.

        ``strength``: one value for all, or one per path. ``interval=(lo, hi)``: active only while the sampler's
        sigma lies in [lo, hi] (one pair for all, or a list with one pair or None per path). ``layer_filter``:
        comma-separated official DiT module names left unadapted. Returns the new LoRAs' indices. Files are
        checked strictly before any weight changes.
        """
        from . import lora

        paths = [paths] if isinstance(paths, (str, os.PathLike)) else list(paths)
        strengths = strength if isinstance(strength, (list, tuple)) else [strength] * len(paths)
        if len(strengths) != len(paths):
            raise ValueError(f"{len(strengths)} strengths for {len(paths)} LoRA files")
        return lora.attach(self, list(zip(paths, strengths)), interval=interval, layer_filter=layer_filter)

    def set_lora_strength(self, strength: float, lora_index: int | None = None) -> None:
        """Strength of one LoRA (``lora_index``) or of every loaded LoRA (None); 0 switches it off."""
        from . import lora

        lora.control(self, "strength", strength, lora_index)

    def set_lora_interval(self, interval, lora_index: int | None = None) -> None:
        """Sigma interval (lo, hi) in which a LoRA acts during sampling; None: always."""
        from . import lora

        lora.control(self, "interval", interval, lora_index)

    def set_lora_layer_filter(self, layer_filter: str, lora_index: int | None = None) -> None:
        """Comma-separated substrings of official DiT module names (``[a-b]`` ranges) on which a LoRA is off."""
        from . import lora

        lora.control(self, "layer_filter", layer_filter, lora_index)

    def unload_lora(self, lora_index: int | None = None) -> None:
        """Remove one LoRA (later ones move down one index) or all of them, restoring the original weights."""
        from . import lora

        lora.detach(self, lora_index)

    @property
    def loras(self) -> list[dict]:
        """The loaded LoRAs in order: index, name, path, adapter_type, rank, alpha, strength, interval, filter."""
        from . import lora

        return lora.listing(self)

    def _lora_at(self, t) -> bool:
        """Sampler hook: apply the LoRAs' sigma intervals at time ``t``; True when the weights changed."""
        from . import lora

        return lora.at_sigma(self, t)


def _seconds_per_prompt(seconds, batch: int) -> np.ndarray:
    """One finite duration in seconds for every prompt (one value is shared by all)."""
    values = np.asarray(seconds, dtype=object).reshape(-1)
    numbers = np.array([real_number(v, "seconds") for v in values], dtype=np.float32)
    if not np.isfinite(numbers).all():
        raise ValueError(f"seconds must be finite, got {list(values)}")
    if numbers.size not in (1, batch):
        raise ValueError(f"got {numbers.size} durations (seconds) for {batch} prompts")
    return np.broadcast_to(numbers, (batch,))


def _warn_on_truncation(tokenizer, prompts: list[str]) -> None:
    """Say when a prompt is longer than the text encoder reads: truncation is official, but silent it looks like a
    prompt that was obeyed."""
    cut = [(i, n) for i, n in enumerate(tokenizer.overflow(prompts)) if n]
    if cut:
        which = (
            "a prompt" if len(prompts) == 1 else f"prompt {cut[0][0] + 1}" + (" (and others)" if len(cut) > 1 else "")
        )
        warnings.warn(
            f"{which} is longer than the text encoder reads: its last {cut[0][1]} tokens are ignored (at most "
            f"{tokenizer.text_budget} tokens; the official model truncates the same way)",
            stacklevel=4,
        )


def load_model(src, dtype=None, backend: str = "mlx", lazy: bool = False, weights_dtype=None) -> SA3Model:
    """Load a full SA3 checkpoint (Hub repo id, original directory or converted directory).

    ``dtype`` applies to the DiT and the text encoder (None: float16 on Metal, float32 on the CPU, where MLX half
    matmuls are slow); the SAME decoder stays float32. ``backend="torch"`` runs the three networks with torch on the
    CPU in float32, or the DiT and text encoder in ``dtype="bfloat16"`` (the conditioning glue and the sampler
    arithmetic stay the shared code); ``"auto"`` picks one
    (:func:`mlx_sa3.backend.choose_backend`).

    With ``lazy`` nothing but the conditioners is loaded now (the DiT's tensors are checked against the model from
    the file header): each network loads when first used and :meth:`SA3Model.release` frees it. The MLX SAME
    autoencoder is then loaded decoder first: its encoder half is read only when audio is encoded (never for plain
    text-to-audio).

    ``weights_dtype`` (MLX; default: ``dtype``) is how the DiT's and the text encoder's linear weights are held:
    ``"bfloat16"`` with float32 compute rounds them once at load and widens them per layer at call time, halving
    their memory for a relative weight error <= 2^-8 (:mod:`mlx_sa3.storage`; docs/ARCHITECTURE.md, "Weight
    storage"). The SAME decoder is never narrowed.
    """
    backend, _ = backends.resolve_backend(backend, dtype, weights_dtype)
    backends.check_weights_dtype(weights_dtype, dtype, backend)
    source = src if isinstance(src, Source) else open_source(src)
    if source.autoencoder_only:
        raise CheckpointError(
            f"{source.root} is a SAME autoencoder checkpoint, not a Stable Audio 3 model; use load_autoencoder for it"
        )
    parsed = checkpoint_config(source)
    parsed.check_sampleable()
    config = parsed.sa3
    loaders = {
        "dit": lambda: backends.load_dit(source, dtype, backend, weights_dtype),
        "autoencoder": lambda: backends.load_autoencoder(source, backend=backend, encoder=not lazy),
        "text_encoder": lambda: backends.load_text_encoder(
            source, config.prompt_max_length, dtype, backend, weights_dtype
        ),
    }
    conditioners = Conditioners(source.component("conditioners"), config)
    if lazy:
        dit_weights(source, dequantize=False, refs=True)  # strict check now (headers only), before any network runs
        return SA3Model(config, None, None, None, conditioners, source, loaders)
    parts = {name: loaders[name]() for name in ("dit", "autoencoder", "text_encoder")}
    return SA3Model(config, conditioners=conditioners, source=source, loaders=loaders, **parts)
