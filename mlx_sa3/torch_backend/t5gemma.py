"""The T5Gemma encoder on torch: transformers' ``T5GemmaEncoderModel`` (eager attention)."""

from __future__ import annotations

import mlx.core as mx
from mlx.utils import tree_flatten

from ..checkpoint import text_encoder_weights
from ..loading import Source, open_source
from ..models import t5gemma as mlx_t5
from .common import _load_state, _state_dict, _to_mx, require_torch

_T5GEMMA = "transformers.models.t5gemma"


def _hf_t5gemma(config: mlx_t5.T5GemmaConfig, weights: dict):
    """transformers' T5GemmaEncoderModel (eager attention, encoder-only as the official conditioner builds it)."""
    torch, t5 = require_torch(_T5GEMMA)
    section = {
        "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "intermediate_size": config.intermediate_size,
        "vocab_size": config.vocab_size,
        "rms_norm_eps": config.rms_norm_eps,
        "query_pre_attn_scalar": config.query_pre_attn_scalar,
        "attn_logit_softcapping": config.attn_logit_softcapping,
        "hidden_activation": config.hidden_activation,
        "attention_bias": config.attention_bias,
        "sliding_window": config.sliding_window,
        "layer_types": list(config.layer_types),
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
    }
    hf_config = t5.T5GemmaConfig(
        encoder=section, decoder=dict(section), vocab_size=config.vocab_size, is_encoder_decoder=False
    )
    hf_config._attn_implementation = "eager"
    model = t5.T5GemmaEncoderModel(hf_config)
    _load_state(model, {mlx_t5.ENCODER_PREFIX + k: v for k, v in _state_dict(weights).items()})
    return model.eval().requires_grad_(False)


class TorchTextEncoder:
    """torch counterpart of :class:`mlx_sa3.t5gemma.TextEncoder`, sharing its tokenizer."""

    def __init__(self, config: mlx_t5.T5GemmaConfig, weights: dict, tokenizer: mlx_t5.T5GemmaTokenizer):
        self.model = _hf_t5gemma(config, weights)
        self.tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def encode(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """-> (hidden float32 (B, max_length, hidden), mask bool (B, max_length)); padded rows are not replaced."""
        torch = require_torch()
        ids, mask = self.tokenizer(prompts)
        with torch.inference_mode():
            out = self.model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
            hidden = out.last_hidden_state.float()
        return _to_mx(hidden), mx.array(mask)


def load_torch_text_encoder(source, max_length: int) -> TorchTextEncoder:
    """T5Gemma encoder on torch from a full SA3 checkpoint (Hub layout or converted; directory, repo id or Source)."""
    source = source if isinstance(source, Source) else open_source(source)
    directory = source.text_encoder_dir()
    config = mlx_t5.T5GemmaConfig.from_dir(directory)
    weights = text_encoder_weights(source, mlx_t5.T5GemmaEncoder(config))
    return TorchTextEncoder(config, weights, mlx_t5.T5GemmaTokenizer.from_dir(directory, max_length))


def torch_text_encoder_from_mlx(text_encoder: mlx_t5.TextEncoder) -> TorchTextEncoder:
    model = text_encoder.model
    return TorchTextEncoder(model.config, dict(tree_flatten(model.parameters())), text_encoder.tokenizer)
