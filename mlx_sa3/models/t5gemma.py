"""T5Gemma text encoder (encoder half only) and its sentencepiece tokenizer.

Stable Audio 3 conditions on the ``last_hidden_state`` of the ``google/t5gemma-b-b-ul2`` encoder, run on the prompt
tokenized with right padding to the prompt conditioner's ``max_length``. The architecture is Gemma-2's: embeddings
scaled by sqrt(hidden), "sandwich" RMSNorms with ``(1 + w)`` gains, full-width RoPE, attention-logit soft-capping and
a GeGLU (tanh) MLP, here with bidirectional attention over the valid (non-padded) keys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..loading import CheckpointError, parsed_config, read_json, sanitize_checked
from ..options import at_least
from .kernels import gelu_tanh, masked_softmax, tanh
from .tokenizer import TOKENIZER_CONFIG_FILE, TOKENIZER_FILE, T5GemmaTokenizer  # noqa: F401

ENCODER_PREFIX = "encoder."
WEIGHTS_FILE = "model.safetensors"

ACTIVATIONS = {
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_tanh": gelu_tanh,
    "gelu": nn.gelu,
}


@dataclass
class T5GemmaConfig:
    """Encoder hyper-parameters, read from the ``encoder`` section of a T5Gemma ``config.json``."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0
    attn_logit_softcapping: float | None = 50.0
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    sliding_window: int | None = 4096
    layer_types: list[str] = field(default_factory=list)

    def __post_init__(self):
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):  # a malformed config fails here in one line, not as a division by zero while building
            setattr(self, name, at_least(getattr(self, name), 1, f"T5Gemma {name}"))
        if not self.layer_types:
            # transformers' default for T5Gemma: sliding window on even layers, full attention on odd ones.
            self.layer_types = [
                "full_attention" if i % 2 else "sliding_attention" for i in range(self.num_hidden_layers)
            ]
        if len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
        unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"unsupported T5Gemma layer types: {sorted(unknown)}")
        if self.hidden_activation not in ACTIVATIONS:
            raise ValueError(f"unsupported T5Gemma activation {self.hidden_activation!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")

    @classmethod
    def from_dict(cls, d: dict) -> "T5GemmaConfig":
        """Accept a full encoder-decoder config (with an ``encoder`` section) or the encoder section itself."""
        section = dict(d.get("encoder", d))
        # transformers >= 5 nests the RoPE base in rope_parameters; older configs have rope_theta at top level.
        rope = section.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ValueError(f"unsupported RoPE type {rope['rope_type']!r}")
        if "rope_theta" in rope:
            section["rope_theta"] = rope["rope_theta"]
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in section.items() if k in names})

    @classmethod
    def from_dir(cls, directory) -> "T5GemmaConfig":
        """From the text encoder folder's config.json; a config missing its parts is a one-line CheckpointError."""
        path = Path(directory) / "config.json"
        raw = read_json(path)
        try:
            return parsed_config("T5Gemma", lambda: cls.from_dict(raw))
        except CheckpointError as err:
            raise CheckpointError(f"{path}: {err}") from None


