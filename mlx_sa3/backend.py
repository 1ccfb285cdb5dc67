"""The one place that chooses a compute backend: every loader of a network on "mlx" or "torch" goes through here.

The torch backend (:mod:`mlx_sa3.torch_backend`) is imported only here, and only when asked for, so importing
mlx_sa3 never imports torch. A backend provides the three networks behind the MLX interfaces (see
docs/ARCHITECTURE.md, "Backends"); conditioning, guidance and samplers stay the shared code.
"""

from __future__ import annotations

import mlx.core as mx

from . import checkpoint
from .loading import BACKENDS, Source, check_backend, open_source, parse_dtype  # noqa: F401  (BACKENDS: public)


def default_dtype() -> mx.Dtype:
    """Half precision where MLX has fast half matmuls (Metal), float32 on the CPU backend."""
    return mx.float16 if mx.metal.is_available() and mx.default_device() == mx.gpu else mx.float32


def _torch_backend():
    from . import torch_backend

    return torch_backend


def describe_torch() -> str:
    """The torch backend's version and threads, or why it is unavailable (for ``python -m mlx_sa3.info``)."""
    return _torch_backend().describe_torch()


def _open(src) -> Source:
    return src if isinstance(src, Source) else open_source(src)


def load_dit(src, dtype=None, backend: str = "mlx"):
    """The DiT of a full SA3 checkpoint on ``backend`` (MLX: ``dtype`` or the device default; torch: float32)."""
    check_backend(backend)
    source = _open(src)
    if backend == "torch":
        return _torch_backend().load_torch_dit(source, dtype)
    return checkpoint.load_dit(source, dtype=parse_dtype(dtype) or default_dtype())


def load_text_encoder(src, max_length: int, dtype=None, backend: str = "mlx"):
    """The T5Gemma text encoder (with its tokenizer) of a full SA3 checkpoint on ``backend``."""
    check_backend(backend)
    source = _open(src)
    if backend == "torch":
        return _torch_backend().load_torch_text_encoder(source, max_length)
    return checkpoint.load_mlx_text_encoder(source, max_length, dtype=parse_dtype(dtype) or default_dtype())


def load_autoencoder(src, dtype=None, backend: str = "mlx"):
    """Load a SAME autoencoder from a SAME repo, a full SA3 repo (its pretransform) or a converted directory.

    ``src`` is a local directory, a Hub repo id or an opened ``loading.Source``. ``dtype`` (default float32)
    applies to the encoder; the bottleneck and decoder stay float32 because SAME's differential attention cancels
    badly in half precision. ``backend="torch"`` returns the torch CPU counterpart (same interface, float32).
    """
    check_backend(backend)
    source = _open(src)
    if backend == "torch":
        return _torch_backend().load_torch_autoencoder(source)
    return checkpoint.load_mlx_autoencoder(source, dtype)


def move_networks(dit, autoencoder, text_encoder, backend: str):
    """MLX networks -> the same weights on ``backend`` (``(dit, autoencoder, text_encoder)``)."""
    check_backend(backend)
    if backend == "mlx":
        return dit, autoencoder, text_encoder
    tb = _torch_backend()
    return (
        tb.torch_dit_from_mlx(dit),
        tb.torch_autoencoder_from_mlx(autoencoder),
        tb.torch_text_encoder_from_mlx(text_encoder),
    )
