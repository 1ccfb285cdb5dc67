"""The one place that chooses a compute backend: every loader of a network on "mlx" or "torch" goes through here.

The torch backend (:mod:`mlx_sa3.torch_backend`) is imported only here, and only when asked for, so importing
mlx_sa3 never imports torch. A backend provides the three networks behind the MLX interfaces (see
docs/ARCHITECTURE.md, "Backends"); conditioning, guidance and samplers stay the shared code.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import platform
import time
from pathlib import Path

import mlx.core as mx

from . import checkpoint
from .loading import BACKENDS, Source, check_backend, dtype_name, open_source, parse_dtype  # noqa: F401  (BACKENDS: public)
from .storage import storage_dtype


def default_dtype() -> mx.Dtype:
    """Half precision where MLX has fast half matmuls (Metal), float32 on the CPU backend."""
    return mx.float16 if mx.metal.is_available() and mx.default_device() == mx.gpu else mx.float32


AUTO = "auto"
#: what the torch backend needs (the ``torch`` extra)
TORCH_PACKAGES = ("torch", "diffusers", "transformers")


#: What ``--backend auto`` runs on an x86-64 CPU with AVX-512 (:data:`TORCH_FASTER_FLAGS`) and no MLX GPU: the one
#: place to change when measurements do. Measured on a Sapphire-Rapids-class Xeon (one-shot CLI, full-size random
#: small checkpoint, 8 steps, fp32, OpenBLAS preloaded for both; torch/MLX wall, interleaved rounds of
#: ``benchmarks/bench_cli_memory.py --backends torch mlx``): 10 s 0.62x, 30 s 0.68x, 120 s 0.58x, medium 10 s 0.61x.
#: docs/ARCHITECTURE.md ("The torch backend") has the tables.
X86_CPU_BACKEND = "torch"

#: CPU flags under which the torch backend outran MLX: its GEMMs are oneDNN's AVX-512 kernels (250-300 GFLOP/s on
#: the DiT's products against OpenBLAS's 200-220). On an AVX2-only AMD EPYC (fp32 GEMM ~150 GFLOP/s in both) MLX was
#: as fast or faster up to 30 s (torch/MLX wall 1.01-1.14x at 10 s, 1.02-1.05x at 30 s), torch faster only at 120 s
#: (0.86x), and MLX's peak was 15 % lower throughout: there ``auto`` runs MLX.
TORCH_FASTER_FLAGS = ("avx512f",)


def _missing_torch_packages() -> list[str]:
    """The packages of :data:`TORCH_PACKAGES` that are not installed (found without importing them)."""
    return [name for name in TORCH_PACKAGES if importlib.util.find_spec(name) is None]


def choose_backend(flags: set[str] | None = None) -> tuple[str, str]:
    """What ``backend="auto"`` runs here, and why (one line). ``flags``: the CPU's (default /proc/cpuinfo's).

    MLX wherever it has a GPU (Metal on Apple Silicon, CUDA). On an x86-64 CPU, this machine's own measurement when
    ``python -m mlx_sa3.info --measure-backends`` has stored one (:func:`measure_backends`; only for the real
    flags, ``flags=None``); without one, :data:`X86_CPU_BACKEND` (torch, when its packages are installed) on a CPU
    with AVX-512, where it measured faster on every machine tried, and MLX otherwise.
    """
    if mx.metal.is_available() or mx.default_device() == mx.gpu:
        return "mlx", "MLX has a GPU here"
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        return "mlx", f"{machine} CPU without an MLX GPU: MLX (torch was measured faster on x86-64 CPUs only)"
    if X86_CPU_BACKEND == "mlx":
        return "mlx", "x86-64 CPU without an MLX GPU: the MLX backend measured faster here"
    if flags is None:
        from .cpu_kernels import cpu_flags

        measured = _measured_choice()
        if measured is not None:
            return measured
        flags = cpu_flags()
    if not any(flag in flags for flag in TORCH_FASTER_FLAGS):
        return "mlx", (
            "x86-64 CPU without AVX-512: MLX was as fast as torch to 30 s on the AVX2 CPU measured, in less memory; "
            "python -m mlx_sa3.info --measure-backends measures this one"
        )
    missing = _missing_torch_packages()
    if missing:
        return "mlx", f"x86-64 CPU, but the torch backend needs {', '.join(missing)} (pip install 'mlx_sa3[torch]')"
    return "torch", (
        "x86-64 CPU with AVX-512 and no MLX GPU: the torch backend was faster on every such CPU measured; "
        "python -m mlx_sa3.info --measure-backends measures this one"
    )


# -- this machine's measurement (python -m mlx_sa3.info --measure-backends) -----------------------------------------

#: torch is chosen over MLX only when its DiT step measured at most this fraction of MLX's: MLX holds ~10-15 % less
#: memory (the torch stack's imports), so a tie goes to MLX
TORCH_STEP_RATIO = 0.95
MEASUREMENT_FILE = "backend-measurement.json"


def measurement_path() -> Path:
    """Where the measurement is kept: ``$MLX_SA3_CACHE_DIR``, else ``$XDG_CACHE_HOME/mlx_sa3``, else
    ``~/.cache/mlx_sa3``; the file is ``backend-measurement.json``."""
    base = os.environ.get("MLX_SA3_CACHE_DIR")
    if not base:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mlx_sa3"
    return Path(base) / MEASUREMENT_FILE


def machine_key() -> dict:
    """What a measurement holds for: the CPU (model name, flags, cores), the BLAS MLX loaded and both libraries'
    versions. A measurement made under another key is ignored (another machine, BLAS or upgrade)."""
    from . import platform as sa3_platform
    from .cpu_kernels import cpu_flags, cpu_model

    try:
        torch_version = importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        torch_version = None
    return {
        "cpu": cpu_model() or platform.processor(),
        "flags": hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:16],
        "cores": os.cpu_count(),
        "machine": platform.machine().lower(),
        "blas": sa3_platform.loaded_blas,
        "mlx": mx.__version__,
        "torch": torch_version,
    }


def measure_backends(config=None, tokens: int = 236, repeats: int = 3) -> dict:
    """Time one DiT step on MLX and on the torch backend with the same random weights, in one process, interleaved
    (best of ``repeats`` each, after a warm-up): ``{"mlx_step_s", "torch_step_s", "tokens", "depth", "key"}``.

    ``config``: the DiT (default the small model's width with 2 blocks: per-block cost is what differs between the
    backends, and 20 blocks would only take longer); ``tokens``: memory tokens + latents (default 236, the 10 s
    canvas). Needs torch (ImportError with the install hint otherwise).
    """
    import dataclasses

    from .models.dit import DiT, DiTConfig

    tb = _torch_backend()
    tb.require_torch()
    config = config or dataclasses.replace(DiTConfig.small(), depth=2)
    mlx_dit = DiT(config)
    mx.eval(mlx_dit.parameters())
    torch_dit = tb.torch_dit_from_mlx(mlx_dit)
    keys = mx.random.split(mx.random.key(0), 3)
    context = mx.random.normal((1, 257, config.cond_token_dim), key=keys[0])
    global_cond = mx.random.normal((1, config.global_cond_dim), key=keys[1])
    x = mx.random.normal((1, config.io_channels, max(1, tokens - config.num_memory_tokens)), key=keys[2])
    prepared = [(m, m.prepare(context, global_cond, None, cfg=False)) for m in (mlx_dit, torch_dit)]
    best = [float("inf"), float("inf")]
    for round_ in range(repeats + 1):
        for i, (model, prep) in enumerate(prepared):
            start = time.perf_counter()
            mx.eval(model.step(x, 0.5, prep))
            if round_:  # round 0 warms up (kernel compiles, thread pools, page-ins)
                best[i] = min(best[i], time.perf_counter() - start)
    return {
        "mlx_step_s": best[0],
        "torch_step_s": best[1],
        "tokens": tokens,
        "depth": config.depth,
        "key": machine_key(),
    }


def save_measurement(result: dict, path=None) -> Path:
    """Write ``result`` (:func:`measure_backends`) where ``--backend auto`` reads it, atomically (replacing an earlier
    measurement, never anything that is not a regular file); the directory is created if needed."""
    from .outputs import AtomicFiles

    path = Path(path) if path is not None else measurement_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with AtomicFiles([path], overwrite=True) as files:
        files.temps[0].write_text(json.dumps(result, indent=2) + "\n")
        files.commit()
    return path


def load_measurement(path=None) -> dict | None:
    """The stored measurement if it was made on this machine as it is now (:func:`machine_key`), else None."""
    path = Path(path) if path is not None else measurement_path()
    try:
        result = json.loads(path.read_text())
        ok = result["key"] == machine_key() and result["mlx_step_s"] > 0 and result["torch_step_s"] > 0
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return result if ok else None


def _measured_choice() -> tuple[str, str] | None:
    """``(backend, reason)`` from this machine's measurement, or None (none stored, or the torch extra missing)."""
    result = load_measurement()
    if result is None or _missing_torch_packages():
        return None
    ratio = result["torch_step_s"] / result["mlx_step_s"]
    how = f"measured here by python -m mlx_sa3.info --measure-backends: torch's DiT step {ratio:.2f}x MLX's"
    return ("torch", how) if ratio <= TORCH_STEP_RATIO else ("mlx", how)


