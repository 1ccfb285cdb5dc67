"""benchmarks/profile_step.py: its op-by-op step is the DiT's step (so the profile measures the real computation)."""

import importlib.util
from pathlib import Path

from mlx_sa3.dit import load_dit

import mlx.core as mx
import numpy as np
import pytest

from .conftest import REF, rel_err

_spec = importlib.util.spec_from_file_location(
    "profile_step", Path(__file__).resolve().parents[1] / "benchmarks" / "profile_step.py"
)
profile_step = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(profile_step)


@pytest.mark.parametrize("fixture", ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"])
def test_profiled_velocity_equals_step(fixture):
    dit = load_dit(REF / fixture)
    io = dict(np.load(REF / fixture / "io.npz"))
    prepared = dit.prepare(io["cross_attn_cond"], io["global_cond"])
    t = mx.array(io["t"]).reshape(-1)
    timer = profile_step.Timer()
    got = profile_step.profiled_velocity(timer, dit, mx.array(io["x"]), t, prepared)
    want = dit.step(io["x"], t, prepared)
    # same ops in the same order; only MLX's fusion differs: fp32 rounding of a few ulps
    assert rel_err(got, want) <= 1e-5
    assert set(timer.seconds) == set(profile_step.CLASSES)
    assert timer.flops[profile_step.GEMM] > 0


def test_pipeline_latents():
    # ceil(duration) latents + 6 s of headroom, within the aligned canvas (mlx_sa3.pipeline)
    assert profile_step.pipeline_latents(30) == 323 + 64
    assert profile_step.pipeline_latents(10) == 108 + 64
