"""A full-size random-weight Stable Audio 3 checkpoint in the original Hub layout, for benchmarks and for users
without access to the gated weights.

    python benchmarks/random_checkpoint.py small OUT_DIR [--seed N]     # ~3.4 GB: DiT small, SAME-S, T5Gemma-b
    python benchmarks/random_checkpoint.py medium OUT_DIR [--seed N]    # ~10 GB: DiT medium, SAME-L, T5Gemma-b

``OUT_DIR`` gets what a Hub repo holds: ``model_config.json`` (the official schema with the real sizes),
``model.safetensors`` (``model.model.*`` DiT, ``pretransform.model.*`` SAME with weight-normed mappings stored as
``weight_g``/``weight_v``, ``conditioner.conditioners.*``; float32 like the real file) and ``t5gemma-b-b-ul2/``
(T5Gemma-b config.json, encoder weights, a sentencepiece ``tokenizer.model`` trained on the spot and
``tokenizer_config.json``). Every mlx_sa3 entry point loads it like a real checkpoint; the audio it makes is noise.

Differences from a real repo, on purpose: the T5Gemma ``model.safetensors`` holds the encoder only (mlx_sa3 and
transformers' ``T5GemmaEncoderModel`` read nothing else; the decoder would be ~0.6 GB of unread bytes), and the
tokenizer has 512 pieces instead of 256000 (its ids fit the real vocabulary).

Weights are drawn from ``--seed`` (the same seed gives the same bytes) with scales that keep generation finite:
matrices ~ N(0, 0.02^2), norm gains one, biases zero, weight-norm gains one (unit-norm rows), RoPE buffers the exact
base-10000 frequencies the loaders check. Tensors are generated and written one at a time in slices of
``SLICE_ELEMENTS``, so memory stays far below the checkpoint size. The directory appears only when complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import struct
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np

VARIANTS = ("small", "medium")
SLICE_ELEMENTS = 1 << 24  # 64 MB of float32 per write: the peak memory of the writer
TEXT_SUBFOLDER = "t5gemma-b-b-ul2"
HUB_REPOS = {"small": "stabilityai/stable-audio-3-small-music", "medium": "stabilityai/stable-audio-3-medium"}


# ------------------------------------------------------------------------------------------------------ configs


def _same_block(width: int, depth: int, dim_heads: int, latent_dim: int, small: bool) -> dict:
    """The encoder/decoder ``config`` shared keys of the official SAMEEncoder/SAMEDecoder."""
    block = {
        "channels": width // 2,
        "c_mults": [2],
        "strides": [16],
        "transformer_depths": [depth],
        "latent_dim": latent_dim,
        "dim_heads": dim_heads,
        "differential": True,
        "variable_stride": True,
    }
    if small:  # SAME-S: chunks of 2 latent groups, second half of the blocks shifted by one group
        block.update({"chunk_size": 32, "chunk_midpoint_shift": True})
    else:  # SAME-L: a band of one latent group on each side
        block.update({"sliding_window": [1, 1]})
    block["ff_mult"] = 3
    return block


def model_config(variant: str, tiny: bool = False) -> dict:
    """The Hub ``model_config.json`` of ``variant`` ("small" or "medium"); ``tiny`` shrinks every size (tests)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose small or medium")
    small = variant == "small"
    if tiny:
        latent, cond, max_length, sample_size = 16, 64, 32, 2097152
        embed, depth, heads, memory = 64, 2, 2, 4
        same_width, same_depth, same_heads = 32, 2, 16
        sinusoidal = 0 if small else 1
    else:
        latent, cond, max_length = 256, 768, 256
        # small: the official generate() default canvas (120 s); medium: the pinned config's 4096 latents (380 s)
        sample_size = 5292032 if small else 16777216
        embed, depth, heads, memory = (1024, 20, 16, 64) if small else (1536, 24, 24, 64)
        same_width, same_depth, same_heads = (768, 6, 64) if small else (1536, 12, 64)
        sinusoidal = 0 if small else 8
    encoder = {**_same_block(same_width, same_depth, same_heads, latent, small), "in_channels": 512}
    decoder = {
        **_same_block(same_width, same_depth, same_heads, latent, small),
        "out_channels": 512,
        "sinusoidal_blocks": [sinusoidal],
    }
    if small:
        decoder["conv_mapping"] = True  # SAME-S decodes through a kernel-3 mapping; its encoder mapping is 1x1
    prompt = {
        "max_length": max_length,
        "padding_mode": "learned",
        "repo_id": HUB_REPOS[variant],
        "subfolder": TEXT_SUBFOLDER,
    }
    return {
        "model_type": "diffusion_cond_inpaint",
        "sample_rate": 44100,
        "sample_size": sample_size,
        "audio_channels": 2,
        "model": {
            "io_channels": latent,
            "pretransform": {
                "type": "autoencoder",
                "iterate_batch": False,
                "config": {
                    "latent_dim": latent,
                    "downsampling_ratio": 4096,
                    "io_channels": 2,
                    "encoder": {"type": "same", "config": encoder},
                    "decoder": {"type": "same", "config": decoder},
                    "bottleneck": {"type": "softnorm", "config": {"dim": latent, "auto_scale": True}},
                    "pretransform": {"type": "patched", "config": {"channels": 2, "patch_size": 256}},
                },
            },
            "conditioning": {
                "cond_dim": cond,
                "configs": [
                    {"id": "prompt", "type": "t5gemma", "config": prompt},
                    {
                        "id": "seconds_total",
                        "type": "number",
                        "config": {"min_val": 0, "max_val": 384, "fourier_features_type": "expo"},
                    },
                ],
            },
            "diffusion": {
                "type": "dit",
                "diffusion_objective": "rf_denoiser",
                "cross_attention_cond_ids": ["prompt", "seconds_total"],
                "global_cond_ids": ["seconds_total"],
                "local_add_cond_ids": ["inpaint_mask", "inpaint_masked_input"],
                "config": {
                    "io_channels": latent,
                    "patch_size": 1,
                    "embed_dim": embed,
                    "depth": depth,
                    "num_heads": heads,
                    "cond_token_dim": cond,
                    "global_cond_dim": cond,
                    "local_add_cond_dim": latent + 1,
                    "transformer_type": "continuous_transformer",
                    "global_cond_type": "adaLN",
                    "timestep_features_type": "expo",
                    "timestep_features_dim": 256,
                    "attn_kwargs": {"qk_norm": "rms", "differential": not small},
                    "norm_type": "rms_norm",
                    "norm_kwargs": {"force_fp32": True},
                    "ff_kwargs": {"mult": 4.0},
                    "num_memory_tokens": memory,
                },
            },
        },
    }