def resolve_backend(backend: str, dtype=None, weights_dtype=None) -> tuple[str, str]:
    """``(backend, reason)``: ``"auto"`` resolved by :func:`choose_backend`, an explicit backend checked.

    ``auto`` honours the request: where it would pick torch but ``dtype`` or ``weights_dtype`` is one only MLX runs
    (float16 compute, bfloat16 storage under float32 compute), it runs MLX, rather than refusing what was asked.
    """
    if backend == AUTO:
        chosen, reason = choose_backend()
        if chosen == "torch":
            needs = _mlx_only_request(dtype, weights_dtype)
            if needs is not None:
                return "mlx", f"{needs} runs on the MLX backend only; auto would run torch here otherwise"
        return chosen, reason
    check_backend(backend, also=(AUTO,))
    return backend, "requested"


def _mlx_only_request(dtype, weights_dtype) -> str | None:
    """``"dtype X"`` / ``"weights_dtype X"`` when the torch backend refuses that part of a request, else None."""
    compute, storage = parse_dtype(dtype), parse_dtype(weights_dtype)  # an unknown name is refused here, anywhere
    try:
        check_dtype(compute, "torch")
    except ValueError:
        return f"dtype {dtype_name(compute)}"
    try:
        check_weights_dtype(storage, compute, "torch")
    except ValueError:
        return f"weights_dtype {dtype_name(storage)}"
    return None


