"""ns per element of the DiT's CPU kernels (models/kernels.py) at the real chunk shapes, against MLX's own ops.

Softmax: one attention chunk of the small DiT (16 heads, at most ``_SCORES_PER_CHUNK`` scores) for the
self-attention keys at 10 / 30 / 120 s (latents of the duration + 6 s headroom, plus 64 memory tokens: about 236 /
451 / 1420) and the 257 context keys; SwiGLU: the feed-forward of those token counts (4096 gate columns).
With ``--kernels`` each case also runs in a fresh subprocess whose TMPDIR collects the C++ sources that MLX's CPU
compiler writes, and prints how many fused kernels the case compiled to (on the GPU there are none).

    python benchmarks/bench_kernels.py
    python benchmarks/bench_kernels.py --kernels --json kernels.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlx_sa3  # noqa: F401  (loads the BLAS before mlx)
from mlx_sa3.models import kernels as K

import mlx.core as mx  # noqa: E402
from common import CONTEXT_TOKENS, latent_length, timed  # noqa: E402

MEMORY_TOKENS, HEADS, GATE = 64, 16, 4096


def _tokens(seconds: float) -> int:
    return latent_length(seconds + 6.0) + MEMORY_TOKENS  # the pipeline's canvas: duration + 6 s headroom


def _cases() -> dict:
    cases = {}
    for seconds in (10.0, 30.0, 120.0):
        n = _tokens(seconds)
        for keys, kind in ((n, "self"), (CONTEXT_TOKENS, "cross")):
            rows = max(1, K._SCORES_PER_CHUNK // (HEADS * keys))
            cases[f"softmax {kind} {seconds:g}s ({rows}x{keys})"] = ("softmax", (1, HEADS, rows, keys))
        cases[f"swiglu {seconds:g}s ({n}x{GATE})"] = ("swiglu", (1, n, 2 * GATE))
    return cases


def _softmax_numerator(scores: mx.array) -> tuple[mx.array, mx.array]:
    """The CPU softmax's weights and their row sum, as a softmax needs them (the DiT gets the sum from its PV
    product instead)."""
    e = K._softmax_weights(scores)
    return e, mx.sum(e, axis=-1, keepdims=True)


def _functions(kind: str, shape: tuple) -> tuple:
    """(ours, MLX's own, elements) for one case; inputs made here so that a subprocess builds the same."""
    x = mx.random.normal(shape, key=mx.random.key(0)) * 4
    mx.eval(x)
    if kind == "softmax":
        ours = lambda: mx.eval(_softmax_numerator(x * K._LOG2E))  # noqa: E731
        mlx = lambda: mx.eval(mx.softmax(x, axis=-1, precise=True))  # noqa: E731
        return ours, mlx, x.size
    ours = lambda: mx.eval(K._swiglu_cpu(x))  # noqa: E731
    mlx = lambda: mx.eval(K._swiglu_fused(x))  # noqa: E731
    return ours, mlx, x.size // 2


def _count_kernels(kind: str, shape: tuple) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        code = (
            "import sys; sys.path.insert(0, sys.argv[1]); import bench_kernels as b; import mlx.core as mx; "
            f"ours, _, _ = b._functions({kind!r}, {shape!r}); ours()"
        )
        subprocess.run(
            [sys.executable, "-c", code, str(Path(__file__).parent)], env={**os.environ, "TMPDIR": tmp}, check=True
        )
        return len(list(Path(tmp).glob("mlx/*/cpu/*.cpp")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--kernels", action="store_true", help="also count the fused kernels of each case")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    mx.set_default_device(mx.cpu)
    rows = []
    print(f"{'case':40s} {'ours ns/el':>11s} {'MLX ns/el':>10s}" + ("  kernels" if args.kernels else ""))
    for name, (kind, shape) in _cases().items():
        ours, mlx, elements = _functions(kind, shape)
        row = {
            "case": name,
            "ours_ns_per_element": timed(ours, args.repeats) / elements * 1e9,
            "mlx_ns_per_element": timed(mlx, args.repeats) / elements * 1e9,
        }
        line = f"{name:40s} {row['ours_ns_per_element']:11.2f} {row['mlx_ns_per_element']:10.2f}"
        if args.kernels:
            row["kernels"] = _count_kernels(kind, shape)
            line += f"  {row['kernels']:7d}"
        print(line, flush=True)
        rows.append(row)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
