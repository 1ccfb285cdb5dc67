"""Convert a Hub checkpoint once into the mlx_sa3 layout: ``python -m mlx_sa3.convert SRC OUT``.

SRC is a full SA3 repo, a SAME repo, or a diffusers Stable Audio 3 pipeline folder; the diffusers names are mapped
back to the original ones, so both layouts give the same files (config.json then lists under ``notes`` what
diffusers does not record and had to be assumed).

The converted directory holds one safetensors file per component, already in mlx_sa3 module names and MLX layouts
(weight norm folded, conv kernels transposed, unused buffers and the T5Gemma decoder dropped), so loading it is a
plain memory read with no remapping. Conversion streams: source tensors are read lazily and each output tensor is
computed, written and released in turn, so peak memory stays near the size of the largest single tensor.

Output layout::

    OUT/config.json                     {"format": "mlx_sa3", "version": 1, "kind", "dtype", "model_config",
                                         "source", "components", "dropped"}
    OUT/dit.safetensors                 (SA3 only) DiT, in --dtype
    OUT/conditioners.safetensors        (SA3 only) prompt padding + seconds embedder, float32
    OUT/autoencoder.safetensors         SAME autoencoder, float32
    OUT/text_encoder/encoder.safetensors (SA3 only) T5Gemma encoder, in --dtype, next to its config and tokenizer
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from .models import dit, keymaps, same, t5gemma
from .loading import (
    CONVERTED_FORMAT,
    CONVERTED_TEXT_ENCODER_DIR,
    DTYPES,
    PICKLE_SUFFIXES,
    SA3_PREFIXES,
    CheckpointError,
    Source,
    expected_shapes,
    load_safetensors,
    open_source,
    parse_dtype,
    read_json,
    refuse_pickle,
    resolve_source,
    sanitize_checked,
)
from .checkpoint import SA3Config, _parsed
from .models.conditioners import Conditioners

FORMAT_VERSION = 1
COMPONENT_FILES = {
    "dit": "dit.safetensors",
    "autoencoder": "autoencoder.safetensors",
    "conditioners": "conditioners.safetensors",
    "text_encoder": f"{CONVERTED_TEXT_ENCODER_DIR}/encoder.safetensors",
}
WEIGHTS_FILE = "model.safetensors"
# Weight files of the T5Gemma folder; everything else there (config, tokenizer files) is copied as is.
_TEXT_ENCODER_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json") + PICKLE_SUFFIXES

_ST_DTYPES = {  # MLX dtype -> (safetensors name, bytes per element)
    mx.float32: ("F32", 4), mx.float16: ("F16", 2), mx.bfloat16: ("BF16", 2), mx.float64: ("F64", 8),
    mx.int64: ("I64", 8), mx.int32: ("I32", 4), mx.int16: ("I16", 2), mx.int8: ("I8", 1),
    mx.uint64: ("U64", 8), mx.uint32: ("U32", 4), mx.uint16: ("U16", 2), mx.uint8: ("U8", 1), mx.bool_: ("BOOL", 1),
}
_ST_ITEMSIZE = {name: size for name, size in _ST_DTYPES.values()} | {"F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit; a larger value means a corrupt file


# --------------------------------------------------------------------------------------------- safetensors files


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading tensor data.

    Raises CheckpointError for a file that is truncated, has a corrupt header or inconsistent offsets, so that a
    damaged download is reported before any conversion work (MLX would only notice when a tensor is read).
    """
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(f"{path}: truncated or not a safetensors file (header of {header_len} bytes "
                                  f"in a {size}-byte file)")
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            expected = math.prod(info["shape"]) * _ST_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end > data_bytes:
            raise CheckpointError(f"{path}: truncated: tensor {name} ends at byte {end} of the data section, "
                                  f"which holds only {data_bytes} bytes")
        if end - begin != expected or begin < 0:
            raise CheckpointError(f"{path}: corrupt safetensors header: {name} {info['dtype']} {info['shape']} "
                                  f"needs {expected} bytes, offsets give {end - begin}")
    return header


