"""The diffusers import: a diffusers Stable Audio 3 pipeline folder renamed back to the original Hub names.

The weights then go through the same sanitizers and strict checks as the original layout (:mod:`.core`), so both
layouts convert to identical files. The official model_config.json is rebuilt from the component configs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from ..checkpoint import _parsed as _parse
from ..loading import CheckpointError, read_json
from ..models import keymaps
from ..models.conditioners import Conditioners
from ..models.tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE

# --------------------------------------------------------------------------------------------- diffusers layout
#
# A diffusers StableAudio3Pipeline folder holds the same weights as the original repo under other names. They are
# renamed back to the original Hub names here and then go through the same sanitizers and strict checks, so both
# layouts convert to identical files. The official model_config.json is rebuilt from the component configs.

DIFFUSERS_PIPELINES = ("StableAudio3Pipeline", "StableAudio3AudioToAudioPipeline", "StableAudio3InpaintPipeline")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_MODELS = {
    "transformer": "StableAudio3DiTModel",
    "vae": "AutoencoderSAME",
    "duration_embedder": "StableAudio3DurationEmbedder",
}
# diffusers records no canvas limit: take the length the official generate() uses when none is given (120 s).
DEFAULT_SAMPLE_SIZE = 5292032
MAX_PROMPT_TOKENS = 256  # the diffusers pipeline caps the tokenizer's model_max_length here
_SECONDS_FREQS = (0.5, 10000.0)  # the official NumberConditioner's fixed expo Fourier range

_DIT_FROM_DIFFUSERS = keymaps.DIT_FROM_DIFFUSERS
_SAME_FROM_DIFFUSERS = keymaps.SAME_FROM_DIFFUSERS


@dataclass
class DiffusersCheckpoint:
    """A diffusers Stable Audio 3 pipeline folder.

    ``model_config`` is the official model_config.json rebuilt from the component configs; ``notes`` say what
    diffusers does not record (and was therefore assumed) and where its semantics differ from the official ones.
    """

    root: Path
    configs: dict[str, dict]
    model_config: dict
    notes: list[str]
    layout: str = "diffusers"


def is_diffusers(root: Path) -> bool:
    return (root / "model_index.json").is_file() and not (root / "model_config.json").exists()


def open_diffusers(root: Path) -> DiffusersCheckpoint:
    index = read_json(root / "model_index.json")
    if index.get("_class_name") not in DIFFUSERS_PIPELINES:
        raise CheckpointError(
            f"{root}/model_index.json: {index.get('_class_name')!r} is not a Stable Audio 3 "
            f"pipeline (expected one of {', '.join(DIFFUSERS_PIPELINES)})"
        )
    configs = {}
    for folder, class_name in _DIFFUSERS_MODELS.items():
        configs[folder] = read_json(root / folder / "config.json")
        if configs[folder].get("_class_name") != class_name:
            raise CheckpointError(
                f"{root / folder}/config.json: expected a {class_name}, found {configs[folder].get('_class_name')!r}"
            )
    configs["scheduler"] = read_json(root / "scheduler" / "scheduler_config.json")
    configs["tokenizer"] = tokenizer_config_with_flags(root / "tokenizer")
    if not (root / "tokenizer" / TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{root}/tokenizer has no sentencepiece {TOKENIZER_FILE} (transformers 5 saves only "
            f"tokenizer.json); copy the {TOKENIZER_FILE} of google/t5gemma-b-b-ul2 into it"
        )
    model_config, notes = _parse("diffusers", lambda: official_model_config(configs))
    return DiffusersCheckpoint(root, configs, model_config, notes)


def tokenizer_config_with_flags(directory: Path) -> dict:
    """tokenizer_config.json with explicit ``add_bos_token`` / ``add_eos_token``.

    transformers 5 no longer writes these flags; the special tokens it adds live in tokenizer.json's post-processor
    template instead. Without the flags, mlx_sa3's tokenizer would fall back to GemmaTokenizer's defaults (BOS on).
    """
    config = read_json(directory / TOKENIZER_CONFIG_FILE)
    fast_path = directory / "tokenizer.json"
    if {"add_bos_token", "add_eos_token"} <= set(config) or not fast_path.is_file():
        return config
    processor = read_json(fast_path).get("post_processor") or {}
    if processor.get("type") != "TemplateProcessing":
        raise CheckpointError(
            f"{fast_path}: cannot tell whether BOS/EOS are added (post_processor "
            f"{processor.get('type')!r}); add add_bos_token / add_eos_token to tokenizer_config.json"
        )
    single = [item.get("SpecialToken", {}).get("id") for item in processor.get("single", [])]
    return {
        **config,
        "add_bos_token": bool(single) and single[0] == config.get("bos_token", "<bos>"),
        "add_eos_token": bool(single) and single[-1] == config.get("eos_token", "<eos>"),
    }


def official_model_config(configs: dict[str, dict]) -> tuple[dict, list[str]]:
    """The official model_config.json equivalent to the diffusers component ``configs``, and the notes on it.

    The converted model always runs the official semantics, whatever diffusers' forward pass does differently.
    """
    tr, vae, seconds = configs["transformer"], configs["vae"], configs["duration_embedder"]
    if (seconds["min_freq"], seconds["max_freq"]) != _SECONDS_FREQS:
        raise CheckpointError(
            f"duration_embedder Fourier range ({seconds['min_freq']}, {seconds['max_freq']}) is not "
            f"the official {_SECONDS_FREQS}"
        )
    if not seconds["output_dim"] == tr["cond_token_dim"] == tr["global_cond_dim"]:
        raise CheckpointError(
            f"duration_embedder output_dim {seconds['output_dim']} must equal the transformer's "
            f"cond_token_dim {tr['cond_token_dim']} and global_cond_dim {tr['global_cond_dim']}"
        )
    if tr["io_channels"] != vae["latent_dim"]:
        raise CheckpointError(f"transformer io_channels {tr['io_channels']} != vae latent_dim {vae['latent_dim']}")
    if any(vae["encoder_sinusoidal_blocks"]):
        raise CheckpointError("vae encoder_sinusoidal_blocks: the official SAME encoder has no sin-gated blocks")
    stochastic = bool(configs["scheduler"].get("stochastic_sampling", False))
    objective = "rf_denoiser" if stochastic else "rectified_flow"
    max_length = min(int(configs["tokenizer"].get("model_max_length", MAX_PROMPT_TOKENS)), MAX_PROMPT_TOKENS)
    head_dim = tr["embed_dim"] // tr["num_heads"]
    notes = [
        f"diffusion_objective {objective!r} from scheduler stochastic_sampling={stochastic}",
        f"sample_size {DEFAULT_SAMPLE_SIZE} (the official generate() default; diffusers records no canvas limit)",
        f"prompt max_length {max_length} = min(tokenizer model_max_length, {MAX_PROMPT_TOKENS}), as the diffusers "
        "pipeline pads",
        "runs the official DiT: block RMSNorm eps 1e-5 (diffusers: 1e-6), RoPE over "
        f"{max(head_dim // 2, 32)} head channels (diffusers: {head_dim // 2})",
    ]
    patched = vae["audio_channels"] * vae["patch_size"]
    window = int(vae["sliding_window"])
    resampler = {
        "channels": vae["encoder_channels"],
        "c_mults": list(vae["encoder_c_mults"]),
        "strides": list(vae["encoder_strides"]),
        "transformer_depths": list(vae["encoder_transformer_depths"]),
        "latent_dim": vae["latent_dim"],
        "dim_heads": vae["dim_heads"],
        "differential": bool(vae["use_differential_attention"]),
        "variable_stride": True,  # diffusers always shares one learned token across the stride
        "sliding_window": [window, window],
        "ff_mult": vae["ff_mult"],
    }
    pretransform = {
        "latent_dim": vae["latent_dim"],
        "downsampling_ratio": vae["patch_size"] * math.prod(vae["encoder_strides"]),
        "io_channels": vae["audio_channels"],
        "encoder": {"type": "same", "config": {**resampler, "in_channels": patched}},
        "decoder": {
            "type": "same",
            "config": {
                **resampler,
                "out_channels": patched,
                "sinusoidal_blocks": list(vae["decoder_sinusoidal_blocks"]),
            },
        },
        "bottleneck": {"type": "softnorm", "config": {"dim": vae["latent_dim"], "auto_scale": True}},
        "pretransform": {
            "type": "patched",
            "config": {"channels": vae["audio_channels"], "patch_size": vae["patch_size"]},
        },
    }
    diffusion_config = {
        **{
            k: tr[k]
            for k in (
                "io_channels",
                "patch_size",
                "embed_dim",
                "depth",
                "num_heads",
                "cond_token_dim",
                "global_cond_dim",
                "local_add_cond_dim",
                "timestep_features_dim",
                "num_memory_tokens",
            )
        },
        "transformer_type": "continuous_transformer",
        "global_cond_type": "adaLN",
        "timestep_features_type": "expo",
        "attn_kwargs": {"qk_norm": "rms", "differential": bool(tr["use_differential_attention"])},
        "norm_type": "rms_norm",
        "norm_kwargs": {"force_fp32": True},
        "ff_kwargs": {"mult": tr["ff_mult"]},
    }
    model_config = {
        "model_type": "diffusion_cond_inpaint",  # every StableAudio3DiTModel block has the inpaint projection
        "sample_rate": vae["sampling_rate"],
        "sample_size": DEFAULT_SAMPLE_SIZE,
        "audio_channels": vae["audio_channels"],
        "model": {
            "io_channels": tr["io_channels"],
            "pretransform": {"type": "autoencoder", "iterate_batch": False, "config": pretransform},
            "conditioning": {
                "cond_dim": seconds["output_dim"],
                "configs": [
                    {
                        "id": "prompt",
                        "type": "t5gemma",
                        "config": {"max_length": max_length, "padding_mode": "learned"},
                    },
                    {
                        "id": "seconds_total",
                        "type": "number",
                        "config": {
                            "min_val": seconds["min_val"],
                            "max_val": seconds["max_val"],
                            "fourier_features_type": "expo",
                        },
                    },
                ],
            },
            "diffusion": {
                "type": "dit",
                "diffusion_objective": objective,
                "cross_attention_cond_ids": ["prompt", "seconds_total"],
                "global_cond_ids": ["seconds_total"],
                "local_add_cond_ids": ["inpaint_mask", "inpaint_masked_input"],
                "config": diffusion_config,
            },
        },
    }
    return model_config, notes


_rename = keymaps.rename


def _official_qkv_order(weight: mx.array) -> mx.array:
    """diffusers fuses differential self-attention rows as [q1|q2|k1|k2|v]; the official order is [q|k|v|q2|k2]."""
    if weight.shape[0] % 5:
        return weight  # a wrong shape: the strict check reports it
    return mx.take(weight, mx.array(keymaps.diffusers_to_official_qkv(weight.shape[0])), axis=0)


def dit_from_diffusers(weights: dict[str, mx.array], differential: bool):
    """StableAudio3DiTModel tensors -> (official DiT tensors, official conditioner tensors, official -> diffusers
    name). The prompt padding embedding, which diffusers keeps in the transformer, belongs to the conditioner."""
    out, conditioner, origin = {}, {}, {}
    for key, value in weights.items():
        if key == "prompt_padding_embedding":
            conditioner[Conditioners.PADDING] = value
            continue
        name = _rename(key, _DIT_FROM_DIFFUSERS)
        if differential and name.endswith(".self_attn.to_qkv.weight"):
            value = _official_qkv_order(value)
        out[name], origin[name] = value, key
    return out, conditioner, origin


def same_from_diffusers(weights: dict[str, mx.array], differential: bool):
    """AutoencoderSAME tensors -> (official SAME tensors, official -> diffusers name). Weight norm is kept as
    ``weight_g`` / ``weight_v`` by diffusers too; the SAME sanitizer folds it."""
    out, origin = {}, {}
    for key, value in weights.items():
        if key.endswith(".mapping.weight_v") and value.shape[-1] != 1:
            raise CheckpointError(
                f"vae: {key} is a kernel-{value.shape[-1]} mapping (SAME-S). diffusers' AutoencoderSAME has neither "
                "that mapping nor SAME-S's chunked attention, so it cannot hold a SAME-S; convert the original "
                "Stability AI repository instead"
            )
        name = _rename(key, _SAME_FROM_DIFFUSERS)
        if differential and name.endswith(".self_attn.to_qkv.weight"):
            value = _official_qkv_order(value)
        out[name], origin[name] = value, key
    return out, origin


def seconds_from_diffusers(weights: dict[str, mx.array]) -> tuple[dict[str, mx.array], list[str]]:
    """StableAudio3DurationEmbedder tensors -> (official seconds_total conditioner tensors, dropped names).

    Its ``freqs`` buffer is checked against the official expo frequencies, which the model recomputes."""
    out, dropped = {}, []
    for key, value in weights.items():
        if key == "freqs":
            ramp = np.linspace(0.0, 1.0, value.shape[0])
            low, high = np.log(_SECONDS_FREQS[0]), np.log(_SECONDS_FREQS[1])
            if value.ndim != 1 or not np.allclose(
                np.asarray(value.astype(mx.float32)), np.exp(low + ramp * (high - low)), rtol=1e-5, atol=0
            ):
                raise CheckpointError("duration_embedder freqs are not the official expo Fourier frequencies")
            dropped.append(key)
        elif key.startswith("linear."):
            out[Conditioners.SECONDS_W.rsplit(".", 1)[0] + key[len("linear") :]] = value
        else:
            out[key] = value  # unknown: the conditioner's strict check names it
    return out, dropped
