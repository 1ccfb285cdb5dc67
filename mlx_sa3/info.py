"""``python -m mlx_sa3.info``: what MLX runs on here, which BLAS it uses and how fast a GEMM is.

Compatibility entry point: the code lives in :mod:`mlx_sa3.platform`.
"""

from . import platform
from .platform import describe, gemm_gflops

__all__ = ["describe", "gemm_gflops", "main"]


def main(argv=None) -> None:
    platform.main(argv)
    from .backend import choose_backend  # the backend seam sits above the platform layer

    name, reason = choose_backend()
    print(f"{'auto':>9}: --backend auto runs {name} ({reason})")


if __name__ == "__main__":
    main()