def write_safetensors(path: Path, tensors: dict[str, mx.array], metadata: dict[str, str] | None = None,
                      on_tensor: Callable[[str], None] | None = None) -> int:
    """Write ``tensors`` to ``path`` one at a time and return the file size. ``tensors`` is emptied.

    ``mx.save_safetensors`` evaluates every array before writing; here the header is built from the (lazy) arrays'
    shapes and dtypes, then each array is evaluated, written and dropped in turn, so a lazily loaded or lazily
    computed checkpoint never sits in memory as a whole. ``on_tensor`` is called with each name before it is written.
    """
    names = sorted(tensors)
    header: dict[str, dict] = {}
    offset = 0
    for name in names:
        value = tensors[name]
        if value.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {value.dtype} cannot be stored in safetensors")
        st_name, itemsize = _ST_DTYPES[value.dtype]
        nbytes = value.size * itemsize
        header[name] = {"dtype": st_name, "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the safetensors convention: data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            if on_tensor is not None:
                on_tensor(name)
            _write_tensor(f, name, tensors.pop(name), header[name]["data_offsets"])
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset


def _write_tensor(f, name: str, value: mx.array, offsets: list[int]) -> None:
    value = mx.contiguous(value)
    if value.dtype == mx.bfloat16:  # numpy has no bfloat16: write its bits
        value = value.view(mx.uint16)
    mx.eval(value)
    data = np.ascontiguousarray(np.asarray(value))
    if data.nbytes != offsets[1] - offsets[0]:
        raise CheckpointError(f"{name}: wrote {data.nbytes} bytes, header promises {offsets[1] - offsets[0]}")
    f.write(data.data if data.size else b"")
    del value, data
    mx.clear_cache()  # hand the buffer back now instead of growing MLX's cache with every tensor size


def load_folder_weights(folder: Path, filename: str) -> dict[str, mx.array]:
    """Every tensor of ``folder/filename``, or of the shards listed in ``folder/filename.index.json``.

    Headers are validated first; the tensors stay lazy. transformers and diffusers shard large checkpoints this way.
    """
    index_path = folder / f"{filename}.index.json"
    if not (folder / filename).exists() and not index_path.exists():
        for pickle_file in (folder / (Path(filename).stem + suffix) for suffix in PICKLE_SUFFIXES):
            if pickle_file.exists():
                refuse_pickle(pickle_file)
    if (folder / filename).exists() or not index_path.exists():
        read_safetensors_header(folder / filename)
        return load_safetensors(folder / filename)
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no weight_map")
    tensors: dict[str, mx.array] = {}
    for shard in sorted(set(weight_map.values())):
        read_safetensors_header(folder / shard)
        tensors |= load_safetensors(folder / shard)
    if set(tensors) != set(weight_map):
        raise CheckpointError(f"{index_path}: the shards do not hold exactly the tensors the index lists")
    return tensors


def verify_safetensors(path: Path, expected: dict[str, tuple[tuple, mx.Dtype]]) -> None:
    """Check a written file with both readers: the ``safetensors`` library and ``mx.load`` (names, shapes, dtypes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        st = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    loaded = load_safetensors(path)  # lazy: nothing is read
    got = {k: (tuple(v.shape), v.dtype) for k, v in loaded.items()}
    if st != {k: shape for k, (shape, _) in expected.items()} or got != expected:
        raise CheckpointError(f"{path}: verification failed, the written file does not match what was converted")


# --------------------------------------------------------------------------------------------- conversion plan


@dataclass
class Component:
    """One output file: sanitized (still lazy) tensors in their output dtype, and the source tensors it dropped."""

    name: str
    tensors: dict[str, mx.array]
    dropped: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensors.values())

    def signature(self) -> dict[str, tuple[tuple, mx.Dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}


def _dropped_by(sanitize: Callable[[dict], dict], weights: dict[str, mx.array], kept: dict) -> list[str]:
    """Source names that ``sanitize`` discards.

    A source tensor whose name does not appear among the outputs was either renamed or dropped; sanitizing it alone
    (with its weight-norm partner) tells which: a dropped tensor yields nothing.
    """
    groups: dict[str, list[str]] = {}
    for key in weights:
        if key not in kept:
            groups.setdefault(re.sub(r"\.weight_[gv]$", ".weight", key), []).append(key)
    dropped = []
    for keys in groups.values():
        if not sanitize({k: weights[k] for k in keys}):
            dropped.extend(keys)
    return sorted(dropped)


_parse = _parsed


def plan_dit(weights: dict[str, mx.array], model_config: dict, dtype: mx.Dtype,
             prefix: str = SA3_PREFIXES["dit"]) -> Component:
    config = _parse("DiT", lambda: dit.DiTConfig.from_model_config(model_config))
    out = sanitize_checked(weights, dit.sanitize, dit.DiT(config), "DiT checkpoint")
    dropped = [prefix + k for k in _dropped_by(dit.sanitize, weights, out)]
    return Component("dit", {k: v.astype(dtype) for k, v in out.items()}, dropped)


def plan_autoencoder(weights: dict[str, mx.array], model_config: dict, prefix: str) -> Component:
    config = _parse("SAME autoencoder", lambda: same.SAMEConfig.from_dict(
        model_config["model"], sample_rate=model_config.get("sample_rate")))
    out = sanitize_checked(weights, same.sanitize, same.SAMEAutoencoder(config), "SAME autoencoder checkpoint")
    dropped = [prefix + k for k in _dropped_by(same.sanitize, weights, out)]
    # The SAME decoder cancels badly in half precision, so the autoencoder is always stored in float32.
    return Component("autoencoder", {k: v.astype(mx.float32) for k, v in out.items()}, dropped)


def plan_conditioners(weights: dict[str, mx.array], model_config: dict) -> Component:
    config = _parse("conditioner", lambda: SA3Config.from_dict(model_config))
    conditioners = Conditioners(weights, config)  # strict name/shape check; keeps float32
    return Component("conditioners", dict(conditioners.tensors))


def plan_text_encoder(text_dir: Path, dtype: mx.Dtype, encoder_only: bool = False) -> Component:
    """The T5Gemma encoder of ``text_dir``; the decoder half of an encoder-decoder checkpoint is dropped.

    With ``encoder_only`` (the diffusers ``T5GemmaEncoderModel`` folder) there is nothing to drop, so any tensor
    outside the encoder is reported as unexpected.
    """
    config = _parse("T5Gemma", lambda: t5gemma.T5GemmaConfig.from_dir(text_dir))
    weights = load_folder_weights(text_dir, WEIGHTS_FILE)
    kept, dropped = t5gemma.sanitize(weights), t5gemma.dropped(weights)
    if encoder_only:
        kept |= {k: weights[k] for k in dropped}
        dropped = []
    sanitize_checked(kept, None, t5gemma.T5GemmaEncoder(config), "T5Gemma encoder checkpoint")
    dropped = [f"{text_dir.name}/{WEIGHTS_FILE}:{k}" for k in dropped]
    return Component("text_encoder", {k: v.astype(dtype) for k, v in kept.items()}, dropped)


def split_sa3(tensors: dict[str, mx.array]) -> dict[str, dict[str, mx.array]]:
    """Split a full SA3 ``model.safetensors`` by component prefix; a tensor under no known prefix is an error."""
    parts: dict[str, dict[str, mx.array]] = {name: {} for name in SA3_PREFIXES}
    stray = []
    for key, value in tensors.items():
        for name, prefix in SA3_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix):]] = value
                break
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(f"{WEIGHTS_FILE} has {len(stray)} tensors outside the DiT, autoencoder and "
                              f"conditioners: {', '.join(sorted(stray))}")
    return parts


def plan(source: Source, dtype: mx.Dtype) -> list[Component]:
    """Sanitize and strictly check every component of ``source``.

    Only headers (and the small RoPE buffers the sanitizers verify) are read here; the tensors stay lazy.
    """
    weights_path = source.root / WEIGHTS_FILE
    read_safetensors_header(weights_path)
    text_dir = source.text_encoder_dir() if source.layout == "sa3" else None
    return plan_components(load_safetensors(weights_path), source.model_config, text_dir, dtype)


def plan_components(tensors: dict[str, mx.array], model_config: dict, text_dir: Path | None,
                    dtype: mx.Dtype) -> list[Component]:
    """The components of a SAME checkpoint (``text_dir`` None) or a full SA3 checkpoint with its T5Gemma folder.

    The caller must keep no other reference to ``tensors``: then each source tensor is freed as soon as the
    output computed from it has been written.
    """
    if text_dir is None:
        return [plan_autoencoder(tensors, model_config, prefix="")]
    parts = split_sa3(tensors)
    tensors.clear()
    if not text_dir.is_dir():
        raise CheckpointError(f"{text_dir}: the T5Gemma folder is missing")
    return [
        plan_dit(parts.pop("dit"), model_config, dtype),
        plan_autoencoder(parts.pop("autoencoder"), model_config, prefix=SA3_PREFIXES["autoencoder"]),
        plan_conditioners(parts.pop("conditioners"), model_config),
        plan_text_encoder(text_dir, dtype),
    ]


# --------------------------------------------------------------------------------------------- diffusers layout
#
# A diffusers StableAudio3Pipeline folder holds the same weights as the original repo under other names. They are
# renamed back to the original Hub names here and then go through the same sanitizers and strict checks, so both
# layouts convert to identical files. The official model_config.json is rebuilt from the component configs.

DIFFUSERS_PIPELINES = ("StableAudio3Pipeline", "StableAudio3AudioToAudioPipeline", "StableAudio3InpaintPipeline")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_DIFFUSERS_MODELS = {"transformer": "StableAudio3DiTModel", "vae": "AutoencoderSAME",
                     "duration_embedder": "StableAudio3DurationEmbedder"}
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
        raise CheckpointError(f"{root}/model_index.json: {index.get('_class_name')!r} is not a Stable Audio 3 "
                              f"pipeline (expected one of {', '.join(DIFFUSERS_PIPELINES)})")
    configs = {}
    for folder, class_name in _DIFFUSERS_MODELS.items():
        configs[folder] = read_json(root / folder / "config.json")
        if configs[folder].get("_class_name") != class_name:
            raise CheckpointError(f"{root / folder}/config.json: expected a {class_name}, "
                                  f"found {configs[folder].get('_class_name')!r}")
    configs["scheduler"] = read_json(root / "scheduler" / "scheduler_config.json")
    configs["tokenizer"] = tokenizer_config_with_flags(root / "tokenizer")
    if not (root / "tokenizer" / t5gemma.TOKENIZER_FILE).is_file():
        raise CheckpointError(
            f"{root}/tokenizer has no sentencepiece {t5gemma.TOKENIZER_FILE} (transformers 5 saves only "
            f"tokenizer.json); copy the {t5gemma.TOKENIZER_FILE} of google/t5gemma-b-b-ul2 into it")
    model_config, notes = _parse("diffusers", lambda: official_model_config(configs))
    return DiffusersCheckpoint(root, configs, model_config, notes)


def tokenizer_config_with_flags(directory: Path) -> dict:
    """tokenizer_config.json with explicit ``add_bos_token`` / ``add_eos_token``.

    transformers 5 no longer writes these flags; the special tokens it adds live in tokenizer.json's post-processor
    template instead. Without the flags, mlx_sa3's tokenizer would fall back to GemmaTokenizer's defaults (BOS on).
    """
    config = read_json(directory / t5gemma.TOKENIZER_CONFIG_FILE)
    fast_path = directory / "tokenizer.json"
    if {"add_bos_token", "add_eos_token"} <= set(config) or not fast_path.is_file():
        return config
    processor = read_json(fast_path).get("post_processor") or {}
    if processor.get("type") != "TemplateProcessing":
        raise CheckpointError(f"{fast_path}: cannot tell whether BOS/EOS are added (post_processor "
                              f"{processor.get('type')!r}); add add_bos_token / add_eos_token to tokenizer_config.json")
    single = [item.get("SpecialToken", {}).get("id") for item in processor.get("single", [])]
    return {**config,
            "add_bos_token": bool(single) and single[0] == config.get("bos_token", "<bos>"),
            "add_eos_token": bool(single) and single[-1] == config.get("eos_token", "<eos>")}


def official_model_config(configs: dict[str, dict]) -> tuple[dict, list[str]]:
    """The official model_config.json equivalent to the diffusers component ``configs``, and the notes on it.

    The converted model always runs the official semantics, whatever diffusers' forward pass does differently.
    """
    tr, vae, seconds = configs["transformer"], configs["vae"], configs["duration_embedder"]
    if (seconds["min_freq"], seconds["max_freq"]) != _SECONDS_FREQS:
        raise CheckpointError(f"duration_embedder Fourier range ({seconds['min_freq']}, {seconds['max_freq']}) is not "
                              f"the official {_SECONDS_FREQS}")
    if not seconds["output_dim"] == tr["cond_token_dim"] == tr["global_cond_dim"]:
        raise CheckpointError(f"duration_embedder output_dim {seconds['output_dim']} must equal the transformer's "
                              f"cond_token_dim {tr['cond_token_dim']} and global_cond_dim {tr['global_cond_dim']}")
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
        "channels": vae["encoder_channels"], "c_mults": list(vae["encoder_c_mults"]),
        "strides": list(vae["encoder_strides"]), "transformer_depths": list(vae["encoder_transformer_depths"]),
        "latent_dim": vae["latent_dim"], "dim_heads": vae["dim_heads"],
        "differential": bool(vae["use_differential_attention"]),
        "variable_stride": True,  # diffusers always shares one learned token across the stride
        "sliding_window": [window, window], "ff_mult": vae["ff_mult"],
    }
    pretransform = {
        "latent_dim": vae["latent_dim"],
        "downsampling_ratio": vae["patch_size"] * math.prod(vae["encoder_strides"]),
        "io_channels": vae["audio_channels"],
        "encoder": {"type": "same", "config": {**resampler, "in_channels": patched}},
        "decoder": {"type": "same", "config": {**resampler, "out_channels": patched,
                                               "sinusoidal_blocks": list(vae["decoder_sinusoidal_blocks"])}},
        "bottleneck": {"type": "softnorm", "config": {"dim": vae["latent_dim"], "auto_scale": True}},
        "pretransform": {"type": "patched", "config": {"channels": vae["audio_channels"],
                                                       "patch_size": vae["patch_size"]}},
    }
    diffusion_config = {
        **{k: tr[k] for k in ("io_channels", "patch_size", "embed_dim", "depth", "num_heads", "cond_token_dim",
                              "global_cond_dim", "local_add_cond_dim", "timestep_features_dim", "num_memory_tokens")},
        "transformer_type": "continuous_transformer", "global_cond_type": "adaLN", "timestep_features_type": "expo",
        "attn_kwargs": {"qk_norm": "rms", "differential": bool(tr["use_differential_attention"])},
        "norm_type": "rms_norm", "norm_kwargs": {"force_fp32": True}, "ff_kwargs": {"mult": tr["ff_mult"]},
    }
    model_config = {
        "model_type": "diffusion_cond_inpaint",  # every StableAudio3DiTModel block has the inpaint projection
        "sample_rate": vae["sampling_rate"],
        "sample_size": DEFAULT_SAMPLE_SIZE,
        "audio_channels": vae["audio_channels"],
        "model": {
            "io_channels": tr["io_channels"],
            "pretransform": {"type": "autoencoder", "iterate_batch": False, "config": pretransform},
            "conditioning": {"cond_dim": seconds["output_dim"], "configs": [
                {"id": "prompt", "type": "t5gemma",
                 "config": {"max_length": max_length, "padding_mode": "learned"}},
                {"id": "seconds_total", "type": "number",
                 "config": {"min_val": seconds["min_val"], "max_val": seconds["max_val"],
                            "fourier_features_type": "expo"}},
            ]},
            "diffusion": {
                "type": "dit", "diffusion_objective": objective,
                "cross_attention_cond_ids": ["prompt", "seconds_total"], "global_cond_ids": ["seconds_total"],
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
                "Stability AI repository instead")
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
            if value.ndim != 1 or not np.allclose(np.asarray(value.astype(mx.float32)),
                                                  np.exp(low + ramp * (high - low)), rtol=1e-5, atol=0):
                raise CheckpointError("duration_embedder freqs are not the official expo Fourier frequencies")
            dropped.append(key)
        elif key.startswith("linear."):
            out[Conditioners.SECONDS_W.rsplit(".", 1)[0] + key[len("linear"):]] = value
        else:
            out[key] = value  # unknown: the conditioner's strict check names it
    return out, dropped


def plan_diffusers(checkpoint: DiffusersCheckpoint, dtype: mx.Dtype) -> list[Component]:
    """Rename every diffusers component back to the original Hub names, then plan it like the original layout."""
    root, config = checkpoint.root, checkpoint.model_config
    differential = checkpoint.configs["transformer"]["use_differential_attention"]
    dit_weights, padding, dit_origin = dit_from_diffusers(
        load_folder_weights(root / "transformer", DIFFUSERS_WEIGHTS), differential)
    seconds, seconds_dropped = seconds_from_diffusers(
        load_folder_weights(root / "duration_embedder", DIFFUSERS_WEIGHTS))
    same_weights, same_origin = same_from_diffusers(
        load_folder_weights(root / "vae", DIFFUSERS_WEIGHTS), checkpoint.configs["vae"]["use_differential_attention"])

    dit_part = plan_dit(dit_weights, config, dtype, prefix="")
    dit_part.dropped = [f"transformer/{DIFFUSERS_WEIGHTS}:{dit_origin[k]}" for k in dit_part.dropped]
    autoencoder = plan_autoencoder(same_weights, config, prefix="")
    autoencoder.dropped = [f"vae/{DIFFUSERS_WEIGHTS}:{same_origin[k]}" for k in autoencoder.dropped]
    conditioners = plan_conditioners(padding | seconds, config)
    conditioners.dropped = [f"duration_embedder/{DIFFUSERS_WEIGHTS}:{k}" for k in seconds_dropped]
    return [dit_part, autoencoder, conditioners, plan_text_encoder(root / "text_encoder", dtype, encoder_only=True)]


# --------------------------------------------------------------------------------------------- conversion


def open_checkpoint(src) -> Source | DiffusersCheckpoint:
    """``open_source`` plus the diffusers layout and the refusals specific to conversion (pickle files, converted
    input)."""
    path = Path(src).expanduser()
    if path.is_file():
        refuse_pickle(path)
    root = resolve_source(src)
    if is_diffusers(root):
        return open_diffusers(root)
    source = open_source(root)
    if source.converted:
        raise CheckpointError(f"{source.root} is already an mlx_sa3 checkpoint; nothing to convert")
    return source


def plan_source(source: Source | DiffusersCheckpoint, dtype: mx.Dtype) -> list[Component]:
    return plan_diffusers(source, dtype) if source.layout == "diffusers" else plan(source, dtype)


def text_encoder_dirs(source: Source | DiffusersCheckpoint) -> list[Path]:
    """Folders whose config and tokenizer files make up the converted ``text_encoder/`` (none for SAME)."""
    if source.layout == "diffusers":
        return [source.root / "text_encoder", source.root / "tokenizer"]
    return [source.text_encoder_dir()] if source.layout == "sa3" else []


def source_revision(root: Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot (``.../snapshots/<hash>``), else None."""
    if root.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", root.name):
        return root.name
    return None


def _describe_source(src, root: Path) -> str:
    return str(root.resolve()) if Path(src).expanduser().exists() else str(src)


def _copy_text_encoder_files(text_dirs: list[Path], target: Path) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for text_dir in text_dirs:
        for item in sorted(text_dir.iterdir()):
            if item.is_file() and not item.name.endswith(_TEXT_ENCODER_WEIGHT_SUFFIXES):
                shutil.copyfile(item, target / item.name)
                copied.append(item.name)
    for required in ("config.json", t5gemma.TOKENIZER_FILE, t5gemma.TOKENIZER_CONFIG_FILE):
        if required not in copied:
            raise CheckpointError(f"{' + '.join(map(str, text_dirs))}: {required} is missing")
    return copied


def convert(src, out, dtype: str = "float32", force: bool = False, log: Callable[[str], None] | None = None) -> Path:
    """Convert ``src`` (Hub repo id or directory: full SA3 repo, SAME repo or diffusers Stable Audio 3 pipeline
    folder) into the mlx_sa3 layout at ``out``.

    ``dtype`` applies to the DiT and the T5Gemma encoder; the SAME autoencoder and the conditioners are always
    float32. ``out`` is written into a temporary directory beside it and renamed at the end, so a failure or an
    interruption leaves nothing behind; an existing ``out`` is replaced only with ``force``. Returns ``out``.
    """
    log = log or (lambda message: None)
    out = Path(out).expanduser().absolute()
    target_dtype = parse_dtype(dtype or "float32")
    dtype_name = next(name for name, value in DTYPES.items() if value == target_dtype)
    if out.exists() and not force:
        raise FileExistsError(f"{out} already exists (use --force to replace it)")
    source = open_checkpoint(src)
    if out.resolve() == source.root.resolve() or source.root.resolve() in out.resolve().parents:
        raise CheckpointError(f"{out} is inside the source checkpoint {source.root}; choose another output")
    kind = "same" if source.layout == "same" else "sa3"
    described = {"same": "SAME autoencoder", "sa3": "Stable Audio 3", "diffusers": "diffusers Stable Audio 3"}
    log(f"source: {source.root} ({described[source.layout]} checkpoint)")

    components = plan_source(source, target_dtype)
    dropped = [name for c in components for name in c.dropped]
    _log_dropped(log, dropped)
    notes = source.notes if source.layout == "diffusers" else []
    for note in notes:
        log(f"note: {note}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".converting", dir=out.parent))
    try:
        _apply_umask(tmp)
        if kind == "sa3":
            _copy_text_encoder_files(text_encoder_dirs(source), tmp / CONVERTED_TEXT_ENCODER_DIR)
        if source.layout == "diffusers":
            tokenizer_config = tmp / CONVERTED_TEXT_ENCODER_DIR / t5gemma.TOKENIZER_CONFIG_FILE
            tokenizer_config.write_text(json.dumps(source.configs["tokenizer"], indent=2) + "\n")
        for component in components:
            _write_component(tmp, component, log)
        meta = {
            "format": CONVERTED_FORMAT,
            "version": FORMAT_VERSION,
            "kind": kind,
            "dtype": dtype_name if kind == "sa3" else "float32",
            "model_config": source.model_config,
            "source": {"src": _describe_source(src, source.root), "revision": source_revision(source.root)},
            "components": {c.name: COMPONENT_FILES[c.name] for c in components},
            "dropped": dropped,
        }
        if notes:  # what the source layout did not record, and was assumed
            meta["notes"] = notes
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return out


def _write_component(root: Path, component: Component, log: Callable[[str], None]) -> None:
    path = root / COMPONENT_FILES[component.name]
    path.parent.mkdir(parents=True, exist_ok=True)
    signature = component.signature()
    count, nbytes = len(component.tensors), component.nbytes
    start = time.perf_counter()
    write_safetensors(path, component.tensors, metadata={"format": CONVERTED_FORMAT})
    verify_safetensors(path, signature)
    log(f"  {COMPONENT_FILES[component.name]:<36} {count:5d} tensors {nbytes / 1e6:10.1f} MB "
        f"({time.perf_counter() - start:.1f} s)")


def _apply_umask(path: Path) -> None:
    """mkdtemp makes a private (0700) directory; give the result the permissions a plain mkdir would."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o777 & ~umask)


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temporary directory to ``out``; with ``force`` the old ``out`` is removed only afterwards."""
    if not out.exists():
        os.rename(tmp, out)
        return
    if not force:
        raise FileExistsError(f"{out} appeared during the conversion; not replacing it")
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _log_dropped(log: Callable[[str], None], dropped: list[str]) -> None:
    """List the dropped tensors, with repeated per-layer names collapsed (``layers.*``) to keep the list readable."""
    if not dropped:
        log("dropped: nothing")
        return
    patterns: dict[str, int] = {}
    for name in dropped:
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        patterns[pattern] = patterns.get(pattern, 0) + 1
    log(f"dropped {len(dropped)} source tensors (not used by the model; listed in config.json):")
    for pattern, count in patterns.items():
        log(f"  {pattern}" + (f"  (x{count})" if count > 1 else ""))


# --------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_sa3.convert",
        description="Convert a Stable Audio 3 or SAME checkpoint (Hub repo id or local directory) once into "
                    "mlx_sa3's own layout, which loads without any remapping.",
    )
    parser.add_argument("src", help="Hub repo id (e.g. stabilityai/stable-audio-3-medium) or local directory: "
                                    "a full SA3 repo, a SAME repo or a diffusers "
                                    "StableAudio3Pipeline folder (model_index.json)")
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument("--dtype", default="float32", choices=list(DTYPES),
                        help="storage dtype of the DiT and the T5Gemma text encoder (default float32); the SAME "
                             "autoencoder and the conditioners are always stored in float32, because the SAME "
                             "decoder must run in float32")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    start = time.perf_counter()
    try:
        out = convert(args.src, args.out, dtype=args.dtype, force=args.force, log=print)
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, OSError) as err:  # user errors: bad input, missing files, no access
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"done in {time.perf_counter() - start:.1f} s: load it with mlx_sa3 from {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
