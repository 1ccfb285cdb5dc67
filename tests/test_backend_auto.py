"""``--backend auto``: MLX where it has a GPU, torch on an x86-64 CPU with AVX-512 and the torch extra installed, MLX
otherwise; the CLI summary says which ran and why."""

import importlib.util

from mlx_sa3 import backend
from mlx_sa3.pipeline import StableAudio3

import pytest

from .conftest import REF


@pytest.fixture
def cpu_only(monkeypatch):
    monkeypatch.setattr(backend.mx.metal, "is_available", lambda: False)
    monkeypatch.setattr(backend.mx, "default_device", lambda: backend.mx.cpu)
    return monkeypatch


AVX512 = {"avx2", "avx512f", "fma"}
AVX2 = {"avx2", "fma", "f16c"}


def test_x86_cpu_with_avx512_and_torch_picks_the_measured_backend(cpu_only):
    cpu_only.setattr(backend.platform, "machine", lambda: "x86_64")
    cpu_only.setattr(importlib.util, "find_spec", lambda name: object())
    assert backend.choose_backend(AVX512)[0] == backend.X86_CPU_BACKEND
    for choice in ("torch", "mlx"):  # the rule is one constant
        cpu_only.setattr(backend, "X86_CPU_BACKEND", choice)
        assert backend.choose_backend(AVX512)[0] == choice


def test_x86_cpu_without_avx512_picks_mlx(cpu_only):
    """On an AVX2-only x86-64 CPU torch's oneDNN has no edge: MLX measured as fast, in less memory."""
    cpu_only.setattr(backend, "X86_CPU_BACKEND", "torch")
    cpu_only.setattr(backend.platform, "machine", lambda: "x86_64")
    cpu_only.setattr(importlib.util, "find_spec", lambda name: object())
    for flags in (AVX2, set()):  # no flags to read: MLX as well
        name, reason = backend.choose_backend(flags)
        assert name == "mlx" and "AVX-512" in reason
    assert backend.choose_backend(AVX512)[0] == "torch"


def test_auto_reads_this_cpus_flags(cpu_only):
    from mlx_sa3.cpu_kernels import cpu_flags

    cpu_only.setattr(backend.platform, "machine", lambda: "x86_64")
    cpu_only.setattr(importlib.util, "find_spec", lambda name: object())
    assert backend.choose_backend() == backend.choose_backend(cpu_flags())


def test_x86_cpu_without_torch_picks_mlx_and_says_what_is_missing(cpu_only):
    cpu_only.setattr(backend, "X86_CPU_BACKEND", "torch")
    cpu_only.setattr(backend.platform, "machine", lambda: "x86_64")
    cpu_only.setattr(importlib.util, "find_spec", lambda name: None if name == "diffusers" else object())
    name, reason = backend.choose_backend(AVX512)
    assert name == "mlx" and "diffusers" in reason


def test_arm_cpu_and_gpus_pick_mlx(cpu_only):
    cpu_only.setattr(backend.platform, "machine", lambda: "aarch64")
    assert backend.choose_backend()[0] == "mlx"
    cpu_only.setattr(backend.mx.metal, "is_available", lambda: True)
    cpu_only.setattr(backend.platform, "machine", lambda: "x86_64")
    assert backend.choose_backend() == ("mlx", "MLX has a GPU here")


def test_explicit_backends_pass_and_unknown_ones_fail():
    assert backend.resolve_backend("mlx") == ("mlx", "requested")
    with pytest.raises(ValueError, match="unknown backend"):
        backend.resolve_backend("cuda")


def test_pipeline_reports_the_backend_it_runs():
    chosen, reason = backend.choose_backend()
    if chosen == "torch":
        pytest.importorskip("torch")
    pipe = StableAudio3.from_pretrained(REF / "sa3_small_tiny_s0", backend="auto", keep_loaded=False)
    assert (pipe.backend, pipe.backend_reason) == (chosen, reason)
    module = type(pipe.model.dit).__module__
    assert module.startswith("mlx_sa3.torch_backend") == (chosen == "torch")
    assert StableAudio3.from_pretrained("demo", backend="mlx").backend == "mlx"


def test_cli_hints_bfloat16_only_for_float32_torch_runs_on_bf16_cpus(monkeypatch):
    from mlx_sa3 import generate, platform

    monkeypatch.setattr(platform, "has_fast_bf16_matmul", lambda: True)
    assert "--dtype bfloat16" in generate._dtype_hint("torch", None)
    assert "--dtype bfloat16" in generate._dtype_hint("torch", "float32")
    assert generate._dtype_hint("torch", "bfloat16") is None
    assert generate._dtype_hint("mlx", None) is None
    monkeypatch.setattr(platform, "has_fast_bf16_matmul", lambda: False)
    assert generate._dtype_hint("torch", None) is None
