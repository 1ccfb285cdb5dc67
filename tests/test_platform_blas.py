"""The OpenBLAS preload's kernel choice: OPENBLAS_CORETYPE from the CPU flags only while loading, never over the
user's own setting, and GEMM results within float32 rounding of a float64 reference under the chosen kernels."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, os
import numpy as np
import mlx_sa3
import mlx.core as mx
from mlx_sa3 import platform as p
from mlx_sa3.cpu_kernels import choose_openblas_coretype, cpu_flags, openblas_version_from_path
rng = np.random.default_rng(0)
a, b = rng.standard_normal((384, 512)).astype(np.float32), rng.standard_normal((512, 256)).astype(np.float32)
out = np.array(mx.array(a) @ mx.array(b))
exact = a.astype(np.float64) @ b.astype(np.float64)
expected = None
if p.loaded_blas and "openblas" in os.path.realpath(p.loaded_blas).lower():
    expected = choose_openblas_coretype(cpu_flags(), openblas_version_from_path(p.loaded_blas))
print(json.dumps({"blas": p.loaded_blas, "chosen": p.chosen_coretype, "corename": p.openblas_corename(),
                  "expected": expected, "env": os.environ.get("OPENBLAS_CORETYPE"),
                  "err": float(np.abs(out - exact).max() / np.abs(exact).max()), "kernels": p.describe()["kernels"]}))
"""


def probe(**env) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "MLX_SA3_OPENBLAS_CORETYPE")}
    base["PYTHONPATH"] = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-c", PROBE], env=base | env, capture_output=True, text=True, check=True, timeout=120
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def default():
    info = probe()
    if info["corename"] is None:
        pytest.skip("no OpenBLAS preloaded here (the kernel choice applies to OpenBLAS only)")
    return info


def test_kernel_choice_from_cpu_flags_only_during_load(default):
    assert default["chosen"] == default["expected"]
    assert default["env"] is None  # the variable was removed after the load: other OpenBLAS copies never see it
    if default["chosen"] is not None:
        assert default["corename"] == default["chosen"] and "set by mlx_sa3" in default["kernels"]


def test_user_coretype_and_opt_out_are_respected(default):
    user = probe(OPENBLAS_CORETYPE="Haswell")
    assert user["chosen"] is None and user["env"] == "Haswell" and user["corename"] == "Haswell"
    assert "(user)" in user["kernels"]
    left = probe(MLX_SA3_OPENBLAS_CORETYPE="0")
    assert left["chosen"] is None and left["env"] is None and "OpenBLAS's own choice" in left["kernels"]


def test_chosen_kernels_compute_float32_gemm(default):
    # float32 accumulation over k = 512 terms: error <= k * eps32 relative to the largest output (loose worst case)
    assert default["err"] <= 512 * 2**-24
    reference = probe(MLX_SA3_NO_OPENBLAS="1")
    assert reference["blas"] is None and reference["err"] <= 512 * 2**-24
