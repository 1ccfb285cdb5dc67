"""One checkpoint's configuration, parsed once, and the MLX loaders of its components.

:class:`CheckpointConfig` holds every config a checkpoint's ``model_config.json`` defines (pipeline settings, DiT,
SAME, prompt/duration conditioners); :func:`checkpoint_config` builds it once per opened ``Source``. The loaders
here are the MLX backend's; :mod:`mlx_sa3.backend` chooses between them and the torch backend's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten

from .loading import (
    CheckpointError,
    Source,
    component_weights,
    load_safetensors,
    open_source,
    parse_dtype,
    parsed_config,
    sanitize_checked,
)
from .models import t5gemma
from .models.diffusion import DEFAULT_OBJECTIVE, RF_OBJECTIVES
from .models.dit import DiT, DiTConfig
from .models.dit import sanitize as sanitize_dit
from .models.same import SAMEAutoencoder, SAMEConfig
from .models.same import sanitize as sanitize_same
from .models.t5gemma import T5GemmaConfig, T5GemmaEncoder, T5GemmaTokenizer, TextEncoder
from .options import at_least
from .quantize import KEEP as QUANTIZE_KEEP
from .quantize import QuantizationConfig, apply_quantization, dequantize_weights
from .storage import cast_to, load_cast, narrow_linears, storage_dtype, stored_dtypes

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
            sample_rate=at_least(config.get("sample_rate", 44100), 1, "sample_rate"),
            sample_size=at_least(config.get("sample_size", 5292032), 1, "sample_size"),
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


_parsed = parsed_config  # the converter's name for it


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


def model_config_of(source: Source) -> SA3Config:
    """The SA3 part of ``source``'s config alone (canvas, sample rate), one line naming it when malformed."""
    return _parsed(f"{source.root} model", lambda: SA3Config.from_dict(source.model_config))


def checkpoint_config(source: Source) -> CheckpointConfig:
    """The parsed config of ``source``, built once and kept with it."""
    if "config" not in source.cache:  # a config missing its parts is one line naming the checkpoint, not a KeyError
        build = lambda: CheckpointConfig.from_dict(source.model_config)  # noqa: E731
        source.cache["config"] = _parsed(f"{source.root} model", build)
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


def dit_quantization(source: Source) -> QuantizationConfig | None:
    """The quantization record of a converted checkpoint (``convert.py --quantize``), or None."""
    record = source.meta.get("quantization") if source.converted else None
    return None if record is None else _parsed("quantization", lambda: QuantizationConfig.from_dict(record))


def dit_weights(source: Source, dequantize: bool = True, dtype=mx.float32, refs: bool = False) -> tuple[DiT, dict]:
    """A fresh DiT module and its strictly checked tensors.

    A quantized checkpoint is checked against the quantized structure (``apply_quantization`` first); with
    ``dequantize`` the recorded layers come back as plain ``dtype`` weights for a plain DiT, otherwise the module keeps
    ``nn.QuantizedLinear`` layers for the packed tensors. With ``refs`` the tensors are
    :class:`~mlx_sa3.loading.TensorRef` (headers only), except where MLX must dequantize them.
    """
    config = checkpoint_config(source).dit
    model, quant = DiT(config), dit_quantization(source)
    if quant is not None:
        try:
            apply_quantization(model, quant)
        except ValueError as err:
            raise CheckpointError(f"{source.root}: {err}") from None
    refs = refs and (quant is None or not dequantize)
    weights = component_weights(source, "dit", sanitize_dit, model, "DiT checkpoint", refs=refs)
    if quant is not None and dequantize:
        model, weights = DiT(config), dequantize_weights(weights, quant, dtype)
    return model, weights


def keeps_quantized() -> bool:
    """Quantized layers stay quantized on GPUs (Metal / CUDA: fast quantized matmuls, a fraction of the memory);
    on the CPU MLX's quantized matmul runs at a few GFLOP/s, so there they are dequantized once at load time."""
    return mx.default_device() != mx.cpu