def _t5gemma_stack(hidden: int, layers: int, heads: int, head_dim: int, inner: int, vocab: int, decoder: bool) -> dict:
    stack = {
        "attention_bias": False,
        "attention_dropout": 0.0,
        "attn_logit_softcapping": 50.0,
        "bos_token_id": 2,
        "dropout_rate": 0.0,
        "eos_token_id": 1,
        "final_logit_softcapping": 30.0,
        "head_dim": head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "hidden_size": hidden,
        "initializer_range": 0.02,
        "intermediate_size": inner,
        "is_decoder": decoder,
        "layer_types": ["full_attention" if i % 2 else "sliding_attention" for i in range(layers)],
        "max_position_embeddings": 8192,
        "model_type": "t5_gemma_module",
        "num_attention_heads": heads,
        "num_hidden_layers": layers,
        "num_key_value_heads": heads,
        "pad_token_id": 0,
        "query_pre_attn_scalar": head_dim,
        "rms_norm_eps": 1e-06,
        "rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"},
        "sliding_window": 4096,
        "tie_word_embeddings": True,
        "use_cache": True,
        "vocab_size": vocab,
    }
    if decoder:
        stack["cross_attention_hidden_size"] = hidden
    return stack


def text_config(tiny: bool = False) -> dict:
    """transformers ``config.json`` of T5Gemma-b-b (encoder-decoder, 12 + 12 layers of 768); ``tiny`` for tests."""
    dims = (64, 2, 2, 32, 128, 512) if tiny else (768, 12, 12, 64, 2048, 256000)
    return {
        "architectures": ["T5GemmaForConditionalGeneration"],
        "attention_dropout": 0.0,
        "bos_token_id": 2,
        "classifier_dropout_rate": 0.0,
        "decoder": _t5gemma_stack(*dims, decoder=True),
        "dropout_rate": 0.0,
        "dtype": "float32",
        "encoder": _t5gemma_stack(*dims, decoder=False),
        "eos_token_id": 1,
        "initializer_range": 0.02,
        "is_encoder_decoder": True,
        "model_type": "t5gemma",
        "pad_token_id": 0,
        "tie_word_embeddings": True,
        "vocab_size": dims[-1],
    }