class RMSNorm(nn.Module):
    """Gemma RMSNorm: statistics and the ``(1 + w)`` gain in float32, result cast back to the input dtype."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        x32 = x.astype(mx.float32)
        x32 = x32 * mx.rsqrt(mx.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (x32 * (1.0 + self.weight.astype(mx.float32))).astype(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: T5GemmaConfig):
        super().__init__()
        self.n_heads = cfg.num_attention_heads
        self.n_kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.scale = cfg.query_pre_attn_scalar**-0.5
        self.softcap = cfg.attn_logit_softcapping
        self.rope_theta = cfg.rope_theta
        inner, kv_inner = self.n_heads * cfg.head_dim, self.n_kv_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, inner, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_inner, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_inner, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(inner, cfg.hidden_size, bias=cfg.attention_bias)

    def _heads(self, x: mx.array, n: int) -> mx.array:
        b, t, _ = x.shape
        return x.reshape(b, t, n, self.head_dim).transpose(0, 2, 1, 3)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        """``bias``: additive float32 mask broadcastable to (B, heads, T, T), 0 where a key may be attended."""
        b, t, _ = x.shape
        q = self._heads(self.q_proj(x), self.n_heads)
        k = self._heads(self.k_proj(x), self.n_kv_heads)
        v = self._heads(self.v_proj(x), self.n_kv_heads)
        # Non-traditional RoPE rotates the two halves of the head, as transformers' rotate_half does.
        q = mx.fast.rope(q, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        k = mx.fast.rope(k, self.head_dim, traditional=False, base=self.rope_theta, scale=1.0, offset=0)
        if self.n_kv_heads != self.n_heads:
            repeats = self.n_heads // self.n_kv_heads
            k, v = mx.repeat(k, repeats, axis=1), mx.repeat(v, repeats, axis=1)
        # Soft-capping is a tanh on the logits, which fused SDPA cannot express: form the scores explicitly, in fp32.
        scores = (q.astype(mx.float32) @ k.astype(mx.float32).swapaxes(-1, -2)) * self.scale
        if self.softcap is not None:
            scores = tanh(scores, 1.0 / self.softcap) * self.softcap
        probs = masked_softmax(scores, bias).astype(v.dtype)
        out = (probs @ v).transpose(0, 2, 1, 3).reshape(b, t, -1)
        return self.o_proj(out)


class MLP(nn.Module):
    def __init__(self, cfg: T5GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.act = ACTIVATIONS[cfg.hidden_activation]

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: T5GemmaConfig):
        super().__init__()
        eps = cfg.rms_norm_eps
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.pre_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps)

    def __call__(self, x: mx.array, bias: mx.array) -> mx.array:
        x = x + self.post_self_attn_layernorm(self.self_attn(self.pre_self_attn_layernorm(x), bias))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class T5GemmaEncoder(nn.Module):
    """The T5Gemma encoder stack; parameter names are transformers' minus the ``encoder.`` prefix."""

    def __init__(self, cfg: T5GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers)]
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def _attention_biases(self, mask: mx.array) -> dict[str, mx.array]:
        """Additive fp32 masks per layer type, from the (B, T) key mask.

        A masked key gets the most negative finite float (as transformers' eager path does), not -inf: a row with
        every key masked (an empty prompt) then softmaxes to uniform weights instead of NaN.
        """
        t = mask.shape[1]
        neg = mx.array(np.finfo(np.float32).min, dtype=mx.float32)
        zero = mx.array(0.0, dtype=mx.float32)
        keys = mask[:, None, None, :]
        biases = {"full_attention": mx.where(keys, zero, neg)}
        if "sliding_attention" in self.config.layer_types:
            window = self.config.sliding_window
            if window is None or window >= t - 1:  # every |i - j| fits in the window: same as full attention
                biases["sliding_attention"] = biases["full_attention"]
            else:
                pos = mx.arange(t)
                near = mx.abs(pos[:, None] - pos[None, :]) <= window
                biases["sliding_attention"] = mx.where(keys & near, zero, neg)
        return biases

    def __call__(self, input_ids: mx.array, mask: mx.array) -> mx.array:
        """input_ids (B, T) int, mask (B, T) bool (True = real token) -> last hidden state (B, T, hidden)."""
        dtype = self.norm.weight.dtype  # every weight has the model dtype (the embedding may have no array)
        # transformers multiplies by sqrt(hidden) rounded to the model dtype (27.75 in bf16): do the same.
        normalizer = mx.array(math.sqrt(self.config.hidden_size), dtype=dtype)
        x = self.embed_tokens(input_ids) * normalizer
        biases = self._attention_biases(mask.astype(mx.bool_))
        for layer, kind in zip(self.layers, self.config.layer_types):
            x = layer(x, biases[kind])
        return self.norm(x)


def sanitize(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Keep the encoder of a transformers T5Gemma checkpoint, renamed to this module's names (see ``dropped``)."""
    return {k[len(ENCODER_PREFIX) :]: v for k, v in weights.items() if k.startswith(ENCODER_PREFIX)}


def dropped(weights: dict[str, mx.array]) -> list[str]:
    """The tensors ``sanitize`` drops (decoder, LM head, ...), listed for reporting."""
    return sorted(k for k in weights if not k.startswith(ENCODER_PREFIX))


def load_weights(model: T5GemmaEncoder, weights: dict[str, mx.array], dtype=mx.float32) -> T5GemmaEncoder:
    """Strictly match sanitized ``weights`` against ``model`` and load them cast to ``dtype``."""
    sanitize_checked(weights, None, model, "T5Gemma encoder checkpoint")
    model.load_weights([(k, v.astype(dtype)) for k, v in weights.items()], strict=True)
    mx.eval(model.parameters())
    return model


class TextEncoder:
    """Tokenizer + encoder: prompts -> (hidden states, mask), as the official prompt conditioner computes them
    before it replaces padded positions by its learned padding embedding."""

    def __init__(self, model: T5GemmaEncoder, tokenizer: T5GemmaTokenizer):
        self.model = model
        self.tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def encode(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """-> (hidden float32 (B, max_length, hidden), mask bool (B, max_length)); padded rows are not replaced."""
        ids, mask = self.tokenizer(prompts)
        mask = mx.array(mask)
        hidden = self.model(mx.array(ids), mask).astype(mx.float32)
        return hidden, mask
