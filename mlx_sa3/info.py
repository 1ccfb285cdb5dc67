"""``python -m mlx_sa3.info``: what MLX runs on here, which BLAS it uses and how fast a GEMM is.

Compatibility entry point: the code lives in :mod:`mlx_sa3.platform`.
"""

from . import platform
from .platform import describe, gemm_gflops

__all__ = ["describe", "gemm_gflops", "main"]


def main(argv=None) -> None:
    args = platform.main(argv)
    from .backend import choose_backend, torch_gemm_gflops  # the backend seam sits above the platform layer

    rate = torch_gemm_gflops(args.size)
    if rate is not None:
        print(f"{'torch':>9}: {rate:.1f} GFLOP/s fp32 GEMM (n={args.size}, as the torch backend runs it)")
    name, reason = choose_backend()
    print(f"{'auto':>9}: --backend auto runs {name} ({reason})")


if __name__ == "__main__":
    main()