def load_dit(source, dtype=mx.float32, keep_quantized: bool | None = None, weights_dtype=None) -> DiT:
    """DiT from a checkpoint (directory, Hub repo id or :class:`~mlx_sa3.loading.Source`), computing in ``dtype``.

    A quantized checkpoint keeps its ``nn.QuantizedLinear`` layers where ``keep_quantized`` (default
    :func:`keeps_quantized`: on a GPU) and is dequantized to ``dtype`` otherwise (the CPU). ``weights_dtype``
    (default: ``dtype``) is how the linear weights are held: ``"bfloat16"`` with float32 compute rounds them to
    bfloat16 as they are read and widens them per layer at call time (:mod:`mlx_sa3.storage`; ``project_in``, which
    carries the compute dtype, stays). Tensors are cast as they are read, so the whole float32 DiT is never held.
    """
    source = _open(source)
    dtype = parse_dtype(dtype) or mx.float32
    storage = storage_dtype(dtype, weights_dtype)
    keep = keeps_quantized() if keep_quantized is None else keep_quantized
    model, weights = dit_weights(source, dequantize=not keep, dtype=dtype)
    model.set_dtype(dtype)  # floating parameters only: packed quantized weights stay uint32
    if storage != dtype:
        narrow_linears(model, storage, keep=QUANTIZE_KEEP)
    load_cast(model, weights, cast_to(stored_dtypes(model)))
    return model


#: Parameter prefixes of SAME's encoder half (audio -> latents); the rest decodes.
ENCODER_HALF = ("encoder.", "to_latent.")


def _autoencoder_weights(source: Source, model: SAMEAutoencoder) -> dict:
    return component_weights(source, "autoencoder", sanitize_same, model, f"{source.root} autoencoder")


def _load_half(model: SAMEAutoencoder, weights: dict, encoder_half: bool, dtype) -> None:
    part = [(k, v.astype(mx.float32)) for k, v in weights.items() if k.startswith(ENCODER_HALF) == encoder_half]
    model.load_weights(part, strict=False)  # the whole set was strictly checked by _autoencoder_weights
    if encoder_half and dtype is not None:
        model.encoder.set_dtype(dtype)
        model.to_latent.set_dtype(dtype)
    mx.eval([v for k, v in tree_flatten(model.parameters()) if k.startswith(ENCODER_HALF) == encoder_half])


class DecoderFirstSAME(SAMEAutoencoder):
    """A SAME autoencoder loaded without its encoder half, which is read from the checkpoint on the first
    :meth:`encode`: plain text-to-audio never holds it (a lifetime choice; the arithmetic is SAMEAutoencoder's)."""

    def __init__(self, config: SAMEConfig, source: Source, dtype=None):
        super().__init__(config)
        self._source, self._encoder_dtype, self.encoder_loaded = source, dtype, False

    def encode(self, audio) -> mx.array:
        if not self.encoder_loaded:
            _load_half(self, _autoencoder_weights(self._source, self), True, self._encoder_dtype)
            self.encoder_loaded = True
        return super().encode(audio)


def load_mlx_autoencoder(source, dtype=None, encoder: bool = True) -> SAMEAutoencoder:
    """The MLX SAME autoencoder (see :func:`mlx_sa3.backend.load_autoencoder`); without ``encoder`` its encoder
    half is loaded on first use (:class:`DecoderFirstSAME`)."""
    source = _open(source)
    config = checkpoint_config(source).same
    dtype = parse_dtype(dtype)
    model = SAMEAutoencoder(config) if encoder else DecoderFirstSAME(config, source, dtype)
    weights = _autoencoder_weights(source, model)
    _load_half(model, weights, False, dtype)
    if encoder:
        _load_half(model, weights, True, dtype)
    model.eval()
    return model


EMBEDDING = "embed_tokens.weight"
_NUMPY_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bf16: the upper half of a float32


