"""``--backend auto``: MLX where it has a GPU, torch on an x86-64 CPU with AVX-512 and the torch extra installed, MLX
otherwise; the CLI summary says which ran and why."""

import importlib.util
import json
import os
import platform
import stat
import subprocess
import sys

from mlx_sa3 import backend, generate
from mlx_sa3.pipeline import StableAudio3

import mlx.core as mx
import pytest
import soundfile as sf

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


@pytest.mark.parametrize(
    "dtype,weights_dtype,expected",
    [
        (None, None, "torch"),
        ("bfloat16", None, "torch"),  # torch computes in bfloat16 too
        ("bfloat16", "bfloat16", "torch"),  # ... holding its weights in that dtype
        ("float16", None, "mlx"),
        (None, "bfloat16", "mlx"),  # bfloat16 storage under float32 compute: MLX only
        ("float32", "float16", "mlx"),
    ],
)
def test_auto_runs_mlx_where_the_request_is_mlx_only(monkeypatch, dtype, weights_dtype, expected):
    """Where auto would pick torch, a dtype or weights_dtype only MLX runs makes it run MLX (and say why), not
    refuse what was asked; an explicit torch request stays torch (and is refused by the dtype checks)."""
    monkeypatch.setattr(backend, "choose_backend", lambda flags=None: ("torch", "the rule here"))
    chosen, reason = backend.resolve_backend("auto", dtype, weights_dtype)
    assert chosen == expected
    if expected == "mlx":
        assert reason.startswith(f"{'dtype' if dtype == 'float16' else 'weights_dtype'} ") and "MLX" in reason
        backend.check_dtype(dtype, chosen)
        backend.check_weights_dtype(weights_dtype, dtype, chosen)
    else:
        assert reason == "the rule here"
    assert backend.resolve_backend("torch", dtype, weights_dtype) == ("torch", "requested")
    if dtype == "float16":  # the library's dtype objects read the same
        assert backend.resolve_backend("auto", mx.float16)[1] == reason
    monkeypatch.setattr(backend, "choose_backend", lambda flags=None: ("mlx", "MLX has a GPU here"))
    assert backend.resolve_backend("auto", dtype, weights_dtype) == ("mlx", "MLX has a GPU here")


def test_explicit_backends_pass_and_unknown_ones_fail():
    assert backend.resolve_backend("mlx") == ("mlx", "requested")
    with pytest.raises(ValueError, match="unknown backend 'cuda'; choose one of auto, mlx, torch$"):
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


# -- this machine's measurement (python -m mlx_sa3.info --measure-backends) -----------------------------------------


@pytest.fixture
def x86_with_torch(cpu_only, tmp_path):
    cpu_only.setattr(backend.platform, "machine", lambda: "x86_64")
    cpu_only.setattr(importlib.util, "find_spec", lambda name: object())
    cpu_only.setenv("MLX_SA3_CACHE_DIR", str(tmp_path / "cache"))
    return cpu_only


def _stored(mlx_s: float, torch_s: float, **key) -> dict:
    result = {"mlx_step_s": mlx_s, "torch_step_s": torch_s, "tokens": 236, "depth": 2}
    result["key"] = {**backend.machine_key(), **key}
    return result


def test_a_measurement_of_this_machine_decides_auto(x86_with_torch):
    from mlx_sa3.cpu_kernels import cpu_flags

    by_flags = backend.choose_backend(cpu_flags())
    assert backend.choose_backend() == by_flags  # nothing stored yet: the flag rule
    path = backend.save_measurement(_stored(1.0, 0.76))
    assert path == backend.measurement_path() and path.parent.name == "cache"
    name, reason = backend.choose_backend()
    assert name == "torch" and "0.76x" in reason and "--measure-backends" in reason
    backend.save_measurement(_stored(1.0, 0.97))  # replaces it; a near tie goes to MLX (less memory)
    assert backend.choose_backend()[0] == "mlx"
    backend.save_measurement(_stored(1.0, 0.95))
    assert backend.choose_backend()[0] == "torch"
    # explicit flags describe another CPU: the measurement does not apply to them
    assert backend.choose_backend(AVX2)[0] == "mlx" and backend.choose_backend(AVX512)[0] == backend.X86_CPU_BACKEND


