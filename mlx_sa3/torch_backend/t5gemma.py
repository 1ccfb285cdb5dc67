"""The T5Gemma encoder on torch: transformers' ``T5GemmaEncoderModel`` (eager attention)."""

from __future__ import annotations

import functools

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from ..checkpoint import EMBEDDING, MappedEmbedding, _memmap_tensor, gather_rows, text_encoder_weights
from ..loading import Source, StoredTensor, TensorRef, open_source
from ..models import t5gemma as mlx_t5
from .common import _load_state, _state_dict, _to_mx, _torch_dtype, check_dtype, compute_threads, require_torch

_T5GEMMA = "transformers.models.t5gemma"


def _hf_t5gemma(config: mlx_t5.T5GemmaConfig, weights: dict, dtype=None):
    """transformers' T5GemmaEncoderModel (eager attention, encoder-only as the official conditioner builds it).

    Built on the meta device (no random init of its 110M parameters) and given ``weights`` in the torch ``dtype``
    (default float32; cast as read); a memory-mapped token embedding (:func:`_mapped_embedding`) replaces the
    256000 x 768 table when the checkpoint file allows it. In bfloat16 (the official conditioner's dtype),
    transformers keeps its RMSNorms, softmax and RoPE angles in float32, as the official code runs it.
    """
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
    weights = dict(weights)
    embedding = _mapped_embedding(weights.get(EMBEDDING), dtype)
    if embedding is not None:
        del weights[EMBEDDING]
    with torch.device("meta"):
        model = t5.T5GemmaEncoderModel(hf_config)
    encoder = model.encoder
    encoder.rotary_emb = type(encoder.rotary_emb)(config=encoder.config)  # computed buffers, not in the checkpoint
    if embedding is not None:
        encoder.embed_tokens = embedding
    state = _state_dict(weights, dtype=dtype)
    _load_state(model, {mlx_t5.ENCODER_PREFIX + k: v for k, v in state.items()})
    return model.eval().requires_grad_(False)


def _mapped_embedding(ref, dtype=None):
    """A ``TorchMappedEmbedding`` over the stored table of ``ref`` (a TensorRef or a numpy memmap) giving rows in
    the torch ``dtype`` (default float32), or None (not a plain mappable tensor)."""
    if isinstance(ref, np.memmap):
        return _mapped_embedding_type()(ref, dtype)
    if not isinstance(ref, TensorRef) or ref.ops or not isinstance(ref.base, StoredTensor):
        return None
    table = _memmap_tensor(ref.base.path, ref.base.name)  # the MLX backend's MappedEmbedding reads the same map
    return None if table is None else _mapped_embedding_type()(table, dtype)


@functools.cache
def _mapped_embedding_type():
    torch = require_torch()

    class TorchMappedEmbedding(torch.nn.Module):
        """torch twin of :class:`mlx_sa3.checkpoint.MappedEmbedding`: the token rows a call needs, gathered from the
        memory-mapped file (:func:`~mlx_sa3.checkpoint.gather_rows`), so the table is never resident; rows in the
        encoder's dtype (float32 unless given)."""

        def __init__(self, table, dtype=None):
            super().__init__()
            self.table = table  # a numpy memmap, not a parameter
            self.dtype = dtype or torch.float32

        def forward(self, ids):
            return torch.from_numpy(gather_rows(self.table, ids.numpy())).to(self.dtype)

    return TorchMappedEmbedding


class TorchTextEncoder:
    """torch counterpart of :class:`mlx_sa3.t5gemma.TextEncoder`, sharing its tokenizer; computes in ``dtype``
    (float32 or bfloat16, :func:`~mlx_sa3.torch_backend.common.check_dtype`), returns float32."""

    def __init__(self, config: mlx_t5.T5GemmaConfig, weights: dict, tokenizer: mlx_t5.T5GemmaTokenizer, dtype=None):
        self.dtype = check_dtype(dtype)
        self._torch_dtype = _torch_dtype(self.dtype)
        self.model = _hf_t5gemma(config, weights, self._torch_dtype)
        self.tokenizer = tokenizer

    @property
    def max_length(self) -> int:
        return self.tokenizer.max_length

    def encode(self, prompts: list[str]) -> tuple[mx.array, mx.array]:
        """-> (hidden float32 (B, max_length, hidden), mask bool (B, max_length)); padded rows are not replaced."""
        torch = require_torch()
        ids, mask = self.tokenizer(prompts)
        with torch.inference_mode(), compute_threads(self._torch_dtype):
            out = self.model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask))
            hidden = out.last_hidden_state.float()
        return _to_mx(hidden), mx.array(mask)


def load_torch_text_encoder(source, max_length: int, dtype=None) -> TorchTextEncoder:
    """T5Gemma encoder on torch from a full SA3 checkpoint (Hub layout or converted; directory, repo id or Source),
    computing in ``dtype`` (float32 by default, or bfloat16)."""
    dtype = check_dtype(dtype)
    source = source if isinstance(source, Source) else open_source(source)
    directory = source.text_encoder_dir()
    config = mlx_t5.T5GemmaConfig.from_dir(directory)
    weights = text_encoder_weights(source, mlx_t5.T5GemmaEncoder(config), refs=True)
    return TorchTextEncoder(config, weights, mlx_t5.T5GemmaTokenizer.from_dir(directory, max_length), dtype)


def torch_text_encoder_from_mlx(text_encoder: mlx_t5.TextEncoder, dtype=None) -> TorchTextEncoder:
    """The same encoder on torch in ``dtype`` (default float32); a memory-mapped MLX embedding
    (``MappedEmbedding``) shares its map."""
    model = text_encoder.model
    weights = dict(tree_flatten(model.parameters()))
    if isinstance(model.embed_tokens, MappedEmbedding):
        weights[EMBEDDING] = model.embed_tokens._table
    return TorchTextEncoder(model.config, weights, text_encoder.tokenizer, dtype)