def _memmap_tensor(path: Path, name: str) -> np.ndarray | None:
    """A read-only memory map of one tensor of a safetensors file, or None (absent, other dtype, not a file)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            info = json.loads(f.read(size)).get(name)
    except (OSError, ValueError):
        return None
    if not info or info.get("dtype") not in _NUMPY_DTYPES:
        return None
    start, _ = info["data_offsets"]
    dtype = _NUMPY_DTYPES[info["dtype"]]
    return np.memmap(path, dtype=dtype, mode="r", offset=8 + size + start, shape=tuple(info["shape"]))


class MappedEmbedding(nn.Module):
    """Token embeddings gathered from the memory-mapped checkpoint file at each call.

    The T5Gemma table (256000 x 768: 786 MB in float32) is never resident: a prompt reads only its own rows from
    the page cache. The rows are exactly the stored ones, cast to ``dtype`` as a resident table would be.
    """

    def __init__(self, table: np.ndarray, dtype: mx.Dtype):
        super().__init__()
        self._table, self._dtype = table, dtype  # plain attributes: not MLX parameters

    def __call__(self, ids) -> mx.array:
        return mx.array(gather_rows(self._table, ids)).astype(self._dtype)


def gather_rows(table: np.ndarray, ids) -> np.ndarray:
    """The rows ``ids`` (any shape) of a memory-mapped table, as stored (bfloat16 bits widened exactly to float32):
    what both backends' mapped token embeddings read."""
    ids = np.asarray(ids)
    rows = np.asarray(table[ids.reshape(-1)])
    if rows.dtype == np.uint16:  # bfloat16 bits -> float32 (exact)
        rows = (rows.astype(np.uint32) << 16).view(np.float32)
    return rows.reshape(*ids.shape, -1)


def load_text_encoder(
    directory,
    max_length: int,
    dtype=mx.float32,
    weights: dict | None = None,
    map_embedding: bool = True,
    embedding_file: Path | None = None,
    weights_dtype=None,
) -> TextEncoder:
    """Load the T5Gemma encoder and tokenizer from ``directory`` (config.json + tokenizer files).

    Without ``weights`` the directory's transformers ``model.safetensors`` (full encoder-decoder) is read and
    sanitized. ``weights`` are already-sanitized tensors (e.g. a converted checkpoint's text_encoder component,
    stored in ``embedding_file``). With ``map_embedding`` the token embedding stays in its file
    (:class:`MappedEmbedding`) when the file is known and mappable.
    ``weights_dtype`` (default: ``dtype``): how the linear weights are held (see :func:`load_dit`).
    """
    directory = Path(directory)
    dtype = parse_dtype(dtype) or mx.float32
    storage = storage_dtype(dtype, weights_dtype)
    table = None
    if weights is None:
        weights = t5gemma.sanitize(load_safetensors(directory / TEXT_ENCODER_WEIGHTS))
        if map_embedding:
            table = _memmap_tensor(directory / TEXT_ENCODER_WEIGHTS, t5gemma.ENCODER_PREFIX + EMBEDDING)
    elif map_embedding and embedding_file is not None:
        table = _memmap_tensor(Path(embedding_file), EMBEDDING)
    model = T5GemmaEncoder(T5GemmaConfig.from_dir(directory))
    if table is None and storage == dtype:
        t5gemma.load_weights(model, weights, dtype)
    else:
        sanitize_checked(weights, None, model, "T5Gemma encoder checkpoint")
        weights = dict(weights)  # load_cast empties it: never the caller's dict
        if table is not None:
            model.embed_tokens = MappedEmbedding(table, dtype)
            weights.pop(EMBEDDING)
        model.set_dtype(dtype)
        if storage != dtype:
            narrow_linears(model, storage)
        load_cast(model, weights, cast_to(stored_dtypes(model)))
    return TextEncoder(model, T5GemmaTokenizer.from_dir(directory, max_length))


def load_mlx_text_encoder(source: Source, max_length: int, dtype=mx.float32, weights_dtype=None) -> TextEncoder:
    converted = source.converted
    return load_text_encoder(
        source.text_encoder_dir(),
        max_length,
        dtype=dtype,
        weights_dtype=weights_dtype,
        weights=source.component("text_encoder") if converted else None,
        embedding_file=source.root / source.meta["components"]["text_encoder"] if converted else None,
    )


def text_encoder_weights(source: Source, module, refs: bool = False) -> dict:
    """The T5Gemma encoder tensors of ``source`` in mlx_sa3 naming, strictly checked against ``module``."""
    return component_weights(source, "text_encoder", t5gemma.sanitize, module, "T5Gemma encoder checkpoint", refs=refs)
