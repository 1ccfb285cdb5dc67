"""``python -m mlx_sa3.info``: what MLX runs on here, which BLAS it uses and how fast a GEMM is.

Compatibility entry point: the code lives in :mod:`mlx_sa3.platform`.
"""

from .platform import describe, gemm_gflops, main

__all__ = ["describe", "gemm_gflops", "main"]

if __name__ == "__main__":
    main()
