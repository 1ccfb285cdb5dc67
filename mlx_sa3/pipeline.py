"""``StableAudio3``: the generation API for scripts and apps, with every SA3 mode.

One object is loaded once and called many times. ``stream`` is the primitive: a generator of per-step progress
events, then decoded audio pieces as the streaming decoder produces them, then a final event. ``generate`` collects
it into an array; ``generate_to_file`` writes each piece to disk as it comes, so memory stays flat with duration.
Lengths, masks and schedules follow the official ``StableAudioModel.generate`` (spec §4.4-4.7).
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import mlx.core as mx
import numpy as np

from . import options as opts
from .audio import (
    AudioError,
    check_duration,
    format_for,
    generation_tags,
    is_float_output,
    load_audio_input,
    open_writer,
    output_sample_rate,
)
from .backend import resolve_backend
from .diagnosis import explain_non_finite
from .items import collect_items, is_per_item, item_count, pad_items, stream_items
from .levels import (
    DEFAULT_CEILING_DBFS,
    DEFAULT_TARGET_LUFS,
    LevelMeter,
    LevelReport,
    apply_gain,
    clipping_warning,
    copy_with_gain,
    normalization_gain,
    validate_normalization,
)
from .model import SA3Model, load_model
from .outputs import AtomicFiles, OutputError, batch_targets, is_write_error, os_error_message, resolve_seed
from .sampling import SAMPLERS, NonFiniteError

HEADROOM_SECONDS = opts.DEFAULT_DURATION_PADDING_SEC  # the official default of duration_padding_sec
DEFAULT_STEPS = 8


class GenerationCancelled(Exception):
    """The callback asked to stop; nothing was written to the output path."""


# -- events -------------------------------------------------------------------------------------------------------


@dataclass
class StepEvent:
    """Sampling step ``index + 1`` of ``total`` finished at noise level ``t``."""

    index: int
    total: int
    t: float
    elapsed: float
    stage: str = "sampling"


@dataclass
class AudioEvent:
    """Decoded audio (B, 2, n) float32 numpy, starting at sample ``offset`` of ``total`` samples."""

    audio: np.ndarray
    offset: int
    total: int
    stage: str = "decoding"
    item: int | None = None  # per-item requests: the item this (1, 2, n) piece belongs to; None = every item


@dataclass
class DoneEvent:
    """The end of a generation: its latents (B, C, L), seed and seconds per stage."""

    latents: mx.array
    seed: int
    timings: dict
    stage: str = "done"
    levels: list = field(default_factory=list)  # LevelReport per item, gain_db = the requested normalisation's
    seeds: list | None = None  # per-item requests: every item's seed (latents is then a per-item list)


@dataclass
class GenerationOutput:
    audio: np.ndarray  # (B, 2, N) float32 in [-1, 1] (beyond with clamp=False)
    sample_rate: int
    latents: mx.array  # (B, C, L) float32: the sampled latents of the valid region
    seed: int
    timings: dict = field(default_factory=dict)
    levels: list = field(default_factory=list)  # LevelReport per item: the raw decoder output, gain applied
    items: list | None = None  # item i's audio (2, N_i); per-item requests give each item exactly its own length
    seeds: list | None = None  # item i's seed

    def __post_init__(self):
        if self.items is None:
            self.items = list(self.audio)
        if self.seeds is None:
            self.seeds = [self.seed] * len(self.items)


@dataclass
class FileOutput:
    paths: list  # one file per batch item
    sample_rate: int  # of the files (opus: 48 kHz)
    seed: int
    timings: dict = field(default_factory=dict)
    levels: list = field(default_factory=list)  # LevelReport per item: the raw decoder output, gain applied
    seeds: list | None = None  # item i's seed (per-item requests: each its own)

    def __post_init__(self):
        if self.seeds is None:
            self.seeds = [self.seed] * len(self.paths)


# -- request planning -----------------------------------------------------------------------------------------------


@dataclass
class GenerationRequest:
    """Every generation option, listed once: the keyword arguments of ``plan`` / ``stream`` / ``generate`` /
    ``generate_to_file`` and what the CLI builds from its flags.

    ``prompt``: a string or one per batch item (optional with init or inpaint audio). ``duration``: seconds of
    output. ``negative_prompt``: steered away from with ``cfg_scale != 1``. ``steps`` (default 8), ``sampler``
    (default: the checkpoint's official one), ``cfg_scale`` (default 1: off), ``apg_scale`` (1 = APG, 0 = CFG),
    ``seed`` (default random), ``noise`` (explicit (B, C, L) start noise). ``init_audio`` + ``init_noise_level``:
    audio-to-audio. ``inpaint_audio`` + ``inpaint_regions`` ((start, end) seconds; none: continue the clip).
    ``batch_size``: variations at once. Audio inputs are file paths, (audio, sample_rate) pairs or arrays.

    Official guidance and schedule options (see :mod:`mlx_sa3.options`): ``cfg_interval`` (0, 1), ``scale_phi`` 0,
    ``cfg_norm_threshold`` 0, ``apg_scale`` in [0, 1], ``sigma_max`` (None: 1 for text-to-audio; audio-to-audio
    starts at ``init_noise_level``), ``duration_padding_sec`` 6, ``dist_shift`` (None: the checkpoint's).
    Levels (see :mod:`mlx_sa3.levels`): ``normalize`` None / "peak" (to ``ceiling_dbfs``, -1) / "loudness" (to
    ``target_lufs``, -14, true peak kept under the ceiling); ``clamp=False`` keeps the raw decoder output.
    Per item (:mod:`mlx_sa3.items`): a list of prompts with a list (or one value) of ``duration``, ``seed`` and
    ``negative_prompt`` gives every item its own length, conditioning and seed, as if generated alone.
    """

    prompt: object = None
    duration: float | list = 30.0
    negative_prompt: object = None
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    apg_scale: float = 1.0
    seed: int | list | None = None
    noise: object = None
    init_audio: object = None
    init_noise_level: float = opts.DEFAULT_INIT_NOISE_LEVEL
    inpaint_audio: object = None
    inpaint_regions: object = None
    batch_size: int = 1
    cfg_interval: object = opts.DEFAULT_CFG_INTERVAL
    scale_phi: float = opts.DEFAULT_SCALE_PHI
    cfg_norm_threshold: float = opts.DEFAULT_CFG_NORM_THRESHOLD
    sigma_max: float | None = None
    duration_padding_sec: float = opts.DEFAULT_DURATION_PADDING_SEC
    dist_shift: object = None
    normalize: str | None = None
    ceiling_dbfs: float = DEFAULT_CEILING_DBFS
    target_lufs: float = DEFAULT_TARGET_LUFS
    clamp: bool = True

    def validate(self) -> dict:
        """Check every option that needs no model (raises ValueError, one line) and return them normalised.

        The CLI calls this before loading a model; planning calls it again.
        """
        validate_normalization(self.normalize, self.ceiling_dbfs, self.target_lufs)
        opts.validate_cfg_scale(self.cfg_scale)
        opts.whole_number(self.batch_size, "batch size")
        if self.steps is not None:
            opts.whole_number(self.steps, "steps")
        sigma_max = None if self.sigma_max is None else opts.validate_sigma_max(self.sigma_max)
        if sigma_max is not None and self.init_audio is not None and sigma_max != float(self.init_noise_level):
            raise ValueError(
                f"with init audio the schedule starts at init_noise_level (--init-noise-level) "
                f"{float(self.init_noise_level):g}; sigma_max (--sigma-max) {sigma_max:g} differs: give one of them"
            )
        return {
            **opts.validate_guidance(self.cfg_interval, self.scale_phi, self.cfg_norm_threshold, self.apg_scale),
            "sigma_max": opts.DEFAULT_SIGMA_MAX if sigma_max is None else sigma_max,
            "duration_padding_sec": opts.validate_duration_padding_sec(self.duration_padding_sec),
            "dist_shift": opts.validate_dist_shift(self.dist_shift),
            "normalize": self.normalize,
            "ceiling_dbfs": float(self.ceiling_dbfs),
            "target_lufs": float(self.target_lufs),
            "clamp": opts.flag(self.clamp, "clamp"),
        }

    @classmethod
    def of(cls, request: "GenerationRequest | None", prompt=None, duration: float = 30.0, **options):
        """``request`` as given, or one built from the keyword options (not both)."""
        if request is None:
            return cls(prompt, duration, **options)
        if options or prompt is not None:
            raise TypeError("pass either a GenerationRequest or keyword options, not both")
        return request


@dataclass
class Plan:
    """A validated request: lengths, masks and latents, all decided before any sampling starts."""

    prompts: list
    negative_prompts: list | None
    duration: float
    num_samples: int  # output samples per item, round(duration * sr)
    length: int  # latents the DiT runs on (requested duration + headroom, capped by the model's canvas)
    schedule_length: int
    steps: int
    sampler: str
    cfg_scale: float
    apg_scale: float
    seed: int
    noise: mx.array
    init_latents: mx.array | None
    init_noise_level: float
    inpaint_mask: mx.array | None
    inpaint_known: mx.array | None
    cfg_interval: tuple = opts.DEFAULT_CFG_INTERVAL
    scale_phi: float = opts.DEFAULT_SCALE_PHI
    cfg_norm_threshold: float = opts.DEFAULT_CFG_NORM_THRESHOLD
    sigma_max: float = opts.DEFAULT_SIGMA_MAX
    duration_padding_sec: float = opts.DEFAULT_DURATION_PADDING_SEC
    dist_shift: dict | None = None
    normalize: str | None = None
    ceiling_dbfs: float = DEFAULT_CEILING_DBFS
    target_lufs: float = DEFAULT_TARGET_LUFS
    clamp: bool = True

    def gain_db(self, report: LevelReport) -> float:
        """The requested normalisation's gain for one item's measured levels."""
        return normalization_gain(report, self.normalize, self.ceiling_dbfs, self.target_lufs)


def _is_torch(model: SA3Model) -> bool:
    parts = [model._parts[name] for name in ("dit", "autoencoder", "text_encoder")]
    return any(type(p).__module__.startswith("mlx_sa3.torch_backend") for p in parts if p is not None)


def _ceil_to(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class StableAudio3:
    """Text-to-audio, audio-to-audio, inpainting and continuation with one loaded SA3 checkpoint."""

    def __init__(self, model: SA3Model, keep_loaded: bool = True, name: str | None = None):
        self.model = model
        self.keep_loaded = keep_loaded
        #: the backend running the networks and why (``from_pretrained`` fills in what ``"auto"`` chose)
        self.backend, self.backend_reason = "torch" if _is_torch(model) else "mlx", "given model"
        # what the files' ``model`` tag says: the name it was loaded by, else the checkpoint directory
        self.name = name or (str(model.source.root) if model.source is not None else None)

    @classmethod
    def from_pretrained(
        cls, src, dtype=None, backend: str = "mlx", loras=None, keep_loaded: bool = True, weights_dtype=None
    ) -> "StableAudio3":
        """Load from a converted directory, an original Hub-layout directory, a repo id, or ``"demo"``.

        ``loras``: LoRA files to apply in that order (``lora_index`` 0, 1, ...): bare paths (strength 1),
        ``(path, strength)`` or ``(path, strength, (sigma_lo, sigma_hi))`` (see docs/LORA.md).

        ``keep_loaded`` (default, for apps that load once and generate many times) loads the text encoder, DiT and
        SAME decoder now and keeps them. ``keep_loaded=False`` (one-shot use; the CLI) loads each network when its
        stage starts and frees it when the stage ends (text encoder after conditioning, DiT after sampling, decoder
        after decoding), so peak memory is the largest network plus one stage's activations; a later generation
        reloads them (LoRAs are re-applied only while the DiT stays loaded: use keep_loaded=True to generate many
        times with LoRAs). Either way the SAME encoder is read only when audio inputs need it. ``backend="auto"``
        picks MLX or torch (:func:`mlx_sa3.backend.choose_backend`); ``.backend`` / ``.backend_reason`` say which
        and why. ``weights_dtype`` (MLX): how the DiT's and text encoder's linear weights are held, e.g.
        ``"bfloat16"`` to halve their memory with float32 compute (:func:`mlx_sa3.load_model`).
        """
        backend, reason = resolve_backend(backend, dtype, weights_dtype)
        keep_loaded = opts.flag(keep_loaded, "keep_loaded")
        if str(src) == "demo":
            from .demo import demo_model

            model = demo_model(dtype=dtype, backend=backend, weights_dtype=weights_dtype)
        else:
            model = load_model(src, dtype=dtype, backend=backend, lazy=True, weights_dtype=weights_dtype)
            if keep_loaded:
                for name in ("dit", "text_encoder", "autoencoder"):  # load now: an app pays once, up front
                    getattr(model, name)
        if loras:
            from .lora import attach

            attach(model, loras)
        return cls._with_backend(cls(model, keep_loaded, name=str(src)), backend, reason)

    @staticmethod
    def _with_backend(pipe: "StableAudio3", backend: str, reason: str) -> "StableAudio3":
        pipe.backend, pipe.backend_reason = backend, reason
        return pipe

    def _release(self, *names: str) -> None:
        """One-shot use: free the networks a stage is done with (a long-lived pipeline keeps them)."""
        if not self.keep_loaded:
            self.model.release(*names)

    @property
    def sample_rate(self) -> int:
        return self.model.sample_rate

    @property
    def max_duration(self) -> float:
        """Longest output the checkpoint's canvas (config ``sample_size``) allows, in seconds."""
        return self.model.config.sample_size / self.sample_rate

    # -- planning ------------------------------------------------------------------------------------------------

    def plan(self, prompt=None, duration: float = 30.0, *, request: GenerationRequest | None = None, **options) -> Plan:
        """Validate a request and work out every length, mask and latent it needs (raises ValueError/AudioError).

        Takes a :class:`GenerationRequest` or its fields as keyword arguments.
        """
        request = GenerationRequest.of(request, prompt, duration, **options)
        if is_per_item(request):
            raise ValueError(
                f"plan() plans one batch; this request has per-item lists ({item_count(request)} items): plan each "
                "item alone, or give batch_size=len(prompts) for one batch of them"
            )
        return self._plan(request)

    def _plan(self, r: GenerationRequest) -> Plan:
        checked = r.validate()
        r = replace(r, batch_size=opts.check_batch_size(r.batch_size))
        duration = self._check_duration(r.duration)
        steps, sampler, cfg_scale = self._sampling_options(r)
        if not 0.0 < opts.real_number(r.init_noise_level, "init_noise_level") <= 1.0:
            raise ValueError(f"init noise level must be in (0, 1], got {r.init_noise_level}")
        prompts = self._prompts(r.prompt, r.batch_size, required=r.init_audio is None and r.inpaint_audio is None)
        negative_prompts = self._negative_prompts(r, cfg_scale)
        num_samples, length, effective = self._lengths(duration, checked["duration_padding_sec"])
        seed = resolve_seed(r.seed)  # None or negative: random; 0 .. 2**63-1 as given
        noise = self._noise(r.noise, seed, (r.batch_size, self.model.config.io_channels, length))
        init_latents = None
        if r.init_audio is not None:
            init_latents = self._encode_audio(r.init_audio, "init audio", length, r.batch_size)
        inpaint_mask, inpaint_known = self._inpainting(r, duration, length)
        return Plan(
            prompts,
            negative_prompts,
            duration,
            num_samples,
            length,
            effective,
            steps,
            sampler,
            cfg_scale,
            checked.pop("apg_scale"),
            seed,
            noise,
            init_latents,
            float(r.init_noise_level),
            inpaint_mask,
            inpaint_known,
            **checked,
        )

    def _check_duration(self, duration) -> float:
        """At least one sample, at most the canvas (messages with the real limits: :func:`audio.check_duration`)."""
        check_duration(duration, self.sample_rate, self.model.config.sample_size)
        return float(duration)

    def _sampling_options(self, r: GenerationRequest) -> tuple[int, str, float]:
        """Steps, sampler and guidance scale with their defaults, validated."""
        cfg = self.model.config
        steps = DEFAULT_STEPS if r.steps is None else opts.whole_number(r.steps, "steps")
        if steps < 1:
            raise ValueError(f"steps must be at least 1, got {steps}")
        if r.sampler is not None and not isinstance(r.sampler, str):
            raise ValueError(f"sampler must be a name ({', '.join(SAMPLERS)}) or None, got {r.sampler!r}")
        sampler = r.sampler or cfg.default_sampler
        if sampler not in SAMPLERS:
            raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
        cfg_scale = opts.validate_cfg_scale(r.cfg_scale)
        if cfg_scale != 1.0 and cfg.guidance_distilled:
            warnings.warn(
                f"cfg_scale {cfg_scale:g} on a guidance-distilled (post-trained) checkpoint: guidance is already "
                "built in and the official docs say it has no useful effect; use cfg 1 or a -base model",
                stacklevel=5,
            )
        return steps, sampler, cfg_scale

    def _negative_prompts(self, r: GenerationRequest, cfg_scale: float) -> list | None:
        if r.negative_prompt is None:
            return None
        prompts = self._prompts(r.negative_prompt, r.batch_size, required=False, what="negative prompt")
        if cfg_scale == 1.0:  # as officially: without guidance the negative branch is never evaluated
            warnings.warn("the negative prompt has no effect with cfg_scale 1", stacklevel=5)
            return None
        return prompts

    def _lengths(self, duration: float, headroom: float = HEADROOM_SECONDS) -> tuple[int, int, int]:
        """(output samples, latents the DiT runs on, latents of the requested duration).

        Official canvas: (duration + headroom) rounded up to the autoencoder's alignment and capped by sample_size;
        the DiT runs on the valid part only (exact-masking semantics), ceil(duration) latents + the headroom
        (``duration_padding_sec``, official 6 s; 0: the official MLX runtime's canvas without headroom).
        """
        cfg, sr = self.model.config, self.model.config.sample_rate
        ratio = self.model.downsampling_ratio
        align = ratio * cfg.latent_align
        canvas = min(cfg.sample_size, _ceil_to(_ceil_to(int((duration + headroom) * sr), ratio), align)) // ratio
        effective = math.ceil(int(duration * sr) / ratio)
        return round(duration * sr), min(canvas, effective + opts.headroom_latents(headroom, sr, ratio)), effective

    @staticmethod
    def _noise(noise, seed: int, shape: tuple) -> mx.array:
        """The start noise: drawn from the seed's first key, or the caller's, checked against ``shape``."""
        if noise is None:
            noise_key, _ = mx.random.split(mx.random.key(seed))
            return mx.random.normal(shape, key=noise_key)
        noise = mx.array(np.asarray(noise, dtype=np.float32)) if not isinstance(noise, mx.array) else noise
        if tuple(noise.shape) != shape:
            raise ValueError(f"noise must have shape {shape} for this request, got {tuple(noise.shape)}")
        return noise

    def _inpainting(self, r: GenerationRequest, duration: float, length: int):
        """(mask, known latents) of an inpainting / continuation request, or (None, None)."""
        if r.inpaint_audio is None:
            if r.inpaint_regions:
                raise ValueError("inpaint regions need inpaint audio (the audio to keep outside the regions)")
            return None, None
        known_audio = load_audio_input(r.inpaint_audio, "inpaint audio")
        regions = self._regions(r.inpaint_regions, known_audio.shape[1] / self.sample_rate, duration)
        known = self._encode_audio(known_audio, "inpaint audio", length, r.batch_size)
        return self._latent_mask(regions, duration, length), known

    @staticmethod
    def _prompts(prompt, batch_size: int, required: bool, what: str = "prompt") -> list:
        if prompt is not None and not isinstance(prompt, (str, list, tuple)):
            raise ValueError(f"a {what} is a string or a list of strings, got {type(prompt).__name__}")
        prompts = [prompt] * batch_size if prompt is None or isinstance(prompt, str) else list(prompt)
        wrong = [type(p).__name__ for p in prompts if p is not None and not isinstance(p, str)]
        if wrong:
            raise ValueError(f"a {what} is a string or a list of strings, got a list holding {wrong[0]}")
        if len(prompts) != batch_size:
            raise ValueError(f"got {len(prompts)} prompts for batch size {batch_size}")
        prompts = ["" if p is None else str(p) for p in prompts]
        if required and not all(p.strip() for p in prompts):
            raise ValueError("a non-empty prompt is required for text-to-audio")
        return prompts

    @staticmethod
    def _regions(regions, source_seconds: float, duration: float) -> list:
        """Validated (start, end) pairs in seconds; none given means continue the clip past its end."""
        return opts.validate_inpaint_regions(regions, source_seconds, duration)

    def _latent_mask(self, regions: list, duration: float, length: int) -> mx.array:
        """Official mask semantics: 1 = keep; the regions and everything past the duration are generated.

        The audio-rate mask is sampled at every ``ratio``-th sample (torch nearest interpolation), so latent i is kept
        iff audio sample i * ratio is kept: regenerated latents are [ceil(start / ratio), ceil(end / ratio)).
        """
        sr, ratio = self.sample_rate, self.model.downsampling_ratio
        positions = np.arange(length) * ratio
        keep = positions < int(duration * sr)
        for start, end in regions:
            keep &= ~((positions >= int(start * sr)) & (positions < int(end * sr)))
        return mx.array(keep.astype(np.float32))[None, None, :]

    def _encode_audio(self, audio, what: str, length: int, batch_size: int) -> mx.array:
        """Zero-pad or crop audio to ``length`` latents (the official PadCrop) and encode it with SAME."""
        audio = load_audio_input(audio, what)  # one validation path for every way audio comes in
        canvas = np.zeros((2, length * self.model.downsampling_ratio), dtype=np.float32)
        n = min(canvas.shape[1], audio.shape[1])
        canvas[:, :n] = audio[:, :n]
        z = self.model.autoencoder.encode(canvas[None])
        return mx.broadcast_to(z, (batch_size, *z.shape[1:]))

    # -- running -------------------------------------------------------------------------------------------------

    def stream(
        self,
        prompt=None,
        duration: float = 30.0,
        *,
        chunk_latents: int | None = None,
        callback: Callable | None = None,
        request: GenerationRequest | None = None,
        **kwargs,
    ) -> Iterator:
        """Yield :class:`StepEvent` per step, :class:`AudioEvent` per decoded piece, then one :class:`DoneEvent`.

        Takes the arguments of :meth:`generate`. ``callback(event)`` sees every event first; returning ``False``
        cancels with :class:`GenerationCancelled`. ``chunk_latents`` sets the decoder's piece size (None: the
        autoencoder's default, chosen so streaming costs a few percent over a whole decode). Audio pieces are clamped
        (unless ``clamp=False``) but carry no normalisation gain, which needs the whole signal: the
        :class:`DoneEvent`'s ``levels[i].gain_db`` is that gain (``generate`` and ``generate_to_file`` apply it).
        """
        request = GenerationRequest.of(request, prompt, duration, **kwargs)
        if is_per_item(request):
            with self._one_shot_buffers():
                yield from stream_items(self, request, chunk_latents=chunk_latents, callback=callback)
            return
        yield from self._events(self._plan(request), chunk_latents=chunk_latents, callback=callback)

    @contextlib.contextmanager
    def _one_shot_buffers(self):
        """One-shot use on the CPU: MLX's buffer cache is off while the generation runs (restored after). Freed
        buffers then go straight back to the C heap, which reuses them as well, and the cache's ~30 MB no longer
        sit on top of a stage's peak (small DiT, 30 s, bfloat16 weights: 1174 -> 1143 MiB, no slower). GPUs and
        long-lived pipelines keep the cache."""
        if self.keep_loaded or mx.default_device() != mx.cpu:
            yield
            return
        previous = mx.set_cache_limit(0)
        try:
            yield
        finally:
            mx.set_cache_limit(previous)

    def _events(self, plan: Plan, *, chunk_latents=None, callback=None, raw: bool = False) -> Iterator:
        """The events of :meth:`stream` for a plan; ``raw=True`` yields the decoder output without the clamp."""
        with self._one_shot_buffers():
            try:
                yield from self._plan_events(plan, chunk_latents=chunk_latents, callback=callback, raw=raw)
            except BaseException:  # an error, a cancel or a consumer that stopped early: no stage comes next
                self._release()
                raise

    def _plan_events(self, plan: Plan, *, chunk_latents=None, callback=None, raw: bool = False) -> Iterator:
        timings = {}
        if plan.init_latents is not None or plan.inpaint_known is not None:
            mx.eval([a for a in (plan.init_latents, plan.inpaint_known) if a is not None])
            self._release("autoencoder")  # the encoder's stage is over; the decoder comes back after sampling

        def emit(event):
            if callback is not None and callback(event) is False:
                raise GenerationCancelled("generation cancelled by the callback")
            return event

        start = time.perf_counter()
        cond = self.model.conditioning(
            plan.prompts,
            [plan.duration] * len(plan.prompts),
            inpaint_mask=plan.inpaint_mask,
            inpaint_known_latents=plan.inpaint_known,
            length=plan.length,
            negative_prompts=plan.negative_prompts,
        )
        mx.eval(cond)
        self._release("text_encoder")
        timings["text"] = time.perf_counter() - start

        start = time.perf_counter()
        _, step_key = mx.random.split(mx.random.key(plan.seed))
        latents = None
        steps = self.model.sample_iter(
            plan.noise,
            cond,
            plan.steps,
            plan.sampler,
            plan.cfg_scale,
            plan.apg_scale,
            plan.init_latents,
            plan.init_noise_level,
            key=step_key,
            schedule_length=plan.schedule_length,
            cfg_interval=plan.cfg_interval,
            scale_phi=plan.scale_phi,
            cfg_norm_threshold=plan.cfg_norm_threshold,
            sigma_max=plan.sigma_max,
            dist_shift=plan.dist_shift,
        )
        while True:
            try:
                step = next(steps)
            except StopIteration:
                break
            except NonFiniteError:  # say where it came from: the checkpoint's weights or the sampling itself
                raise NonFiniteError(self._explain_non_finite("sampling")) from None
            latents = step.x
            yield emit(StepEvent(step.index, step.total, step.t, time.perf_counter() - start))
        del cond
        latents = latents.astype(mx.float32)
        mx.eval(latents)
        self._release("dit")
        timings["sampling"] = time.perf_counter() - start

        start = time.perf_counter()
        meters = [LevelMeter(self.sample_rate, 2) for _ in range(latents.shape[0])]
        offset = 0
        # Only the first num_samples are kept: the windows stop there, never decoding the 6 s headroom.
        keep = -(-plan.num_samples // self.model.downsampling_ratio)
        for piece in self.model.autoencoder.decode_stream(latents, chunk_latents=chunk_latents, keep_latents=keep):
            take = min(piece.shape[-1], plan.num_samples - offset)
            if take <= 0:
                break
            audio = np.asarray(piece[:, :, :take], dtype=np.float32)
            if not np.isfinite(audio).all():  # checked before the clamp, which would turn inf into full scale
                raise NonFiniteError(self._explain_non_finite("decoding"))
            for meter, item in zip(meters, audio):  # the raw decoder output, before the clamp
                meter.add(item)
            yield emit(AudioEvent(audio if raw else apply_gain(audio, 0.0, plan.clamp), offset, plan.num_samples))
            offset += take
        self._release("autoencoder")
        timings["decoding"] = time.perf_counter() - start
        levels = [meter.report(plan.gain_db(meter.report())) for meter in meters]
        if plan.clamp and plan.normalize is None:  # only then does the clamp cut anything
            for i, report in enumerate(levels):
                message = clipping_warning(report)
                if message:
                    item = f"item {i + 1}: " if len(levels) > 1 else ""
                    warnings.warn(item + message, stacklevel=3)
        yield emit(DoneEvent(latents, plan.seed, timings, levels=levels))

    def _explain_non_finite(self, where: str) -> str:
        source = self.model.source.root if self.model.source is not None else None
        # the DiT's precision shapes the advice; a released DiT (decoding in one-shot use) is not reloaded for it
        dtype = getattr(self.model.dit, "dtype", None) if "dit" in self.model.loaded else None
        return explain_non_finite(self.model, where, source=source, dtype=dtype)

    def generate(
        self, prompt=None, duration: float = 30.0, *, callback=None, request: GenerationRequest | None = None, **options
    ) -> GenerationOutput:
        """Generate ``round(duration * 44100)`` samples of stereo audio per batch item (see :meth:`stream`).

        Takes a :class:`GenerationRequest` or its fields as keyword arguments.
        """
        pieces, done = [], None
        request = GenerationRequest.of(request, prompt, duration, **options)
        if is_per_item(request):  # lists of prompts/durations/seeds: out.items[i] has exactly item i's length
            _refuse_per_item_normalize(request)
            return _items_output(
                self.sample_rate, *collect_items(self.stream(request=request, callback=callback), item_count(request))
            )
        plan = self._plan(request)
        raw = plan.normalize is not None  # the gain is known at the end: keep the raw pieces until then
        for event in self._events(plan, callback=callback, raw=raw):
            if isinstance(event, AudioEvent):
                pieces.append(event.audio)
            elif isinstance(event, DoneEvent):
                done = event
        audio = np.concatenate(pieces, axis=-1)
        if raw:
            audio = np.stack([apply_gain(a, r.gain_db, plan.clamp) for a, r in zip(audio, done.levels)])
        return GenerationOutput(audio, self.sample_rate, done.latents, done.seed, done.timings, done.levels)

    def generate_to_file(
        self,
        path,
        prompt=None,
        duration: float = 30.0,
        fmt: str | None = None,
        callback=None,
        request: GenerationRequest | None = None,
        bit_depth: int | None = None,
        overwrite: bool = False,
        **kwargs,
    ) -> FileOutput:
        """Stream the generation to ``path``; with a batch, to ``stem-1.ext``, ``stem-2.ext`` ...

        The format comes from ``fmt`` or the suffix (wav, flac, ogg, opus, mp3; see :mod:`mlx_sa3.audio`), with
        ``bit_depth`` for wav/flac; every file is tagged with the prompt, seed, model and steps. With ``normalize``
        the raw float output goes to a hidden temporary file first and is copied with the gain into the target format
        at the end (memory flat).

        The targets are checked before any work (:func:`mlx_sa3.outputs.check_output_target`): each must be a
        regular file or absent, and an existing file is replaced only with ``overwrite=True``. Audio goes to short
        hidden temporary files beside the targets (permissions from the umask) that are moved into place together
        only when the whole batch is complete, so an error, a cancel, Ctrl-C or SIGTERM leaves nothing at the output
        paths. Write errors raise a one-line :class:`~mlx_sa3.outputs.OutputError` ("no space left on device" ...).
        Returns the written paths (as given, symlinks not resolved) with the seed, the seconds per stage and the
        levels. Per item, one file per item with exactly its length; ``path`` may also be a list with one path per
        output.
        """
        fmt = format_for(path[0] if isinstance(path, (list, tuple)) else path, fmt)
        stream_options = {k: kwargs.pop(k) for k in ("chunk_latents",) if k in kwargs}  # the decoder's option
        request = GenerationRequest.of(request, prompt, duration, **kwargs)
        if not request.clamp and not is_float_output(fmt, bit_depth):
            raise ValueError(f"clamp=False (--no-clamp) needs a float format (wav, 32-bit); {fmt} cannot hold it")
        names = _file_targets(path, request)
        sr = self.sample_rate
        if is_per_item(request):  # every item planned alone (mlx_sa3.items): its own seed, length and tags
            _refuse_per_item_normalize(request)
            plan, tags, normalize = None, None, False
            events = self.stream(request=request, callback=callback, **stream_options)
        else:
            plan = self._plan(request)  # before the writers: the tags carry the seed
            tags = generation_tags(_tag_prompt(plan.prompts), plan.seed, self.name, plan.steps)
            normalize = plan.normalize is not None
            events = self._events(plan, callback=callback, raw=normalize, **stream_options)
        with AtomicFiles(names, overwrite=overwrite) as files:
            writers, raws = [], []
            try:
                for temp, name in zip(files.temps, names):
                    if normalize:  # the raw float output first; the target format once the gain is known
                        raws.append(_temp_beside(Path(temp)))
                        writers.append(_written(name, lambda t=raws[-1]: open_writer(t, 2, sr, "wav")))
                    else:
                        opener = lambda t=temp: open_writer(t, 2, sr, fmt, bit_depth=bit_depth, tags=tags)  # noqa: E731
                        writers.append(_written(name, opener))
                for event in events:
                    if isinstance(event, AudioEvent) and event.item is not None:
                        _written(names[event.item], lambda e=event: writers[e.item].write(e.audio[0].T))
                    elif isinstance(event, AudioEvent):
                        for writer, audio, name in zip(writers, event.audio, names):
                            _written(name, lambda w=writer, a=audio: w.write(a.T))
                    elif isinstance(event, DoneEvent):
                        done = event
                for writer, name in zip(writers, names):
                    _written(name, writer.close)
                for raw_file, temp, name, report in zip(raws, files.temps, names, done.levels):
                    writer = _written(name, lambda t=temp: open_writer(t, 2, sr, fmt, bit_depth=bit_depth, tags=tags))
                    writers.append(writer)
                    _written(name, lambda w=writer, r=raw_file, g=report.gain_db: copy_with_gain(r, w, g, plan.clamp))
                    _written(name, writer.close)
            finally:
                for writer in writers:
                    if not writer.closed:
                        with contextlib.suppress(Exception):  # the temporary file is discarded anyway
                            writer.close()
                for raw_file in raws:
                    raw_file.unlink(missing_ok=True)
            files.commit()
        return FileOutput(
            names, output_sample_rate(fmt, sr), done.seed, done.timings, levels=done.levels, seeds=done.seeds
        )


def _written(name, write: Callable):
    """Run one write to output ``name``; an OS or libsndfile error becomes a one-line OutputError naming it."""
    try:
        return write()
    except Exception as err:
        if not is_write_error(err):
            raise
        raise OutputError(os_error_message(err, name)) from None


def _temp_beside(temp: Path) -> Path:
    fd, tmp = tempfile.mkstemp(prefix=f"{temp.name}.", suffix=".raw.wav", dir=temp.parent)
    os.close(fd)
    return Path(tmp)


def _tag_prompt(prompts: list) -> str | None:
    """The prompt tag: the batch's prompt, or all of them when they differ."""
    unique = list(dict.fromkeys(prompts))
    return unique[0] if len(unique) == 1 else " | ".join(unique)


# -- per-item requests (mlx_sa3.items): the hooks above call only these ---------------------------------------------


def _items_output(sample_rate: int, items: list, done: DoneEvent) -> GenerationOutput:
    return GenerationOutput(
        pad_items(items), sample_rate, done.latents, done.seed, done.timings, items=items, seeds=done.seeds
    )


def _file_targets(path, request: GenerationRequest) -> list:
    """One target per output: the given list, or ``path`` / ``stem-1.ext``, ``stem-2.ext`` ... as for a batch."""
    count = item_count(request) if is_per_item(request) else int(request.batch_size)
    if isinstance(path, (list, tuple)):
        if len(path) != count:
            raise ValueError(f"got {len(path)} output paths for {count} outputs")
        return [Path(p) for p in path]
    return batch_targets(path, count)


def _refuse_per_item_normalize(request: GenerationRequest) -> None:
    if request.normalize is not None:
        raise ValueError(
            "normalize works on one request's batch; per-item lists (several prompts/durations/seeds) "
            "are not normalised yet: generate them one by one"
        )


__all__ = [
    "StableAudio3",
    "GenerationOutput",
    "GenerationRequest",
    "FileOutput",
    "GenerationCancelled",
    "StepEvent",
    "AudioEvent",
    "DoneEvent",
    "AudioError",
]