def torch_gemm_gflops(n: int = 2048, repeats: int = 5, dtype=None) -> float | None:
    """torch's n^3 GEMM rate in ``dtype`` (default float32; ``"bfloat16"``) as the torch backend runs it (thread
    policy applied); None without torch."""
    if importlib.util.find_spec("torch") is None:
        return None
    from .torch_backend.common import gemm_gflops

    return gemm_gflops(n, repeats, dtype)


def _torch_backend():
    from . import torch_backend

    return torch_backend


def describe_torch() -> str:
    """The torch backend's version and threads, or why it is unavailable (for ``python -m mlx_sa3.info``)."""
    return _torch_backend().describe_torch()


def _open(src) -> Source:
    return src if isinstance(src, Source) else open_source(src)


def check_dtype(dtype, backend: str = "mlx") -> mx.Dtype:
    """The compute dtype ``dtype`` means on ``backend`` (None: its default), or ValueError before anything loads.

    MLX: float32, float16 or bfloat16 (default :func:`default_dtype`); torch: float32 (default) or bfloat16
    (:func:`mlx_sa3.torch_backend.common.check_dtype`; fast where ``platform.has_fast_bf16_matmul``).
    """
    if backend == "torch":
        return _torch_backend().common.check_dtype(dtype)
    return parse_dtype(dtype) or default_dtype()


