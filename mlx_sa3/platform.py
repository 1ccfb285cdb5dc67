"""The platform: which BLAS MLX uses on Linux, how torch shares the cores with it, and ``python -m mlx_sa3.info``.

MLX's Linux CPU wheel links against the reference BLAS (about 4 GFLOP/s on this class of machine). Its symbols
are resolved through the global namespace, so loading the system OpenBLAS with ``RTLD_GLOBAL`` *before* the
first ``import mlx`` makes every MLX GEMM use OpenBLAS instead (about 150 GFLOP/s on two cores).

Set ``MLX_SA3_NO_OPENBLAS=1`` to keep the bundled BLAS (for comparisons), or ``MLX_SA3_BLAS=/path/lib.so`` to
choose the library. This module must not import mlx at import time.

Kernel set: unless the user set ``OPENBLAS_CORETYPE``, the preload sets it from the CPU flags
(:func:`mlx_sa3.cpu_kernels.choose_openblas_coretype`) only while the library loads (OpenBLAS reads it once, at
load), so other OpenBLAS copies such as numpy's keep their own choice. ``MLX_SA3_OPENBLAS_CORETYPE=0`` leaves the
choice to OpenBLAS. ``python -m mlx_sa3.info`` names the kernel set in use.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import platform
import sys
import time

from . import cli

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
#: the OPENBLAS_CORETYPE mlx_sa3 set while loading the library (None: the user's or OpenBLAS's own choice)
chosen_coretype: str | None = None


def _coretype_for(path: str) -> str | None:
    """The core type to request for the OpenBLAS at ``path``, or None to leave it (user's variable, opt-out)."""
    if "OPENBLAS_CORETYPE" in os.environ or os.environ.get("MLX_SA3_OPENBLAS_CORETYPE", "") == "0":
        return None
    from .cpu_kernels import choose_openblas_coretype, cpu_flags, openblas_version_from_path

    if "openblas" not in os.path.basename(os.path.realpath(path)).lower():
        return None
    return choose_openblas_coretype(cpu_flags(), openblas_version_from_path(path))


def _load_global(path: str) -> None:
    """``dlopen(path, RTLD_GLOBAL)`` with OPENBLAS_CORETYPE set from the CPU flags for the duration of the load."""
    global chosen_coretype
    coretype = _coretype_for(path)
    if coretype is not None:
        os.environ["OPENBLAS_CORETYPE"] = coretype
    try:
        ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    finally:
        if coretype is not None:
            del os.environ["OPENBLAS_CORETYPE"]
    chosen_coretype = coretype


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
    if wanted and not os.path.exists(wanted):
        skipped_reason = f"{wanted} does not exist"
        return None
    for path in [wanted] if wanted else _CANDIDATES:
        if os.path.exists(path):
            try:
                _load_global(path)
            except OSError as err:  # a broken library must not stop the import: fall back to the bundled BLAS
                skipped_reason = f"could not load {path}: {err}"
                continue
            loaded_blas = path
            skipped_reason = ""
            return path
    skipped_reason = "no OpenBLAS found (Debian/Ubuntu: apt-get install libopenblas0-pthread)"
    return None


def blas_warning() -> str | None:
    """A warning when the BLAS that ``MLX_SA3_BLAS`` asks for is not the one in use (None when all is well)."""
    wanted = os.environ.get("MLX_SA3_BLAS")
    if not wanted or loaded_blas == wanted:
        return None
    return (
        f"MLX_SA3_BLAS={wanted} was not loaded ({skipped_reason or 'unknown reason'}); "
        "MLX uses its bundled reference BLAS, whose matmuls are many times slower"
    )


#: torch's own intra-op thread count before :func:`torch_thread_policy` changed it (None until torch is imported)
torch_default_threads: int | None = None
_threads_overridden = 0  # depth of torch_threads() blocks that set their own count (the policy leaves it then)


def torch_thread_policy(torch) -> None:
    """Run torch's own ops on one thread when mlx_sa3 preloaded OpenBLAS.

    The globally loaded OpenBLAS also serves torch's GEMMs, with its own thread pool; torch's intra-op threads spin
    between ops and fight those threads for the cores, which made a DiT step about 7x slower on two cores. With
    torch single-threaded the GEMMs still use every core through OpenBLAS.
    """
    global torch_default_threads
    if torch_default_threads is None:
        torch_default_threads = torch.get_num_threads()
    if loaded_blas is not None and not _threads_overridden and torch.get_num_threads() != 1:
        torch.set_num_threads(1)


@contextlib.contextmanager
def torch_threads(torch, threads: int | None):
    """Run a block with torch on ``threads`` intra-op threads (None: as the policy left it), restoring them after.

    For computations whose GEMMs torch runs itself rather than through the preloaded OpenBLAS (bfloat16: oneDNN),
    which then need torch's threads; nothing else competes for the cores meanwhile.
    """
    global _threads_overridden
    before = torch.get_num_threads()
    if threads is None:
        yield
        return
    if threads != before:
        torch.set_num_threads(threads)
    _threads_overridden += 1
    try:
        yield
    finally:
        _threads_overridden -= 1
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


#: CPU flags (Linux /proc/cpuinfo) of bfloat16 matrix instructions that torch's oneDNN GEMMs use
BF16_MATMUL_FLAGS = ("amx_bf16", "avx512_bf16")


def has_fast_bf16_matmul(flags: set[str] | None = None, machine: str | None = None) -> bool:
    """Whether this CPU has bfloat16 matrix instructions, so torch's bfloat16 GEMMs outrun float32 (AMX-BF16 or
    AVX512-BF16 on Linux x86-64; measured here: 1370 vs 231 GFLOP/s). ``flags`` / ``machine``: for tests.

    False elsewhere (no flags to read, or other architectures: Apple Silicon runs MLX on its GPU).
    """
    machine = (machine or platform.machine()).lower()
    if machine not in ("x86_64", "amd64"):
        return False
    if flags is None:
        if not sys.platform.startswith("linux"):
            return False
        from .cpu_kernels import cpu_flags

        flags = cpu_flags()
    return any(flag in flags for flag in BF16_MATMUL_FLAGS)


_libc = None


def trim_heap() -> bool:
    """Give the C heap's free pages back to the system (glibc ``malloc_trim``); False where there is no glibc.

    Freed tensors and MLX buffers go back to malloc, which keeps them for reuse; once a network is released its
    stage is over, so they are returned instead of staying under the next stage's peak (cheap: milliseconds).
    """
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim.argtypes = [ctypes.c_size_t]
        except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim this way
            _libc = False
    return bool(_libc) and bool(_libc.malloc_trim(0))


# -- python -m mlx_sa3.info -------------------------------------------------------------------------------------


def gemm_gflops(n: int = 2048, dtype=None, repeats: int = 5) -> float:
    """Best-of-``repeats`` rate of an n x n x n matmul in GFLOP/s on the default device."""
    import mlx.core as mx

    dtype = mx.float32 if dtype is None else dtype
    a = mx.random.normal((n, n)).astype(dtype)
    b = mx.random.normal((n, n)).astype(dtype)
    mx.eval(a, b, a @ b)  # warm-up (BLAS thread start, Metal kernel compile)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def openblas_corename() -> str | None:
    """The kernel set the loaded OpenBLAS runs (``openblas_get_corename``), None without an OpenBLAS."""
    if loaded_blas is None:
        return None
    try:
        get = ctypes.CDLL(loaded_blas).openblas_get_corename
    except (OSError, AttributeError):  # not an OpenBLAS (e.g. MKL through MLX_SA3_BLAS)
        return None
    get.restype = ctypes.c_char_p
    return get().decode()


_blas = None


def _openblas():
    """The preloaded OpenBLAS (ctypes), or None (none preloaded, or it lacks the thread calls)."""
    global _blas
    if _blas is None:
        _blas = False
        if loaded_blas is not None:
            try:
                lib = ctypes.CDLL(loaded_blas)
                lib.openblas_get_num_threads.restype = ctypes.c_int
                lib.openblas_set_num_threads.argtypes = [ctypes.c_int]
                _blas = lib
            except (OSError, AttributeError):
                pass
    return _blas or None


@contextlib.contextmanager
def blas_threads(threads: int):
    """Run a block with the preloaded OpenBLAS on ``threads`` threads, restoring its count after (nothing to do
    without one)."""
    lib = _openblas()
    before = lib.openblas_get_num_threads() if lib else None
    if lib and before != threads:
        lib.openblas_set_num_threads(threads)
    try:
        yield
    finally:
        if lib and before != threads:
            lib.openblas_set_num_threads(before)


def describe() -> dict:
    import mlx.core as mx

    return {
        "mlx": mx.__version__,
        "device": str(mx.default_device()),
        "metal": bool(mx.metal.is_available()),
        "platform": platform.platform(),
        "blas": loaded_blas or f"MLX default ({skipped_reason or 'bundled'})",
        "kernels": _kernels_line(),
    }


def _kernels_line() -> str:
    name = openblas_corename()
    if name is None:
        return "-"
    how = (
        f"OPENBLAS_CORETYPE={chosen_coretype} set by mlx_sa3 from the CPU flags"
        if chosen_coretype
        else (
            f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} (user)"
            if "OPENBLAS_CORETYPE" in os.environ
            else "OpenBLAS's own choice"
        )
    )
    return f"{name} ({how})"


MAX_GEMM_SIZE = 16384  # three n x n float32 matrices: 3 GiB; beyond, the measurement itself can exhaust memory


def main(argv=None, more=None, add_arguments=None) -> argparse.Namespace:
    """The report; ``more()`` adds rows from the layers above (``mlx_sa3.info`` adds the torch backend's), and
    ``add_arguments(parser)`` their options."""
    parser = cli.ArgumentParser(
        prog="python -m mlx_sa3.info", description="What MLX runs on here, which BLAS it uses and how fast a GEMM is."
    )
    parser.add_argument(
        "--size",
        type=cli.whole_number_in(1, MAX_GEMM_SIZE),
        default=2048,
        help="GEMM size n for the n x n x n rate (default 2048)",
    )
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    if blas_warning():
        print(f"warning: {blas_warning()}", file=sys.stderr)
    for key, value in {**describe(), **(more() if more else {})}.items():
        print(f"{key:>9}: {value}")
    print(f"{'gemm fp32':>9}: {gemm_gflops(args.size):.1f} GFLOP/s (n={args.size})")
    return args
