"""Quantized DiTs against fp32: DiT bytes, step time and velocity quality on a full-size checkpoint.

    python benchmarks/random_checkpoint.py small /tmp/sa3-small
    python benchmarks/bench_quantize.py /tmp/sa3-small --seconds 30 [--json q.json]

For fp32, int8 and int4 (group 64): bytes of the DiT parameters, best-of-N step time (CFG off, plain text-to-audio),
and the velocity of one step on the same inputs against fp32: cosine similarity and relative L2 error, at t = 0.9,
0.5 and 0.1. With random weights these measure the arithmetic, not audio quality.

On MLX's CPU backend quantized matmuls run at ~3 GFLOP/s (measured: 451x1024x4096, int8 and int4, vs ~290 fp32),
so a full-size quantized step takes minutes there: use --seconds 1 on a CPU, or a GPU. ``--cpu-path`` measures what
mlx_sa3 runs on the CPU instead: the quantized DiT dequantized to float32 at load (``checkpoint.load_dit``), so the
stored bytes shrink, the resident ones do not, and the step is an fp32 step on the rounded weights.
"""
# ruff: noqa: I001  (mlx_sa3 must be imported before mlx: it preloads the BLAS)

from __future__ import annotations

import argparse
import json
import time

import mlx_sa3  # noqa: F401
from mlx_sa3 import quantize as Q
from mlx_sa3.dit import DiT, load_dit
from mlx.utils import tree_flatten

import mlx.core as mx

CONTEXT_TOKENS = 257


def _inputs(config, length: int):
    key = mx.random.key(1)
    k1, k2, k3 = mx.random.split(key, 3)
    x = mx.random.normal((1, config.io_channels, length), key=k1)
    cond = mx.random.normal((1, CONTEXT_TOKENS, config.cond_token_dim), key=k2)
    glob = mx.random.normal((1, config.global_cond_dim), key=k3)
    return x, cond, glob


def _step_time(dit, x, prepared, repeats: int) -> float:
    t = mx.array([0.5])
    mx.eval(dit.step(x, t, prepared))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(dit.step(x, t, prepared))
        best = min(best, time.perf_counter() - start)
    return best


def _dequantized(dit, config):
    """The CPU load path: a plain DiT holding the dequantized float32 weights of a quantized one."""
    plain = DiT(dit.config)
    plain.load_weights(list(Q.dequantize_weights(dict(tree_flatten(dit.parameters())), config).items()))
    mx.eval(plain.parameters())
    return plain


def run(src: str, seconds: float, repeats: int, group_size: int, cpu_path: bool = False) -> list[dict]:
    length = round(seconds * 44100 / 4096) + 64  # ceil(duration) + 6 s headroom, as the pipeline samples
    rows, reference = [], None
    for bits in (None, 8, 4):
        dit = load_dit(src)
        stored = None
        if bits:
            config = Q.quantize_dit(dit, bits=bits, group_size=group_size)
            if cpu_path:
                stored, dit = Q.quantized_bytes(dit), _dequantized(dit, config)
        x, cond, glob = _inputs(dit.config, length)
        prepared = dit.prepare(cond, glob)
        velocities = [dit.step(x, mx.array([t]), prepared) for t in (0.9, 0.5, 0.1)]
        mx.eval(velocities)
        row = {
            "dit": "fp32" if bits is None else f"int{bits} g{group_size}" + (" deq" if cpu_path else ""),
            "bytes": Q.quantized_bytes(dit) if stored is None else stored,
            "resident_bytes": Q.quantized_bytes(dit),
            "step_s": _step_time(dit, x, prepared, repeats),
        }
        if reference is None:
            reference = velocities
        else:
            row["cosine"] = [_cosine(v, r) for v, r in zip(velocities, reference)]
            row["rel_l2"] = [_rel(v, r) for v, r in zip(velocities, reference)]
        rows.append(row)
        del dit, prepared
        mx.clear_cache()
    return rows


def _cosine(a, b) -> float:
    return float((mx.sum(a * b) / mx.sqrt(mx.sum(a * a) * mx.sum(b * b))).item())


def _rel(a, b) -> float:
    return float(mx.sqrt(mx.sum((a - b) ** 2) / mx.sum(b * b)).item())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory (e.g. from benchmarks/random_checkpoint.py)")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=Q.DEFAULT_GROUP_SIZE)
    parser.add_argument("--cpu-path", action="store_true", help="dequantize at load, as mlx_sa3 does on the CPU")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = run(args.src, args.seconds, args.repeats, args.group_size, args.cpu_path)
    print(f"{'DiT':<16}{'MB':>8}{'res. MB':>8}{'step s':>8}  velocity cosine / rel L2 at t = 0.9, 0.5, 0.1")
    for row in rows:
        quality = ""
        if "cosine" in row:
            quality = "  ".join(f"{c:.5f}/{e:.4f}" for c, e in zip(row["cosine"], row["rel_l2"]))
        print(
            f"{row['dit']:<16}{row['bytes'] / 2**20:>8.0f}{row['resident_bytes'] / 2**20:>8.0f}"
            f"{row['step_s']:>8.2f}  {quality}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
