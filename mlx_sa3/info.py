"""``python -m mlx_sa3.info``: what MLX runs on here, which BLAS it uses, the torch backend and how fast a GEMM is.

The platform rows come from :mod:`mlx_sa3.platform` (the lowest layer); the torch backend row from
:mod:`mlx_sa3.backend`, the only module that may reach the torch backend.
"""

from .platform import describe, gemm_gflops


def main(argv=None) -> None:
    from . import backend, platform

    args = platform.main(argv, more=lambda: {"torch": backend.describe_torch()}, add_arguments=_add_arguments)
    rate = backend.torch_gemm_gflops(args.size)
    if rate is not None:
        how = f"n={args.size}, as the torch backend runs them"
        print(f"{'torch':>9}: {rate:.1f} GFLOP/s fp32 GEMM, {_torch_bf16_rate(backend, args.size)}; {how}")
    print(f"{'bf16':>9}: {_bf16_units()}")
    if args.measure_backends:
        _measure(backend)
    name, reason = backend.choose_backend()
    print(f"{'auto':>9}: --backend auto runs {name} ({reason})")


def _torch_bf16_rate(backend, size: int) -> str:
    """torch's bfloat16 GEMM rate, timed only where the CPU has bfloat16 matrix instructions: without them it runs at
    well under 1 GFLOP/s (0.2 on an AVX2 AMD EPYC), so one n = 2048 product alone would take over a minute."""
    from .platform import has_fast_bf16_matmul

    if not has_fast_bf16_matmul():
        return "bf16 not timed (no bfloat16 matrix instructions)"
    return f"{backend.torch_gemm_gflops(size, dtype='bfloat16'):.1f} GFLOP/s bf16"


def _add_arguments(parser) -> None:
    parser.add_argument(
        "--measure-backends",
        action="store_true",
        help="time a DiT step on MLX and on torch here and keep the result for --backend auto (about 15 s; needs "
        "the torch extra)",
    )


def _measure(backend) -> None:
    """Measure both backends and store the result; a failure is one line on stderr, exit status 2."""
    import sys

    try:
        result = backend.measure_backends()
        path = backend.save_measurement(result)
    except (ImportError, OSError, ValueError, RuntimeError) as err:
        print(f"error: --measure-backends: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    steps = f"MLX {result['mlx_step_s'] * 1e3:.0f} ms, torch {result['torch_step_s'] * 1e3:.0f} ms"
    print(f"{'measured':>9}: DiT step ({result['depth']} blocks, {result['tokens']} tokens): {steps}; kept in {path}")


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
