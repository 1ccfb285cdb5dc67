"""Decode speed and memory of the full-size SAME autoencoders (random weights): ``decode`` vs ``decode_stream``.

Every (variant, duration, mode) runs in a fresh subprocess so that its peak RSS is its own. FLOPs are counted from
the shapes (matmuls, attention products and the mapping conv; elementwise work ignored); ``GFLOP/s`` divides the
useful work of a full decode by the wall time, so streaming's extra margin work shows up as a lower rate, and
``work`` gives the executed / useful ratio. The machine's fp32 GEMM rate is measured once for comparison.

    python benchmarks/bench_same.py --quick                 # SAME-S, 10 s
    python benchmarks/bench_same.py --json same.json        # SAME-S and SAME-L at 30/60/120 s (+380 s SAME-L)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import mlx_sa3  # noqa: E402,F401  (loads OpenBLAS before mlx)
from mlx_sa3.same import SAMEAutoencoder, SAMEConfig  # noqa: E402

import mlx.core as mx  # noqa: E402
from common import decoder_flops, latents_for, peak_rss_mb  # noqa: E402

SECONDS = {"same-s": [30, 60, 120], "same-l": [30, 60, 120, 380]}


def run_one(variant: str, seconds: float, mode: str, chunk: int | None, repeats: int) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess); wall time is the best of
    ``repeats`` runs (the peak RSS is the same for every run)."""
    config = SAMEConfig.preset(variant)
    model = SAMEAutoencoder(config)
    mx.eval(model.parameters())
    length = latents_for(seconds, config)
    z = mx.random.normal((1, config.latent_dim, length), key=mx.random.key(0))
    mx.eval(z)
    chunk = model.default_chunk_latents if chunk is None else chunk
    warm = mx.random.normal((1, config.latent_dim, 2 * config.decoder.latent_multiple))
    mx.eval(model.decode(warm))
    rss_weights = peak_rss_mb()

    wall = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        if mode == "decode":
            mx.eval(model.decode(z))
        else:
            for _ in model.decode_stream(z, chunk_latents=chunk):
                pass
        wall = min(wall, time.perf_counter() - start)

    def flops(n, cuts=(False, False)):
        return decoder_flops(config.decoder, n, config.latent_dim, config.frame_dim, cuts)

    multiple = config.decoder.latent_multiple
    useful = flops(-(-length // multiple) * multiple)
    executed = useful
    if mode == "stream":
        padded = -(-length // multiple) * multiple
        windows = model.stream_windows(length, chunk)
        executed = sum(flops(b - a, (a > 0, b < padded)) for a, b, _, _ in windows)
    return {
        "variant": variant,
        "seconds": seconds,
        "latents": length,
        "mode": mode,
        "chunk": chunk if mode == "stream" else None,
        "wall_s": wall,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_weights_mb": rss_weights,
        "gflop": useful / 1e9,
        "work": executed / useful,
        "gflops": useful / wall / 1e9,
        "realtime": seconds / wall,
    }


def run_subprocess(variant: str, seconds: float, mode: str, chunk: int | None, repeats: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, str(seconds), mode, "--repeats", str(repeats)]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def gemm_rate() -> float:
    try:
        from mlx_sa3.info import gemm_gflops
    except ImportError:  # measure it here if mlx_sa3.info is not available
        a = mx.random.normal((2048, 2048))
        mx.eval(a, a @ a)
        start = time.perf_counter()
        mx.eval(a @ a)
        return 2 * 2048**3 / (time.perf_counter() - start) / 1e9
    return gemm_gflops()


def print_table(rows: list[dict], gemm: float) -> None:
    header = (
        f"{'variant':8} {'sec':>5} {'lat':>5} {'mode':7} {'chunk':>5} {'wall s':>8} {'x real':>7} "
        f"{'RSS MB':>8} {'GFLOP':>8} {'work':>5} {'GFLOP/s':>8} {'%GEMM':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        chunk = "" if r["chunk"] is None else str(r["chunk"])
        print(
            f"{r['variant']:8} {r['seconds']:>5g} {r['latents']:>5} {r['mode']:7} {chunk:>5} {r['wall_s']:>8.2f} "
            f"{r['realtime']:>7.2f} {r['peak_rss_mb']:>8.0f} {r['gflop']:>8.0f} {r['work']:>5.2f} "
            f"{r['gflops']:>8.1f} {100 * r['gflops'] / gemm:>6.1f}"
        )
    print(f"fp32 GEMM rate (2048^3): {gemm:.1f} GFLOP/s")


def check_targets(rows: list[dict]) -> list[str]:
    """Stream RSS growth from the shortest to 120 s (< 10 %) and stream / decode wall time (<= 1.1)."""
    lines = []
    for variant in sorted({r["variant"] for r in rows}):
        mine = {(r["seconds"], r["mode"]): r for r in rows if r["variant"] == variant}
        streams = sorted(s for s, m in mine if m == "stream")
        if len(streams) > 1:
            lo, hi = streams[0], max(s for s in streams if s <= 120)
            growth = mine[hi, "stream"]["peak_rss_mb"] / mine[lo, "stream"]["peak_rss_mb"] - 1
            lines.append(f"{variant}: stream peak RSS {lo:g} s -> {hi:g} s: {100 * growth:+.1f} % (target < 10 %)")
        for seconds in streams:
            if (seconds, "decode") in mine:
                ratio = mine[seconds, "stream"]["wall_s"] / mine[seconds, "decode"]["wall_s"]
                lines.append(f"{variant} {seconds:g} s: stream / decode wall time {ratio:.3f} (target <= 1.1)")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=list(SECONDS), choices=list(SECONDS))
    parser.add_argument("--seconds", nargs="+", type=float, help="durations (default: 30 60 120, +380 for SAME-L)")
    parser.add_argument("--modes", nargs="+", default=["decode", "stream"], choices=["decode", "stream"])
    parser.add_argument("--chunk", type=int, help="decode_stream chunk in latents (default: the model's default)")
    parser.add_argument("--repeats", type=int, default=1, help="runs per configuration; the best wall time counts")
    parser.add_argument("--quick", action="store_true", help="SAME-S, 10 s only")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", nargs=3, metavar=("VARIANT", "SECONDS", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        variant, seconds, mode = args.worker
        print(json.dumps(run_one(variant, float(seconds), mode, args.chunk, args.repeats)))
        return

    plan = {"same-s": [10.0]} if args.quick else {v: args.seconds or SECONDS[v] for v in args.variants}
    rows = []
    for variant, durations in plan.items():
        for seconds in durations:
            for mode in args.modes:
                rows.append(run_subprocess(variant, seconds, mode, args.chunk, args.repeats))
                print(f"  done {variant} {seconds:g} s {mode}: {rows[-1]['wall_s']:.2f} s", file=sys.stderr)
    gemm = gemm_rate()
    print_table(rows, gemm)
    targets = check_targets(rows)
    for line in targets:
        print(line)
    if args.json:
        args.json.write_text(json.dumps({"gemm_gflops": gemm, "rows": rows, "targets": targets}, indent=2))


if __name__ == "__main__":
    main()
