import os
from pathlib import Path

import numpy as np
import pytest

import mlx_sa3  # noqa: F401  (loads OpenBLAS before anything imports mlx)

SHARED = Path(os.environ.get("MLX_SA3_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REF = SHARED / "reference"


def rel_err(a, b) -> float:
    """max|a - b| / max|b|, the parity metric used throughout the tests (plain max|a - b| when b is all zero)."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    assert a.shape == b.shape, f"shape {a.shape} != reference {b.shape}"
    scale = np.max(np.abs(b))
    return float(np.max(np.abs(a - b)) / (scale if scale > 0 else 1.0))


@pytest.fixture(scope="session")
def ref_dir():
    if not REF.is_dir():
        pytest.fail(f"golden fixtures not found at {REF} (set MLX_SA3_SHARED)")
    return REF
