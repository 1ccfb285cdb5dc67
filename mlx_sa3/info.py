"""``python -m mlx_sa3.info``: what MLX runs on here, which BLAS it uses, the torch backend and how fast a GEMM is.

The platform rows come from :mod:`mlx_sa3.platform` (the lowest layer); the torch backend row from
:mod:`mlx_sa3.backend`, the only module that may reach the torch backend.
"""

from .platform import describe, gemm_gflops


def main(argv=None) -> None:
    from . import backend, platform

    args = platform.main(argv, more=lambda: {"torch": backend.describe_torch()})
    rate = backend.torch_gemm_gflops(args.size)
    if rate is not None:
        print(f"{'torch':>9}: {rate:.1f} GFLOP/s fp32 GEMM (n={args.size}, as the torch backend runs it)")
    name, reason = backend.choose_backend()
    print(f"{'auto':>9}: --backend auto runs {name} ({reason})")


__all__ = ["describe", "gemm_gflops", "main"]

if __name__ == "__main__":
    main()
