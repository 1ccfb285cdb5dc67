"""Peak memory at each stage of one one-shot generation (``keep_loaded=False``, as the CLI), in this process.

    flock /tmp/heavy.lock python benchmarks/stage_peak.py /tmp/sa3rand/small --seconds 120 [--weights-dtype bfloat16]

After each pipeline event it prints the process's peak and current RSS (``VmHWM`` / ``VmRSS``) and MLX's active,
cached and peak buffer bytes (``mx.get_active_memory`` / ``get_cache_memory`` / ``get_peak_memory``), so the stage
that holds the peak and what it consists of (weights, live activations, MLX's buffer cache) can be read off.
``--json`` writes the rows.
"""

from __future__ import annotations

import argparse
import json
import time

import mlx_sa3  # noqa: F401  (loads the BLAS before mlx: imported after it, MLX keeps its ~60x slower reference BLAS)
from mlx_sa3 import StableAudio3

import mlx.core as mx
from common import current_rss_mb, peak_rss_mb

MB = 2**20


def rss() -> dict:
    """The process's peak and current resident memory in MB (as /proc/self/status names them)."""
    return {"VmHWM": int(peak_rss_mb()), "VmRSS": int(current_rss_mb())}


def snapshot(stage: str, elapsed: float) -> dict:
    return {
        "stage": stage,
        "t_s": round(elapsed, 2),
        **rss(),
        "mlx_active_mb": mx.get_active_memory() // MB,
        "mlx_cache_mb": mx.get_cache_memory() // MB,
        "mlx_peak_mb": mx.get_peak_memory() // MB,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--seconds", type=float, default=120.0)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--backend", default="mlx")
    p.add_argument("--weights-dtype")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = [snapshot("start", 0.0)]
    pipe = StableAudio3.from_pretrained(
        args.model, backend=args.backend, keep_loaded=False, weights_dtype=args.weights_dtype
    )
    rows.append(snapshot("from_pretrained", 0.0))
    start, last = time.perf_counter(), None
    for event in pipe.stream("a warm analog synth pad", duration=args.seconds, steps=args.steps, seed=0):
        name = type(event).__name__
        if name != last or name == "StepEvent":
            rows.append(snapshot(name, time.perf_counter() - start))
        last = name
    rows.append(snapshot("end", time.perf_counter() - start))
    print(f"{'stage':16s} {'t (s)':>7s} {'VmHWM':>6s} {'VmRSS':>6s} {'active':>6s} {'cache':>6s} {'mlxpeak':>7s}  (MB)")
    for r in rows:
        print(
            f"{r['stage']:16s} {r['t_s']:7.1f} {r['VmHWM']:6d} {r['VmRSS']:6d} {r['mlx_active_mb']:6d} "
            f"{r['mlx_cache_mb']:6d} {r['mlx_peak_mb']:7d}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
