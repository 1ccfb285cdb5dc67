"""Peak resident memory of one CLI generation (``python -m mlx_sa3.generate``) in a fresh process.

    flock /tmp/heavy.lock python benchmarks/bench_cli_memory.py /tmp/sa3rand/small --seconds 10 120 [--json out.json]
    ... --backends torch mlx --rounds 3   (interleaved rounds; prints torch/mlx ratios per round)
    ... --backends torch --dtypes float32 bfloat16 --rounds 2   (the same, over --dtype values)

Each run is a child process; its peak RSS is ``ru_maxrss`` of the children (read in a fresh wrapper process per run,
so one run's peak never hides another's). Use ``benchmarks/random_checkpoint.py`` for a full-size checkpoint.
With ``--backends`` every round runs each duration on each backend in turn, so ratios compare runs made under the
same machine load (``--backend auto`` is re-decided from these: ``backend.choose_backend``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

WRAPPER = (
    "import resource, subprocess, sys, json, time; t = time.perf_counter(); "
    "rc = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True); "
    "print(json.dumps({'rc': rc.returncode, 'wall_s': time.perf_counter() - t, "
    "'peak_rss_mb': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 'stderr': rc.stderr[-400:]}))"
)


def run_cli(model: str, seconds: float, steps: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory(prefix="cli_memory_") as tmp:
        cmd = [sys.executable, "-m", "mlx_sa3.generate", "--model", model, "-p", "a warm analog synth pad"]
        cmd += ["--duration", f"{seconds:g}", "--steps", str(steps), "--seed", "0", "--quiet"]
        cmd += ["-o", os.path.join(tmp, "out.wav"), *extra]
        proc = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], check=True, capture_output=True, text=True)
    return {"seconds": seconds, "steps": steps, "extra": extra, **json.loads(proc.stdout)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--seconds", type=float, nargs="+", default=[10.0, 120.0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--backends", nargs="+", default=[None], help="--backend values to compare (interleaved)")
    p.add_argument("--dtypes", nargs="+", default=[None], help="--dtype values to compare (interleaved)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more CLI flags (last)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = []
    for round_index in range(args.rounds):
        for seconds in args.seconds:
            this = {}
            for backend, dtype in [(b, d) for b in args.backends for d in args.dtypes]:
                extra = [] if backend is None else ["--backend", backend]
                extra += [] if dtype is None else ["--dtype", dtype]
                label = "/".join(v for v in (backend, dtype) if v is not None) or None
                start = time.perf_counter()
                r = this[label] = {
                    "round": round_index,
                    "backend": backend,
                    "dtype": dtype,
                    **run_cli(args.model, seconds, args.steps, [*extra, *args.extra]),
                }
                rows.append(r)
                status = "ok" if r["rc"] == 0 else f"FAILED rc {r['rc']}: {r['stderr']}"
                print(
                    f"round {round_index} {label or '-':>5} {seconds:6g} s x {args.steps} steps: peak RSS "
                    f"{r['peak_rss_mb']:7.0f} MB, wall {r['wall_s']:6.1f} s "
                    f"({time.perf_counter() - start:.0f} s) {status}",
                    flush=True,
                )
            if len(this) == 2:
                (a, ra), (b, rb) = this.items()
                print(
                    f"round {round_index} {seconds:6g} s: {a}/{b} wall {ra['wall_s'] / rb['wall_s']:.2f}x, "
                    f"peak RSS {ra['peak_rss_mb'] / rb['peak_rss_mb']:.2f}x",
                    flush=True,
                )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