def check_weights_dtype(weights_dtype, dtype=None, backend: str = "mlx") -> None:
    """Refuse a ``weights_dtype`` that cannot apply, before anything loads (raises ValueError).

    The storage option narrows the MLX backend's float32 compute (:mod:`mlx_sa3.storage`); the torch backend holds
    its weights in the compute dtype (``dtype="bfloat16"`` halves them), so there only that dtype is accepted.
    """
    wanted = parse_dtype(weights_dtype)
    if backend == "torch":
        compute = check_dtype(dtype, backend)
        if wanted is not None and wanted != compute:
            raise ValueError(
                f"weights_dtype {weights_dtype} needs the MLX backend (backend='mlx', CLI --backend mlx); the torch "
                f"backend holds its weights in the compute dtype ({dtype_name(compute)}; dtype='bfloat16' halves them)"
            )
        return
    storage_dtype(parse_dtype(dtype) or default_dtype(), weights_dtype)


def load_dit(src, dtype=None, backend: str = "mlx", weights_dtype=None):
    """The DiT of a full SA3 checkpoint on ``backend`` (MLX: ``dtype`` or the device default; torch: float32 or
    ``dtype="bfloat16"``).

    ``weights_dtype`` (MLX): how the linear weights are held (:func:`mlx_sa3.checkpoint.load_dit`).
    """
    check_backend(backend)
    check_weights_dtype(weights_dtype, dtype, backend)
    source = _open(src)
    if backend == "torch":
        return _torch_backend().load_torch_dit(source, dtype)
    return checkpoint.load_dit(source, dtype=parse_dtype(dtype) or default_dtype(), weights_dtype=weights_dtype)


def load_text_encoder(src, max_length: int, dtype=None, backend: str = "mlx", weights_dtype=None):
    """The T5Gemma text encoder (with its tokenizer) of a full SA3 checkpoint on ``backend``."""
    check_backend(backend)
    check_weights_dtype(weights_dtype, dtype, backend)
    source = _open(src)
    if backend == "torch":
        return _torch_backend().load_torch_text_encoder(source, max_length, dtype)
    compute = parse_dtype(dtype) or default_dtype()
    return checkpoint.load_mlx_text_encoder(source, max_length, dtype=compute, weights_dtype=weights_dtype)


def load_autoencoder(src, dtype=None, backend: str = "mlx", encoder: bool = True):
    """Load a SAME autoencoder from a SAME repo, a full SA3 repo (its pretransform) or a converted directory.

    ``src`` is a local directory, a Hub repo id or an opened ``loading.Source``. ``dtype`` (default float32)
    applies to the encoder; the bottleneck and decoder stay float32 because SAME's differential attention cancels
    badly in half precision. ``backend="torch"`` returns the torch CPU counterpart (same interface, float32).
    ``encoder=False`` defers reading the encoder half until the first ``encode`` (both backends).
    """
    check_backend(backend)
    source = _open(src)
    if backend == "torch":
        return _torch_backend().load_torch_autoencoder(source, encoder=encoder)
    return checkpoint.load_mlx_autoencoder(source, dtype, encoder=encoder)


def move_networks(dit, autoencoder, text_encoder, backend: str, dtype=None):
    """MLX networks -> the same weights on ``backend`` (``(dit, autoencoder, text_encoder)``); on torch the DiT and
    text encoder compute in ``dtype`` (default float32), SAME in float32."""
    check_backend(backend)
    if backend == "mlx":
        return dit, autoencoder, text_encoder
    tb = _torch_backend()
    return (
        tb.torch_dit_from_mlx(dit, dtype),
        tb.torch_autoencoder_from_mlx(autoencoder),
        tb.torch_text_encoder_from_mlx(text_encoder, dtype),
    )
