"""PyTorch CPU fallback: the three networks of SA3 (SAME autoencoder, DiT, T5Gemma encoder) computed by torch in
float32 (the DiT and T5Gemma optionally in bfloat16, ``dtype="bfloat16"``), behind exactly the interface of their MLX
counterparts.

Only the networks change backend; conditioning, guidance (:mod:`mlx_sa3.models.diffusion`) and samplers stay the
shared code. Import it through :mod:`mlx_sa3.backend`; importing it does not import torch (every torch import goes
through :func:`require_torch`). How it differs from diffusers and the official code: docs/ARCHITECTURE.md.
"""

from .common import INSTALL_HINT, describe_torch, require_torch
from .dit import TorchDiT, TorchPrepared, _dit_state, load_torch_dit, torch_dit_from_mlx
from .same import TorchAutoencoder, load_torch_autoencoder, torch_autoencoder_from_mlx
from .t5gemma import TorchTextEncoder, load_torch_text_encoder, torch_text_encoder_from_mlx

__all__ = [
    "INSTALL_HINT",
    "TorchAutoencoder",
    "TorchDiT",
    "TorchPrepared",
    "TorchTextEncoder",
    "describe_torch",
    "load_torch_autoencoder",
    "load_torch_dit",
    "load_torch_text_encoder",
    "require_torch",
    "torch_autoencoder_from_mlx",
    "torch_dit_from_mlx",
    "torch_text_encoder_from_mlx",
    "_dit_state",
]
