"""End-to-end generation with full-size random-weight models: time per stage, total, peak RSS, FLOP floor.

Each (model, duration) runs in a fresh subprocess so its peak RSS is its own. The run writes the audio to a file
through ``generate_to_file`` (streamed decode), as the CLI does. The FLOP floor is the work of text encoding, the
sampling steps and the decode (counted from the shapes, see bench_dit.py / bench_same.py) divided by the machine's
fp32 GEMM rate: the time a perfect implementation would need on this machine.

    python benchmarks/bench_pipeline.py --quick                    # small, 10 s, 2 steps
    python benchmarks/bench_pipeline.py --json pipeline.json       # small at 10, 30 and 120 s, 8 steps
    python benchmarks/bench_pipeline.py --models small medium      # medium too (needs ~12 GB)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_sa3  # noqa: E402  (loads OpenBLAS before mlx)
from mlx_sa3.checkpoint import full_size_configs as full_size_parts  # noqa: E402
from mlx_sa3.demo import random_model  # noqa: E402
from mlx_sa3.info import describe, gemm_gflops  # noqa: E402

from common import decoder_flops, peak_rss_mb, step_flops  # noqa: E402

HEADROOM_LATENTS = 64
#: issue 12's targets for the default path: end to end within 2.5x the FLOP floor, peak RSS at 120 s within 10 % of 10 s
TARGET_FLOOR, TARGET_RSS_GROWTH = 2.5, 1.10


def text_flops(cfg, tokens: int) -> float:
    """Encoder FLOPs for one prompt: projections, attention products and the GeGLU MLP (embedding lookup is free)."""
    d, inner, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads * cfg.head_dim
    per_layer = 2 * tokens * d * (3 * heads + heads) + 2 * 2 * tokens * tokens * heads + 2 * tokens * d * 3 * inner
    return cfg.num_hidden_layers * per_layer


def run_one(variant: str, seconds: float, steps: int) -> dict:
    sa3, dit_cfg, same_cfg, text_cfg = full_size_parts(variant)
    pipe = mlx_sa3.StableAudio3(random_model(sa3, dit_cfg, same_cfg, text_cfg, dtype="float32"))
    rss_weights = peak_rss_mb()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = pipe.generate_to_file(
            Path(tmp) / "out.wav",
            "a slow ambient pad with field recordings",
            seconds,
            steps=steps,
            seed=0,
            sampler="pingpong",
        )
        total = time.perf_counter() - start
    plan = pipe.plan("x", seconds, steps=steps)
    flops = (
        text_flops(text_cfg, sa3.prompt_max_length)
        + steps * step_flops(dit_cfg, plan.length, rows=1, cross_rows=1)
        + decoder_flops(same_cfg.decoder, -(-plan.num_samples // 4096), same_cfg.latent_dim, same_cfg.frame_dim)
    )
    return {
        "model": variant,
        "seconds": seconds,
        "steps": steps,
        "latents": plan.length,
        **out.timings,
        "total_s": total,
        "peak_rss_mb": peak_rss_mb(),
        "rss_after_weights_mb": rss_weights,
        "gflop": flops / 1e9,
    }


def run_subprocess(variant: str, seconds: float, steps: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, str(seconds), str(steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["small"], choices=["small", "medium"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[10.0, 30.0, 120.0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--quick", action="store_true", help="small model, 10 s, 2 steps")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        variant, seconds, steps = args.worker
        print(json.dumps(run_one(variant, float(seconds), int(steps))))
        return
    if args.quick:
        args.models, args.seconds, args.steps = ["small"], [10.0], 2

    gemm = gemm_gflops()
    rows = []
    for variant in args.models:
        for seconds in args.seconds:
            rows.append(run_subprocess(variant, seconds, args.steps))
            rows[-1]["floor_s"] = rows[-1]["gflop"] / gemm
            print(f"  done {variant} {seconds:g} s: {rows[-1]['total_s']:.1f} s", file=sys.stderr)

    header = (
        f"{'model':6} {'sec':>5} {'L':>5} {'steps':>5} {'text s':>7} {'steps s':>8} {'decode s':>8} "
        f"{'total s':>8} {'floor s':>8} {'x floor':>7} {'RSS MB':>7}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['model']:6} {r['seconds']:>5g} {r['latents']:>5} {r['steps']:>5} {r['text']:>7.2f} "
            f"{r['sampling']:>8.2f} {r['decoding']:>8.2f} {r['total_s']:>8.2f} {r['floor_s']:>8.2f} "
            f"{r['total_s'] / r['floor_s']:>7.2f} {r['peak_rss_mb']:>7.0f}"
        )
    print(f"fp32 GEMM rate (2048^3): {gemm:.1f} GFLOP/s")
    targets = []
    for variant in args.models:
        mine = {r["seconds"]: r for r in rows if r["model"] == variant}
        if 10.0 in mine and 120.0 in mine:
            ratio = mine[120.0]["peak_rss_mb"] / mine[10.0]["peak_rss_mb"]
            targets.append(f"{variant}: peak RSS 120 s / 10 s = {ratio:.3f} (target <= {TARGET_RSS_GROWTH:g})")
        targets += [
            f"{variant} {s:g} s: total / FLOP floor = {r['total_s'] / r['floor_s']:.2f} (target <= {TARGET_FLOOR:g})"
            for s, r in mine.items()
        ]
    for line in targets:
        print(line)
    if args.json:
        args.json.write_text(
            json.dumps({"machine": describe(), "gemm_gflops": gemm, "rows": rows, "targets": targets}, indent=2)
        )


if __name__ == "__main__":
    main()