def tokenizer_config(max_length: int) -> dict:
    """As the SA3 repos ship it: right padding, no BOS/EOS (see the reference fixtures)."""
    return {
        "tokenizer_class": "GemmaTokenizer",
        "padding_side": "right",
        "add_bos_token": False,
        "add_eos_token": False,
        "pad_token": "<pad>",
        "eos_token": "<eos>",
        "bos_token": "<bos>",
        "unk_token": "<unk>",
        "model_max_length": max_length,
    }


# ------------------------------------------------------------------------------------------------------ layouts


def _linear(name: str, out: int, inp: int, bias: bool) -> list[tuple[str, tuple]]:
    return [(f"{name}.weight", (out, inp))] + ([(f"{name}.bias", (out,))] if bias else [])


def dit_layout(config) -> list[tuple[str, tuple]]:
    """Official DiffusionTransformer tensor names (no prefix) and shapes for a :class:`mlx_sa3.dit.DiTConfig`."""
    e, io, hd = config.embed_dim, config.io_channels, config.head_dim
    out = []
    out += _linear("to_timestep_embed.0", e, config.timestep_features_dim, True) + _linear(
        "to_timestep_embed.2", e, e, True
    )
    out += _linear("to_cond_embed.0", e, config.cond_token_dim, False) + _linear("to_cond_embed.2", e, e, False)
    out += _linear("to_global_embed.0", e, config.global_cond_dim, False) + _linear("to_global_embed.2", e, e, False)
    out += [("preprocess_conv.weight", (io, io, 1)), ("postprocess_conv.weight", (io, io, 1))]
    t = "transformer."
    out += _linear(t + "project_in", e, io, False) + _linear(t + "project_out", io, e, False)
    if config.num_memory_tokens:
        out.append((t + "memory_tokens", (config.num_memory_tokens, e)))
    out.append((t + "rotary_pos_emb.inv_freq", (config.rope_dims // 2,)))
    out += _linear(t + "global_cond_embedder.0", e, e, True) + _linear(t + "global_cond_embedder.2", 6 * e, e, True)
    qkv, q, kv = (5, 2, 3) if config.differential else (3, 1, 2)
    for i in range(config.depth):
        p = f"{t}layers.{i}."
        for norm in ("pre_norm", "cross_attend_norm", "ff_norm"):
            out.append((p + norm + ".gamma", (e,)))
        for attn in ("self_attn", "cross_attn"):
            out += [(f"{p}{attn}.q_norm.gamma", (hd,)), (f"{p}{attn}.k_norm.gamma", (hd,))]
            out += _linear(f"{p}{attn}.to_out", e, e, False)
        out += _linear(p + "self_attn.to_qkv", qkv * e, e, False)
        out += _linear(p + "cross_attn.to_q", q * e, e, False) + _linear(p + "cross_attn.to_kv", kv * e, e, False)
        out += _linear(p + "ff.ff.0.proj", 2 * config.ff_inner, e, True) + _linear(
            p + "ff.ff.2", e, config.ff_inner, True
        )
        out.append((p + "to_scale_shift_gate", (6 * e,)))
        out += _linear(p + "to_local_embed.0", e, config.local_add_cond_dim, True)
        out += _linear(p + "to_local_embed.2", e, e, True)
    return out


def _resampler_layout(prefix: str, cfg, frame_dim: int, decoder: bool) -> list[tuple[str, tuple]]:
    w, hd, k = cfg.width, cfg.head_dim, cfg.mapping_kernel
    inner = int(w * cfg.ff_mult)
    mapping_out, mapping_in = (frame_dim, w) if decoder else (w, frame_dim)
    per_group = 1 if cfg.shared_new_token or not decoder else cfg.stride
    out = [
        (prefix + "mapping.weight_g", (mapping_out, 1, 1)),
        (prefix + "mapping.weight_v", (mapping_out, mapping_in, k)),
        (prefix + "mapping.bias", (mapping_out,)),
        (prefix + "new_tokens", (1, per_group, w)),
    ]
    for i in range(cfg.depth):
        p = f"{prefix}transformers.{i}."
        for norm in ("pre_norm", "ff_norm"):
            out += [(f"{p}{norm}.alpha", (1,)), (f"{p}{norm}.gamma", (w,)), (f"{p}{norm}.beta", (w,))]
        for norm in ("q_norm", "k_norm"):
            out += [
                (f"{p}self_attn.{norm}.alpha", (1,)),
                (f"{p}self_attn.{norm}.gamma", (hd,)),
                (f"{p}self_attn.{norm}.beta", (hd,)),
            ]
        out += _linear(p + "self_attn.to_qkv", (5 if cfg.differential else 3) * w, w, False)
        out += _linear(p + "self_attn.to_out", w, w, False)
        out += _linear(p + "ff.ff.0.proj", 2 * inner, w, True) + _linear(p + "ff.ff.2", w, inner, True)
        out.append((p + "rope.inv_freq", (hd // 4,)))  # RoPE on half of each head
    return out


def same_layout(config) -> list[tuple[str, tuple]]:
    """Official SAME autoencoder tensor names (no prefix) and shapes for a :class:`mlx_sa3.same.SAMEConfig`."""
    latent = config.latent_dim
    out = _resampler_layout("encoder.layers.0.", config.encoder, config.frame_dim, decoder=False)
    out += _linear("encoder.layers.2", latent, config.encoder.width, True)
    out += _linear("decoder.layers.1", config.decoder.width, latent, True)
    out += _resampler_layout("decoder.layers.3.", config.decoder, config.frame_dim, decoder=True)
    out += [
        ("bottleneck.scaling_factor", (1, latent, 1)),
        ("bottleneck.bias", (1, latent, 1)),
        ("bottleneck.noise_scaling_factor", (1, 0, 1)),
    ]
    if config.auto_scale:
        out.append(("bottleneck.running_std", (1,)))
    return out


def conditioner_layout(cond_dim: int) -> list[tuple[str, tuple]]:
    return [
        ("prompt.padding_embedding", (cond_dim,)),
        ("seconds_total.embedder.embedding.1.weight", (cond_dim, 256)),
        ("seconds_total.embedder.embedding.1.bias", (cond_dim,)),
    ]


def hub_layout(config: dict) -> list[tuple[str, tuple]]:
    """Every tensor (name, shape) of a full SA3 ``model.safetensors`` for a Hub ``model_config.json`` (no data)."""
    from mlx_sa3.dit import DiTConfig
    from mlx_sa3.loading import SA3_PREFIXES
    from mlx_sa3.same import SAMEConfig

    dit = DiTConfig.from_model_config(config)
    same = SAMEConfig.from_dict(config["model"], config.get("sample_rate"))
    cond_dim = config["model"]["conditioning"]["cond_dim"]
    parts = [
        ("dit", dit_layout(dit)),
        ("autoencoder", same_layout(same)),
        ("conditioners", conditioner_layout(cond_dim)),
    ]
    return sorted((SA3_PREFIXES[part] + name, shape) for part, layout in parts for name, shape in layout)


def t5gemma_layout(config: dict) -> list[tuple[str, tuple]]:
    """Encoder tensors (name, shape) of a transformers T5Gemma ``model.safetensors`` for its ``config.json``."""
    enc = config["encoder"]
    h, inner = enc["hidden_size"], enc["intermediate_size"]
    q, kv = enc["num_attention_heads"] * enc["head_dim"], enc["num_key_value_heads"] * enc["head_dim"]
    out = [("encoder.embed_tokens.weight", (enc["vocab_size"], h)), ("encoder.norm.weight", (h,))]
    for i in range(enc["num_hidden_layers"]):
        p = f"encoder.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "mlp.gate_proj.weight", (inner, h)),
            (p + "mlp.up_proj.weight", (inner, h)),
            (p + "mlp.down_proj.weight", (h, inner)),
        ]
        for norm in (
            "pre_self_attn_layernorm",
            "post_self_attn_layernorm",
            "pre_feedforward_layernorm",
            "post_feedforward_layernorm",
        ):
            out.append((f"{p}{norm}.weight", (h,)))
    return sorted(out)


# ------------------------------------------------------------------------------------------------------ values


def _rope_frequencies(count: int) -> np.ndarray:
    dims = 2 * count
    return (1.0 / 10000.0 ** (np.arange(0, dims, 2, dtype=np.float64) / dims)).astype(np.float32)


def init_rule(name: str) -> tuple[str, float]:
    """How a tensor is filled: ("normal", std), ("const", value) or ("rope", 0), chosen from its name."""
    if name.endswith("inv_freq"):
        return "rope", 0.0
    if name.endswith("layernorm.weight") or name == "encoder.norm.weight":
        return "const", 0.0  # Gemma RMSNorm gain is (1 + w): zero is a unit gain
    if name.endswith((".gamma", ".weight_g", "running_std", "scaling_factor")):
        return "const", 1.0
    if name.endswith(".alpha"):
        return "const", 1.0  # DyT: tanh(1 * x), not saturated for unit-scale activations
    if name.endswith((".bias", ".beta", "to_scale_shift_gate", "noise_scaling_factor")):
        return "const", 0.0
    if name.endswith("prompt.padding_embedding"):
        return "normal", 1.0  # stands in for T5Gemma output rows, which its final norm keeps at unit scale
    if name.endswith("seconds_total.embedder.embedding.1.weight"):
        return "normal", 1.0 / 16
    return "normal", 0.02


def _slices(name: str, shape: tuple, seed: int):
    """The float32 values of one tensor, flat, in slices of at most SLICE_ELEMENTS (deterministic per name)."""
    size = int(np.prod(shape, dtype=np.int64))
    kind, value = init_rule(name)
    if kind == "rope":
        yield _rope_frequencies(size)
        return
    if kind == "const":
        for start in range(0, size, SLICE_ELEMENTS):
            yield np.full(min(SLICE_ELEMENTS, size - start), value, dtype=np.float32)
        return
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, zlib.crc32(name.encode())])))
    for start in range(0, size, SLICE_ELEMENTS):
        piece = rng.standard_normal(min(SLICE_ELEMENTS, size - start), dtype=np.float32)
        piece *= np.float32(value)
        yield piece


def write_safetensors(path: Path, layout: list[tuple[str, tuple]], seed: int) -> int:
    """Write random float32 tensors for ``layout`` to ``path`` one slice at a time; returns the file size."""
    header, offset = {}, 0
    for name, shape in layout:
        nbytes = 4 * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape in layout:
            f.writelines(piece.astype("<f4", copy=False).tobytes() for piece in _slices(name, shape, seed))
    return 8 + len(blob) + offset


# ------------------------------------------------------------------------------------------------------ writer


def write_checkpoint(out_dir, variant: str, seed: int = 0, tiny: bool = False) -> Path:
    """Write the whole checkpoint into a fresh ``out_dir`` (which must not exist, or be an empty directory)."""
    from mlx_sa3.demo import train_tokenizer

    out_dir = Path(out_dir)
    config = model_config(variant, tiny)
    t5 = text_config(tiny)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        (tmp / "model_config.json").write_text(json.dumps(config, indent=2) + "\n")
        write_safetensors(tmp / "model.safetensors", hub_layout(config), seed)
        text_dir = tmp / TEXT_SUBFOLDER
        text_dir.mkdir()
        (text_dir / "config.json").write_text(json.dumps(t5, indent=2) + "\n")
        write_safetensors(text_dir / "model.safetensors", t5gemma_layout(t5), seed)
        train_tokenizer(text_dir)  # also writes a tokenizer_config.json, replaced by the repos' one next
        max_length = config["model"]["conditioning"]["configs"][0]["config"]["max_length"]
        (text_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(max_length)) + "\n")
        _apply_umask(tmp)
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked by the caller); rename cannot replace a directory
        os.rename(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _apply_umask(root: Path) -> None:
    """mkdtemp makes a 0700 directory: give the tree the modes the user's umask asks for."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _check_target(out_dir: Path) -> str | None:
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        return f"{out_dir} exists and is not a directory; choose a new path"
    if out_dir.is_dir() and any(out_dir.iterdir()):
        return f"{out_dir} exists and is not empty; choose a new path"
    if not out_dir.parent.is_dir():
        return f"{out_dir.parent}: no such directory"
    if not os.access(out_dir.parent, os.W_OK):
        return f"{out_dir.parent}: not writable"
    return None


def main(argv=None) -> int:
    from mlx_sa3.cli import ArgumentParser, whole_number_in  # one-line usage errors, as every mlx_sa3 command

    parser = ArgumentParser(prog="python benchmarks/random_checkpoint.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("variant", choices=VARIANTS, help="small (DiT 1024x20, SAME-S) or medium (1536x24, SAME-L)")
    parser.add_argument("out_dir", help="directory to create (must not exist, or be empty)")
    parser.add_argument(
        "--seed",
        type=whole_number_in(0),
        default=0,
        help="random seed, a whole number >= 0 (default 0); same seed, same bytes",
    )
    parser.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # toy sizes, same layout: for tests
    args = parser.parse_args(argv)
    out_dir = Path(args.out_dir).expanduser()
    problem = _check_target(out_dir)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # SIGTERM/SIGHUP unwind like Ctrl-C, so the partial temporary directory is removed
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda number, _frame: sys.exit(128 + number))
    try:
        write_checkpoint(out_dir, args.variant, args.seed, args.tiny)
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written", file=sys.stderr)
        return 2
    except OSError as err:
        print(f"error: {out_dir}: {err.strerror or err}", file=sys.stderr)
        return 2
    print(f"wrote {out_dir} ({args.variant}{', tiny' if args.tiny else ''}, seed {args.seed})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
