"""GEMM rates of MLX and torch under each BLAS setting, interleaved rounds, one fresh process per measurement.

    python benchmarks/bench_blas.py [--rounds 3] [--size 2048] [--json out.json]

Settings: mlx_sa3's default preload (OpenBLAS, with the OPENBLAS_CORETYPE mlx_sa3 chooses unless the user set one),
forced core types, ``MLX_SA3_BLAS=<path>`` libraries given with ``--blas``, and ``MLX_SA3_NO_OPENBLAS=1`` (MLX's
bundled reference BLAS; torch keeps its own). Each process reports the kernel set OpenBLAS loaded
(``openblas_get_corename``), MLX's fp32 GEMM rate and torch's (torch as the torch backend runs it: one thread when
the preload is active, see ``platform.torch_thread_policy``). Rates are best of 5; compare within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = """
import json, sys
import mlx_sa3
from mlx_sa3 import platform as p
out = {"blas": p.loaded_blas, "corename": p.openblas_corename(), "mlx": p.gemm_gflops(SIZE, repeats=5)}
if "notorch" not in sys.argv:
    from mlx_sa3.backend import torch_gemm_gflops
    out["torch"] = torch_gemm_gflops(SIZE, repeats=5)
print(json.dumps(out))
"""


def settings(extra_blas: list[str]) -> dict[str, dict]:
    base = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "MLX_SA3_NO_OPENBLAS")}
    out = {"default": base}
    for core in ("SkylakeX", "Cooperlake", "Haswell"):
        out[f"CORETYPE={core}"] = {**base, "OPENBLAS_CORETYPE": core}
    out["default, no core choice"] = {**base, "MLX_SA3_OPENBLAS_CORETYPE": "0"}
    for path in extra_blas:
        out[f"MLX_SA3_BLAS={Path(path).name}"] = {**base, "MLX_SA3_BLAS": path}
    out["MLX_SA3_NO_OPENBLAS=1"] = {**base, "MLX_SA3_NO_OPENBLAS": "1"}
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=2048)
    parser.add_argument("--blas", nargs="*", default=[], help="extra BLAS libraries to try through MLX_SA3_BLAS")
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    envs = settings(args.blas)
    rows = []
    for rnd in range(args.rounds):
        names = list(envs) if rnd % 2 == 0 else list(reversed(envs))
        for name in names:
            env = {**envs[name], "PYTHONPATH": str(ROOT) + os.pathsep + envs[name].get("PYTHONPATH", "")}
            code = PROBE.replace("SIZE", str(args.size))
            cmd = [sys.executable, "-c", code] + (["notorch"] if args.no_torch else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            row = {"setting": name, "round": rnd}
            try:
                row |= json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                row["error"] = proc.stderr.strip().splitlines()[-1:]
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(f"\n{'setting':32} {'kernels':>11} {'MLX GFLOP/s (median, max)':>27} {'torch GFLOP/s (median, max)':>29}")
    for name in envs:
        mine = [r for r in rows if r["setting"] == name and "error" not in r]
        if not mine:
            print(f"{name:32} FAILED")
            continue

        def stat(key):
            vals = sorted(r[key] for r in mine if r.get(key) is not None)
            return f"{vals[len(vals) // 2]:8.1f} {vals[-1]:8.1f}" if vals else "-"

        print(f"{name:32} {str(mine[0]['corename']):>11} {stat('mlx'):>27} {stat('torch'):>29}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
