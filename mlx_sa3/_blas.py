"""Load an optimized BLAS before MLX on Linux.

MLX's Linux CPU wheel links against the reference BLAS (about 4 GFLOP/s on this class of machine). Its symbols
are resolved through the global namespace, so loading the system OpenBLAS with ``RTLD_GLOBAL`` *before* the
first ``import mlx`` makes every MLX GEMM use OpenBLAS instead (about 150 GFLOP/s on two cores).

Set ``MLX_SA3_NO_OPENBLAS=1`` to keep the bundled BLAS (for comparisons), or ``MLX_SA3_BLAS=/path/lib.so`` to
choose the library.
"""

from __future__ import annotations

import ctypes
import os
import sys

_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
)

#: path of the BLAS library loaded here, or None when MLX uses whatever it was linked with
loaded_blas: str | None = None
#: why no optimized BLAS was loaded (empty when one was)
skipped_reason: str = ""


def preload() -> str | None:
    """Load OpenBLAS globally if we are on Linux, MLX is not imported yet and the user did not opt out."""
    global loaded_blas, skipped_reason
    if loaded_blas is not None:
        return loaded_blas
    if not sys.platform.startswith("linux"):
        skipped_reason = "not Linux (MLX uses Accelerate/Metal)"
        return None
    if os.environ.get("MLX_SA3_NO_OPENBLAS", "") not in ("", "0"):
        skipped_reason = "disabled by MLX_SA3_NO_OPENBLAS"
        return None
    if "mlx.core" in sys.modules:
        skipped_reason = "mlx was imported before mlx_sa3; import mlx_sa3 first to use OpenBLAS"
        return None
    wanted = os.environ.get("MLX_SA3_BLAS")
    for path in ([wanted] if wanted else _CANDIDATES):
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
            except OSError as err:  # a broken library must not stop the import: fall back to the bundled BLAS
                skipped_reason = f"could not load {path}: {err}"
                continue
            loaded_blas = path
            skipped_reason = ""
            return path
    skipped_reason = "no OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    return None
