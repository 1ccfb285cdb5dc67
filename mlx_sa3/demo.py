"""``--model demo``: a tiny random-weight SA3 model built in-process, so the whole path runs offline.

It has the real architecture (small-style DiT, SAME-S-style autoencoder, T5Gemma encoder and a sentencepiece
tokenizer trained on the spot) at toy sizes. Its weights are random: the audio it makes is noise.
"""

from __future__ import annotations

import io
import json
import tempfile
from pathlib import Path

import mlx.core as mx

from .backend import check_weights_dtype, default_dtype, move_networks
from .checkpoint import FULL_SIZE_TEXT_CONFIG, CheckpointConfig, SA3Config, full_size_configs
from .loading import check_backend, parse_dtype
from .model import SA3Model
from .models.conditioners import Conditioners
from .models.dit import DiT, DiTConfig
from .models.same import SAMEAutoencoder, SAMEConfig
from .models.t5gemma import T5GemmaConfig, T5GemmaEncoder, T5GemmaTokenizer, TextEncoder
from .quantize import KEEP as QUANTIZE_KEEP
from .storage import narrow_linears, storage_dtype

COND_DIM = 64
LATENT_DIM = 16
_SAME_BLOCK = {
    "channels": 16,
    "c_mults": [2],
    "strides": [16],
    "transformer_depths": [2],
    "latent_dim": LATENT_DIM,
    "dim_heads": 16,
    "differential": True,
    "variable_stride": True,
    "chunk_size": 32,
    "chunk_midpoint_shift": True,
    "conv_mapping": True,
    "ff_mult": 3,
}

#: A Hub-style model_config.json of the demo model (the same schema as the real checkpoints).
DEMO_CONFIG = {
    "model_type": "diffusion_cond_inpaint",
    "sample_rate": 44100,
    "sample_size": 2097152,  # 512 latents: up to 47.5 s
    "audio_channels": 2,
    "model": {
        "io_channels": LATENT_DIM,
        "pretransform": {
            "type": "autoencoder",
            "config": {
                "latent_dim": LATENT_DIM,
                "downsampling_ratio": 4096,
                "io_channels": 2,
                "encoder": {"type": "same", "config": {**_SAME_BLOCK, "in_channels": 512}},
                "decoder": {"type": "same", "config": {**_SAME_BLOCK, "out_channels": 512, "sinusoidal_blocks": [0]}},
                "bottleneck": {"type": "softnorm", "config": {"dim": LATENT_DIM, "auto_scale": True}},
                "pretransform": {"type": "patched", "config": {"channels": 2, "patch_size": 256}},
            },
        },
        "conditioning": {
            "cond_dim": COND_DIM,
            "configs": [
                {"id": "prompt", "type": "t5gemma", "config": {"max_length": 32, "padding_mode": "learned"}},
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
                "io_channels": LATENT_DIM,
                "patch_size": 1,
                "embed_dim": 64,
                "depth": 2,
                "num_heads": 2,
                "cond_token_dim": COND_DIM,
                "global_cond_dim": COND_DIM,
                "local_add_cond_dim": LATENT_DIM + 1,
                "transformer_type": "continuous_transformer",
                "global_cond_type": "adaLN",
                "timestep_features_type": "expo",
                "timestep_features_dim": 256,
                "attn_kwargs": {"qk_norm": "rms", "differential": False},
                "norm_type": "rms_norm",
                "norm_kwargs": {"force_fp32": True},
                "ff_kwargs": {"mult": 4.0},
                "num_memory_tokens": 4,
            },
        },
    },
}

DEMO_TEXT_CONFIG = {
    "encoder": {
        "hidden_size": COND_DIM,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "intermediate_size": 128,
        "vocab_size": 512,
        "rms_norm_eps": 1e-6,
        "query_pre_attn_scalar": 32,
        "attn_logit_softcapping": 50.0,
        "hidden_activation": "gelu_pytorch_tanh",
    }
}
DEMO_TOKENIZER_CONFIG = {
    "padding_side": "right",
    "add_bos_token": False,
    "add_eos_token": False,
    "pad_token": "<pad>",
    "eos_token": "<eos>",
    "bos_token": "<bos>",
    "unk_token": "<unk>",
}
_CORPUS = (
    "warm analog synth pad with slow attack",
    "lo-fi hip hop beat with vinyl crackle, 90 bpm",
    "rain on a tin roof, distant thunder, city ambience at night",
    "solo piano, gentle and melancholic, jazz trio with brushed drums",
    "electric guitar riff, heavy distortion, drum fill, bass groove",
    "birds singing in a forest at dawn, footsteps on gravel, a door creaks",
)


