"""Compatibility alias: T5Gemma lives in :mod:`mlx_sa3.models.t5gemma` (tokenizer: :mod:`mlx_sa3.models.tokenizer`),
``load_text_encoder`` in :mod:`mlx_sa3.checkpoint`."""

from . import _compat
from .checkpoint import load_text_encoder  # noqa: F401
from .models import t5gemma, tokenizer

_compat.reexport(globals(), tokenizer, t5gemma)
del _compat, t5gemma, tokenizer
