"""Compatibility alias: the DiT lives in :mod:`mlx_sa3.models.dit` (kernels in :mod:`mlx_sa3.models.kernels`,
the shared step and guidance in :mod:`mlx_sa3.models.diffusion`), its loader in :mod:`mlx_sa3.checkpoint`."""

from . import _compat
from .checkpoint import load_dit  # noqa: F401
from .models import diffusion, dit, kernels

_compat.reexport(globals(), kernels, diffusion, dit)
del _compat, diffusion, dit, kernels
