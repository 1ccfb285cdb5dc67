"""Convert a Stable Audio 3 / SAME checkpoint into the mlx_sa3 layout: ``python convert.py SRC OUT [--dtype ...]``.

Same as ``python -m mlx_sa3.convert``; see that module for the details.
"""

import sys

from mlx_sa3.convert import main

if __name__ == "__main__":
    sys.exit(main())
