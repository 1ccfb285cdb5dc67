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
        bf16 = backend.torch_gemm_gflops(args.size, dtype="bfloat16")
        how = f"n={args.size}, as the torch backend runs them"
        print(f"{'torch':>9}: {rate:.1f} GFLOP/s fp32 GEMM, {bf16:.1f} GFLOP/s bf16 ({how})")
    print(f"{'bf16':>9}: {_bf16_units()}")
    name, reason = backend.choose_backend()
    print(f"{'auto':>9}: --backend auto runs {name} ({reason})")


def _bf16_units() -> str:
    """Whether the CPU has bfloat16 matrix instructions (``--dtype bfloat16`` on torch pays off where it does)."""
    from .cpu_kernels import cpu_flags
    from .platform import BF16_MATMUL_FLAGS, has_fast_bf16_matmul

    if not has_fast_bf16_matmul():
        return "no bfloat16 matrix instructions found (torch --dtype bfloat16 runs far slower than float32 here)"
    found = sorted(set(BF16_MATMUL_FLAGS) & cpu_flags())
    return f"CPU has bfloat16 matrix instructions ({', '.join(found)}): fast for --backend torch --dtype bfloat16"


__all__ = ["describe", "gemm_gflops", "main"]

if __name__ == "__main__":
    main()
