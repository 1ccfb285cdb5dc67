"""``python -m mlx_sa3.info``: what MLX runs on here, which BLAS it uses and how fast a GEMM is."""

from __future__ import annotations

import argparse
import platform
import time

from . import _blas

import mlx.core as mx  # noqa: E402  (after mlx_sa3 preloaded the BLAS)


def gemm_gflops(n: int = 2048, dtype=mx.float32, repeats: int = 5) -> float:
    """Best-of-``repeats`` rate of an n x n x n matmul in GFLOP/s on the default device."""
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b, a @ b)  # warm-up (BLAS thread start, Metal kernel compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def describe() -> dict:
    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "platform": platform.platform(),
        "blas": _blas.loaded_blas or f"MLX default ({_blas.skipped_reason or 'bundled'})",
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mlx_sa3.info", description=__doc__)
    parser.add_argument("--size", type=int, default=2048, help="GEMM size n for the n x n x n rate (default 2048)")
    args = parser.parse_args(argv)
    for key, value in describe().items():
        print(f"{key:>9}: {value}")
    print(f"{'gemm fp32':>9}: {gemm_gflops(args.size):.1f} GFLOP/s (n={args.size})")


if __name__ == "__main__":
    main()
