"""Compatibility alias: SAME lives in :mod:`mlx_sa3.models.same`; ``load_autoencoder`` in :mod:`mlx_sa3.backend`."""

from . import _compat
from .backend import load_autoencoder  # noqa: F401
from .models import same

_compat.reexport(globals(), same)
del _compat, same
