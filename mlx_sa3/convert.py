"""``python -m mlx_sa3.convert SRC OUT``: convert a Hub checkpoint once into the mlx_sa3 layout.

A thin entry point (and compatibility alias of the old module): the converter lives in :mod:`mlx_sa3.converter`.
"""

import sys

from . import _compat
from .converter import core, diffusers, safetensors_io
from .converter.core import main

_compat.reexport(globals(), safetensors_io, diffusers, core)
del _compat

if __name__ == "__main__":
    sys.exit(main())
