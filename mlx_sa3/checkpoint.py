"""One checkpoint's configuration, parsed once, and the MLX loaders of its components.

:class:`CheckpointConfig` holds every config a checkpoint's ``model_config.json`` defines (pipeline settings, DiT,
SAME, prompt/duration conditioners); :func:`checkpoint_config` builds it once per opened ``Source``. The loaders
here are the MLX backend's; :mod:`mlx_sa3.backend` chooses between them and the torch backend's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx

from .loading import CheckpointError, Source, component_weights, load_safetensors, open_source, parse_dtype
from .models import t5gemma
from .models.diffusion import DEFAULT_OBJECTIVE, RF_OBJECTIVES
from .models.dit import DiT, DiTConfig
from .models.dit import sanitize as sanitize_dit
from .models.same import SAMEAutoencoder, SAMEConfig
from .models.same import sanitize as sanitize_same
from .models.t5gemma import T5GemmaConfig, T5GemmaEncoder, T5GemmaTokenizer, TextEncoder

TEXT_ENCODER_WEIGHTS = "model.safetensors"


def _find_conditioner(configs: list, cid: str) -> dict:
    for entry in configs:
        if entry.get("id") == cid:
            return entry
    return {}


@dataclass
class SA3Config:
    """What the pipeline needs from a full SA3 ``model_config.json`` (unknown keys ignored)."""

    sample_rate: int = 44100
    sample_size: int = 5292032
    io_channels: int = 256
    diffusion_objective: str = DEFAULT_OBJECTIVE
    cross_attention_cond_ids: tuple = ("prompt", "seconds_total")
    global_cond_ids: tuple = ("seconds_total",)
    prompt_max_length: int = 256
    seconds_min: float = 0.0
    seconds_max: float = 384.0
    cond_dim: int = 768
    sampling_shift: dict | None = None
    # The official canvas is aligned to chunk_size // stride latents, with chunk_size defaulting to 32 even for the
    # sliding-window SAME-L (model.py _adapt_sample_size).
    latent_align: int = 2
    model_config: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, config: dict) -> "SA3Config":
        model = config.get("model", {})
        diffusion = model.get("diffusion", {})
        conditioning = model.get("conditioning", {})
        prompt = _find_conditioner(conditioning.get("configs", []), "prompt").get("config", {})
        seconds = _find_conditioner(conditioning.get("configs", []), "seconds_total").get("config", {})
        encoder = model.get("pretransform", {}).get("config", {}).get("encoder", {}).get("config", {})
        strides = encoder.get("strides", [16])
        return cls(
            sample_rate=config.get("sample_rate", 44100),
            sample_size=config.get("sample_size", 5292032),
            io_channels=model.get("io_channels", 256),
            diffusion_objective=diffusion.get("diffusion_objective", DEFAULT_OBJECTIVE),
            cross_attention_cond_ids=tuple(diffusion.get("cross_attention_cond_ids", ("prompt", "seconds_total"))),
            global_cond_ids=tuple(diffusion.get("global_cond_ids", ("seconds_total",))),
            prompt_max_length=prompt.get("max_length", 256),
            seconds_min=seconds.get("min_val", 0.0),
            seconds_max=seconds.get("max_val", 384.0),
            cond_dim=conditioning.get("cond_dim", 768),
            sampling_shift=diffusion.get("sampling_distribution_shift_options"),
            latent_align=max(1, encoder.get("chunk_size", 32) // strides[0]),
            model_config=config,
        )

    @property
    def default_sampler(self) -> str:
        """The official default: ping-pong for the post-trained (distilled) objective, Euler otherwise."""
        return "pingpong" if self.diffusion_objective == "rf_denoiser" else "euler"

    @property
    def guidance_distilled(self) -> bool:
        return self.diffusion_objective == "rf_denoiser"


def _parsed(what: str, build):
    """Run a config parser, turning the errors a malformed config produces into one clear CheckpointError."""
    try:
        return build()
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise CheckpointError(f"cannot read the {what} configuration: {type(err).__name__}: {err}") from None


@dataclass
class CheckpointConfig:
    """Every config of one checkpoint: ``same`` always, ``sa3`` and ``dit`` for a full SA3 model (None for SAME)."""

    model_config: dict = field(repr=False)
    same: SAMEConfig
    sa3: SA3Config | None = None
    dit: DiTConfig | None = None

    @classmethod
    def from_dict(cls, model_config: dict) -> "CheckpointConfig":
        """Build from a Hub ``model_config.json`` (unknown keys are ignored by every part)."""
        same = SAMEConfig.from_dict(model_config["model"], sample_rate=model_config.get("sample_rate"))
        if model_config.get("model_type") == "autoencoder":
            return cls(model_config, same)
        return cls(model_config, same, SA3Config.from_dict(model_config), DiTConfig.from_model_config(model_config))

    def check_sampleable(self) -> None:
        """Refuse an objective the samplers cannot run: they denoise with x0 = x - t v, rectified flow only."""
        objective = self.sa3.diffusion_objective
        if objective not in RF_OBJECTIVES:
            raise CheckpointError(
                f"diffusion_objective {objective!r} is not supported: mlx_sa3's samplers are "
                f"rectified-flow only ({', '.join(RF_OBJECTIVES)})"
            )


def checkpoint_config(source: Source) -> CheckpointConfig:
    """The parsed config of ``source``, built once and kept with it."""
    if "config" not in source.cache:
        source.cache["config"] = CheckpointConfig.from_dict(source.model_config)
    return source.cache["config"]


#: The T5Gemma-b encoder section of google/t5gemma-b-b-ul2's config.json (SA3's text encoder).
FULL_SIZE_TEXT_CONFIG = {
    "encoder": {
        "hidden_size": 768,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_key_value_heads": 12,
        "head_dim": 64,
        "intermediate_size": 2048,
        "vocab_size": 256000,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 64,
        "attn_logit_softcapping": 50.0,
        "hidden_activation": "gelu_pytorch_tanh",
    }
}


def full_size_configs(variant: str) -> tuple[SA3Config, DiTConfig, SAMEConfig, T5GemmaConfig]:
    """Configs of a real-size checkpoint ("small" or "medium"), e.g. for random-weight benchmarks."""
    if variant == "small":
        dit, same, max_seconds = DiTConfig.small(), SAMEConfig.preset("same-s"), 120
    elif variant == "medium":
        dit, same, max_seconds = DiTConfig.medium(), SAMEConfig.preset("same-l"), 380
    else:
        raise ValueError(f"unknown variant {variant!r}; choose small or medium")
    latents = -(-int((max_seconds + 6.0) * 44100) // 4096)
    return SA3Config(sample_size=latents * 4096), dit, same, T5GemmaConfig.from_dict(FULL_SIZE_TEXT_CONFIG)


def _open(src) -> Source:
    return src if isinstance(src, Source) else open_source(src)


# -- MLX loaders ------------------------------------------------------------------------------------------------


def load_dit(source, dtype=mx.float32) -> DiT:
    """DiT from a checkpoint (directory, Hub repo id or :class:`~mlx_sa3.loading.Source`), weights in ``dtype``."""
    source = _open(source)
    dtype = parse_dtype(dtype) or mx.float32
    model = DiT(checkpoint_config(source).dit)
    weights = component_weights(source, "dit", sanitize_dit, model, "DiT checkpoint")
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()])
    mx.eval(model.parameters())
    return model


def load_mlx_autoencoder(source, dtype=None) -> SAMEAutoencoder:
    """The MLX SAME autoencoder (see :func:`mlx_sa3.backend.load_autoencoder`)."""
    source = _open(source)
    model = SAMEAutoencoder(checkpoint_config(source).same)
    weights = component_weights(source, "autoencoder", sanitize_same, model, f"{source.root} autoencoder")
    model.load_weights([(k, v.astype(mx.float32)) for k, v in weights.items()])
    dtype = parse_dtype(dtype)
    if dtype is not None:
        model.encoder.set_dtype(dtype)
        model.to_latent.set_dtype(dtype)
    model.eval()
    mx.eval(model.parameters())
    return model


def load_text_encoder(directory, max_length: int, dtype=mx.float32, weights: dict | None = None) -> TextEncoder:
    """Load the T5Gemma encoder and tokenizer from ``directory`` (config.json + tokenizer files).

    Without ``weights`` the directory's transformers ``model.safetensors`` (full encoder-decoder) is read and
    sanitized. ``weights`` are already-sanitized tensors (e.g. a converted checkpoint's text_encoder component).
    """
    directory = Path(directory)
    dtype = parse_dtype(dtype) or mx.float32
    if weights is None:
        weights = t5gemma.sanitize(load_safetensors(directory / TEXT_ENCODER_WEIGHTS))
    model = T5GemmaEncoder(T5GemmaConfig.from_dir(directory))
    t5gemma.load_weights(model, weights, dtype)
    return TextEncoder(model, T5GemmaTokenizer.from_dir(directory, max_length))


def load_mlx_text_encoder(source: Source, max_length: int, dtype=mx.float32) -> TextEncoder:
    return load_text_encoder(
        source.text_encoder_dir(),
        max_length,
        dtype=dtype,
        weights=source.component("text_encoder") if source.converted else None,
    )


def text_encoder_weights(source: Source, module) -> dict:
    """The T5Gemma encoder tensors of ``source`` in mlx_sa3 naming, strictly checked against ``module``."""
    return component_weights(source, "text_encoder", t5gemma.sanitize, module, "T5Gemma encoder checkpoint")