def train_tokenizer(directory: Path) -> None:
    """A tiny sentencepiece BPE model with Gemma's special ids (pad 0, eos 1, bos 2, unk 3)."""
    import sentencepiece as spm

    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS * 4),
        model_writer=proto,
        vocab_size=DEMO_TEXT_CONFIG["encoder"]["vocab_size"],
        model_type="bpe",
        byte_fallback=True,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        num_threads=1,
        minloglevel=2,
    )
    (directory / "tokenizer.model").write_bytes(proto.getvalue())
    (directory / "tokenizer_config.json").write_text(json.dumps(DEMO_TOKENIZER_CONFIG))


# Compatibility names: the full-size presets live in mlx_sa3.checkpoint (used by benchmarks/).
FULL_TEXT_CONFIG = FULL_SIZE_TEXT_CONFIG
full_size_parts = full_size_configs


def random_model(
    sa3: SA3Config,
    dit_config: DiTConfig,
    same_config: SAMEConfig,
    text_config: T5GemmaConfig,
    dtype=None,
    seed: int = 0,
) -> SA3Model:
    """An SA3 model with random weights drawn from ``seed`` (it reseeds MLX's global generator).

    The tokenizer is a small sentencepiece model trained on the spot; its ids fit any vocabulary of 512 or more.
    """
    dtype = parse_dtype(dtype) or default_dtype()
    mx.random.seed(seed)
    dit = DiT(dit_config)
    # zero-initialised memory tokens would make that part of the network inert
    dit.memory_tokens = mx.random.normal(dit.memory_tokens.shape) * 0.02
    dit.set_dtype(dtype)
    autoencoder = SAMEAutoencoder(same_config)
    encoder = T5GemmaEncoder(text_config)
    encoder.set_dtype(dtype)
    with tempfile.TemporaryDirectory(prefix="mlx_sa3_tokenizer_") as tmp:
        train_tokenizer(Path(tmp))
        tokenizer = T5GemmaTokenizer.from_dir(tmp, sa3.prompt_max_length)
    dim = sa3.cond_dim
    conditioners = Conditioners(
        {
            Conditioners.PADDING: mx.random.normal((dim,)),
            Conditioners.SECONDS_W: mx.random.normal((dim, 256)) / 16,
            Conditioners.SECONDS_B: mx.zeros((dim,)),
        },
        sa3,
    )
    model = SA3Model(sa3, dit, autoencoder, TextEncoder(encoder, tokenizer), conditioners)
    mx.eval(dit.parameters(), autoencoder.parameters(), encoder.parameters())
    return model


def demo_model(dtype=None, backend: str = "mlx", seed: int = 0, weights_dtype=None) -> SA3Model:
    """The demo model (see the module docstring), weights drawn from ``seed``; the same weights on either backend.

    ``weights_dtype`` (MLX): how the DiT's and text encoder's linear weights are held (:mod:`mlx_sa3.storage`).
    """
    check_backend(backend)
    check_weights_dtype(weights_dtype, dtype, backend)
    config = CheckpointConfig.from_dict(DEMO_CONFIG)
    model = random_model(
        config.sa3,
        config.dit,
        config.same,
        T5GemmaConfig.from_dict(DEMO_TEXT_CONFIG),
        "float32" if backend == "torch" else dtype,
        seed,
    )
    if backend == "torch":
        return to_torch_backend(model, dtype)
    storage = storage_dtype(model.dit.dtype, weights_dtype)
    if storage != model.dit.dtype:
        narrow_linears(model.dit, storage, keep=QUANTIZE_KEEP)
        narrow_linears(model.text_encoder.model, storage)
        mx.eval(model.dit.parameters(), model.text_encoder.model.parameters())
    return model


def to_torch_backend(model: SA3Model, dtype=None) -> SA3Model:
    """The same model with its three networks moved to torch (CPU; the DiT and text encoder compute in ``dtype``,
    float32 by default or bfloat16; SAME in float32)."""
    dit, autoencoder, text_encoder = move_networks(model.dit, model.autoencoder, model.text_encoder, "torch", dtype)
    return SA3Model(model.config, dit, autoencoder, text_encoder, model.conditioners, model.source)
