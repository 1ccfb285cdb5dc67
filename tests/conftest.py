import atexit
import math
import os
import shutil
import tempfile
from pathlib import Path

import mlx_sa3  # noqa: F401  (loads OpenBLAS before anything imports mlx)

import numpy as np
import pytest

# A stored backend measurement (python -m mlx_sa3.info --measure-backends) would change what --backend auto runs:
# the suite, and every CLI it starts, gets an empty cache of its own.
os.environ["MLX_SA3_CACHE_DIR"] = tempfile.mkdtemp(prefix="mlx_sa3-test-cache-")
atexit.register(shutil.rmtree, os.environ["MLX_SA3_CACHE_DIR"], True)

SHARED = Path(os.environ.get("MLX_SA3_SHARED", Path(__file__).resolve().parents[1].parent / "shared"))
REF = SHARED / "reference"
REQUIRE_FIXTURES = os.environ.get("MLX_SA3_REQUIRE_FIXTURES", "") not in ("", "0")
MISSING_FIXTURES = f"golden fixtures not found at {REF} (set MLX_SA3_SHARED)"


def _uses_fixtures(item) -> bool:
    """A test needs the golden fixtures when its module refers to REF (directly or through ref_dir)."""
    module = getattr(item, "module", None)
    code = getattr(getattr(item, "function", None), "__code__", None)
    in_function = code is not None and "REF" in code.co_names + code.co_varnames
    return in_function or getattr(module, "REF", None) is REF or "ref_dir" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """Without the fixtures: one clear skip reason locally; with MLX_SA3_REQUIRE_FIXTURES=1 (CI) a hard failure."""
    if REF.is_dir():
        return
    if REQUIRE_FIXTURES:
        raise pytest.UsageError(MISSING_FIXTURES + " and MLX_SA3_REQUIRE_FIXTURES is set")
    skip = pytest.mark.skip(reason=MISSING_FIXTURES)
    for item in items:
        if _uses_fixtures(item):
            item.add_marker(skip)


#: machine epsilon of each dtype (2 ** -mantissa bits): tolerances are multiples of these, never measured numbers
EPS = {"float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
BF16_U = EPS["bfloat16"] / 2  # unit roundoff of bfloat16 (round to nearest): 2^-8


def fp32_tol(n: int, k: float = 4.0) -> float:
    """``k * eps32 * sqrt(n)``: the rounding of a length-``n`` float32 reduction (random-walk growth).

    For a stack of ``depth`` layers of width ``n`` (a DiT, a SAME transformer) the per-layer errors add up:
    ``fp32_tol(width, k=4 * depth)``; with guidance scale ``s`` the CFG combination amplifies them by ``1 + 2|s|``.
    """
    return k * EPS["float32"] * math.sqrt(n)


def stack_tol(width: int, depth: int, cfg_scale: float = 1.0) -> float:
    """Two float32 evaluations of the same ``depth``-layer network of ``width`` that round differently (other
    grouping, padding or kernels): ``4 * eps32 * sqrt(width)`` per layer, times ``1 + 2|s|`` with guidance."""
    guided = 1.0 if cfg_scale == 1.0 else 1.0 + 2.0 * abs(cfg_scale)
    return guided * fp32_tol(width, k=4.0 * depth)


def half_tol(dtype, k: float = 5.0) -> float:
    """``k`` roundings of a half-precision dtype (mx/np dtype or name), relative to the output's scale."""
    name = str(dtype).replace("mlx.core.", "").replace("torch.", "")
    return k * EPS[name]


def rel_rms(a, b) -> float:
    """||a - b|| / ||b|| (relative RMS error over all elements), the metric of the rounding-error bounds."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.sqrt(np.mean((a - b) ** 2) / np.mean(b**2)))


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
        pytest.fail(MISSING_FIXTURES)
    return REF


def dit_call(model, io, **kw):
    """A DiT (either backend) on an io.npz record; float32 mx output as numpy."""
    import mlx.core as mx

    args = dict(cross_attn_cond=io["cross_attn_cond"], global_cond=io["global_cond"])
    args.update(kw)
    out = model(io["x"], io["t"], **args)
    assert isinstance(out, mx.array) and out.dtype == mx.float32
    return np.array(out)


# Official SAME tensor names -> diffusers' AutoencoderSAME names, written independently of the converter's map so the
# tests check it (the fused to_qkv rows need a reorder on top, which each test does itself).
SAME_TO_DIFFUSERS = (
    (r"^encoder\.layers\.0\.", "encoder.blocks.0."),
    (r"^encoder\.layers\.2\.", "encoder.proj."),
    (r"^decoder\.layers\.1\.", "decoder.proj."),
    (r"^decoder\.layers\.3\.", "decoder.blocks.0."),
    (r"\.pre_norm\.", ".norm_attn."),
    (r"\.ff_norm\.", ".norm_ff."),
    (r"\.self_attn\.", ".attn."),
    (r"\.ff\.ff\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.ff\.2\.", ".ff.proj_out."),
    (r"^bottleneck\.scaling_factor$", "bottleneck.scale"),
)