def test_a_measurement_of_another_machine_or_library_is_ignored(x86_with_torch):
    from mlx_sa3.cpu_kernels import cpu_flags

    by_flags = backend.choose_backend(cpu_flags())
    for key in ({"cpu": "another CPU"}, {"mlx": "0.0.1"}, {"torch": "1.0"}, {"blas": None, "cores": 1024}):
        backend.save_measurement(_stored(1.0, 0.5, **key))
        assert backend.load_measurement() is None
        assert backend.choose_backend() == by_flags
    backend.measurement_path().write_text("{not json")
    assert backend.load_measurement() is None and backend.choose_backend() == by_flags
    backend.save_measurement(_stored(1.0, 0.5))
    assert backend.load_measurement()["torch_step_s"] == 0.5
    # without the torch extra a measurement cannot choose torch
    x86_with_torch.setattr(importlib.util, "find_spec", lambda name: None if name == "transformers" else object())
    name, reason = backend.choose_backend()
    assert name == "mlx" and "measured here" not in reason


def test_saving_a_measurement_respects_the_umask_and_never_replaces_a_directory(x86_with_torch, tmp_path):
    from mlx_sa3.outputs import OutputError

    old = os.umask(0o027)
    try:
        path = backend.save_measurement(_stored(1.0, 0.8))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert [p.name for p in path.parent.iterdir()] == [backend.MEASUREMENT_FILE]  # no temporary left behind
    blocked = tmp_path / "blocked"
    (blocked / backend.MEASUREMENT_FILE).mkdir(parents=True)
    with pytest.raises(OutputError):
        backend.save_measurement(_stored(1.0, 0.8), blocked / backend.MEASUREMENT_FILE)
    assert (blocked / backend.MEASUREMENT_FILE).is_dir()


def test_measure_backends_times_both_backends_on_the_same_weights():
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from .test_torch_dit_blocks import random_dit  # its tiny DiT (head_dim 64, memory tokens)

    tiny = random_dit(differential=False).config
    result = backend.measure_backends(config=tiny, tokens=24, repeats=1)
    assert result["mlx_step_s"] > 0 and result["torch_step_s"] > 0
    assert (result["tokens"], result["depth"], result["key"]) == (24, tiny.depth, backend.machine_key())


def test_info_measure_backends_stores_what_auto_then_reports(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    env = {**os.environ, "MLX_SA3_CACHE_DIR": str(tmp_path)}
    cmd = [sys.executable, "-m", "mlx_sa3.info", "--size", "64", "--measure-backends"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stored = json.loads((tmp_path / backend.MEASUREMENT_FILE).read_text())
    ratio = stored["torch_step_s"] / stored["mlx_step_s"]
    assert f"MLX {stored['mlx_step_s'] * 1e3:.0f} ms, torch {stored['torch_step_s'] * 1e3:.0f} ms" in proc.stdout
    auto = next(line for line in proc.stdout.splitlines() if line.strip().startswith("auto:"))
    if platform.machine().lower() in ("x86_64", "amd64") and not backend.mx.metal.is_available():
        assert f"{ratio:.2f}x MLX's" in auto
        assert ("runs torch" in auto) == (ratio <= backend.TORCH_STEP_RATIO)


def test_info_measure_backends_without_torch_is_one_line_and_status_2(tmp_path):
    env = {**os.environ, "MLX_SA3_CACHE_DIR": str(tmp_path)}
    code = (
        "import sys; sys.modules['torch'] = None\n"  # an import of torch now fails, as without the extra
        "from mlx_sa3.info import main; main(['--size', '64', '--measure-backends'])"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: --measure-backends:") and len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / backend.MEASUREMENT_FILE).exists()


def test_cli_auto_with_bfloat16_storage_runs_mlx_where_auto_picks_torch(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(backend, "choose_backend", lambda flags=None: ("torch", "the rule here"))
    out = tmp_path / "b.wav"
    argv = ["--model", str(REF / "sa3_small_tiny_s0"), "-p", "x", "--duration", "1", "--steps", "1"]
    assert generate.main([*argv, "--weights-dtype", "bfloat16", "-o", str(out)]) == 0
    assert "backend: mlx (weights_dtype bfloat16 runs on the MLX backend only" in capsys.readouterr().out
    assert sf.info(out).frames == 44100
