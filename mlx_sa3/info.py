"""``python -m mlx_sa3.info``: what MLX runs on here, which BLAS it uses, the torch backend and how fast a GEMM is.

The platform rows come from :mod:`mlx_sa3.platform` (the lowest layer); the torch backend row from
:mod:`mlx_sa3.backend`, the only module that may reach the torch backend.
"""

from .platform import describe, gemm_gflops


def main(argv=None) -> None:
    from . import backend, platform

    platform.main(argv, more=lambda: {"torch": backend.describe_torch()})


__all__ = ["describe", "gemm_gflops", "main"]

if __name__ == "__main__":
    main()
