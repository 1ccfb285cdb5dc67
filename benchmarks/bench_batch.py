"""Batch throughput: clips per hour at --max-batch 1, 2, 4, one rank vs two, and memory per extra batch item.

Full-size small model with random weights, 10 s clips, 8 steps (as the job runner runs them: jobs grouped with
``mlx_sa3.batch.group_jobs``, each group one per-item ``generate_to_file`` call). ``--dit-only`` measures just what
decides masking vs grouping by length: one DiT step at batch 2 against two steps at batch 1, and a padded batch 2
(two lengths padded to the longer) against the two lengths alone.

    flock /tmp/heavy.lock python benchmarks/bench_batch.py --dit-only
    flock /tmp/heavy.lock python benchmarks/bench_batch.py --clips 4 --json batch.json
    flock /tmp/heavy.lock python benchmarks/bench_batch.py --ranks 2     # also 2 local ranks through mlx.launch

On a 2-core CPU two ranks share the same cores: that measures the launcher's overhead, not a speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlx_sa3  # noqa: F401  (loads OpenBLAS: must come before the first import of mlx)

# isort: split
from mlx_sa3 import batch
from mlx_sa3.demo import full_size_parts, random_model
from mlx_sa3.models.dit import DiT, DiTConfig
from mlx_sa3.pipeline import StableAudio3

import mlx.core as mx
from common import CONTEXT_TOKENS, timed


def dit_only(seconds: float, other_seconds: float, repeats: int) -> dict:
    """Batch 2 vs 2 x batch 1 at one length, and a padded batch 2 vs the two lengths alone."""
    config = DiTConfig.small()
    model = DiT(config)
    mx.eval(model.parameters())

    def step_fn(batch_size: int, length: int):
        k = mx.random.split(mx.random.key(0), 3)
        context = mx.random.normal((batch_size, CONTEXT_TOKENS, config.cond_token_dim), key=k[0])
        prepared = model.prepare(context, mx.random.normal((batch_size, config.global_cond_dim), key=k[1]), None)
        x = mx.random.normal((batch_size, config.io_channels, length), key=k[2])
        mx.eval(prepared.arrays(), x)
        return lambda: mx.eval(model.step(x, 0.5, prepared))

    # the runner's DiT length: ceil(duration) latents + 6 s of headroom
    length = -(-int(seconds * 44100) // 4096) + int(6.0 * 44100 / 4096)
    other = -(-int(other_seconds * 44100) // 4096) + int(6.0 * 44100 / 4096)
    one = timed(step_fn(1, length), repeats)
    two = timed(step_fn(2, length), repeats)
    one_other = timed(step_fn(1, other), repeats)
    padded = two if other <= length else timed(step_fn(2, other), repeats)
    return {
        "seconds": seconds,
        "length": length,
        "step_batch1_s": one,
        "step_batch2_s": two,
        "batch2_over_two_batch1": two / (2 * one),
        "other_seconds": other_seconds,
        "other_length": other,
        "step_batch1_other_s": one_other,
        "padded_batch2_over_solo_pair": padded / (one + one_other),
    }


def full_pipe(model: str = "random", dtype=None) -> StableAudio3:
    """``random``: the full-size small model with random weights, built in-process; else a checkpoint or ``demo``."""
    if model == "random":
        return StableAudio3(random_model(*full_size_parts("small"), dtype=dtype))
    return StableAudio3.from_pretrained(model, dtype=dtype)


def jobs_for(clips: int, seconds: float, steps: int) -> list:
    return [
        batch.Job(
            i + 1,
            f"clip{i:03d}",
            {
                "prompt": f"sound {i}",
                "duration": seconds,
                "seed": i,
                "steps": steps,
                "negative_prompt": None,
                "sampler": None,
                "cfg_scale": 1.0,
                "init_audio": None,
                "init_noise_level": None,
                "inpaint_audio": None,
                "inpaint_regions": None,
            },
            f"clip{i:03d}.wav",
        )
        for i in range(clips)
    ]


def run_jobs(pipe, jobs, max_batch: int, out_dir: Path, rank: int = 0, size: int = 1) -> float:
    """What the runner does for this rank's share; returns the seconds it took."""
    mine = batch.split_batches(batch.group_jobs(jobs, max_batch), size)[rank]
    start = time.perf_counter()
    for group in mine:
        pipe.generate_to_file(
            [out_dir / j.file for j in group],
            [j.settings["prompt"] for j in group],
            duration=[j.settings["duration"] for j in group],
            seed=[j.seed for j in group],
            steps=group[0].settings["steps"],
            overwrite=True,  # the same names in each round of the table
        )
    return time.perf_counter() - start


def max_batch_table(clips: int, seconds: float, steps: int, sizes: list[int], model: str = "random") -> list[dict]:
    pipe = full_pipe(model)
    jobs = jobs_for(clips, seconds, steps)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_batch_") as tmp:
        run_jobs(pipe, jobs[:1], 1, Path(tmp))  # warm-up
        for size in sizes:
            mx.reset_peak_memory()
            wall = run_jobs(pipe, jobs, size, Path(tmp))
            print(f"max-batch {size}: {clips} clips in {wall:.1f} s, MLX peak {mx.get_peak_memory() / 1e9:.2f} GB")
            for f in Path(tmp).iterdir():
                f.unlink()
            rows.append(
                {
                    "max_batch": size,
                    "clips": clips,
                    "seconds": wall,
                    "clips_per_hour": clips * 3600 / wall,
                    "mlx_peak_gb": mx.get_peak_memory() / 1e9,
                }
            )
    base = rows[0]["mlx_peak_gb"]
    for row in rows:
        row["gb_per_extra_item"] = (row["mlx_peak_gb"] - base) / (row["max_batch"] - 1) if row["max_batch"] > 1 else 0.0
    return rows


def worker(args) -> None:
    """One rank under mlx.launch: its share of the jobs, then the slowest rank's wall time from rank 0."""
    ranks = batch.Ranks()
    pipe = full_pipe(args.model)
    jobs = jobs_for(args.clips, args.seconds, args.steps)
    with tempfile.TemporaryDirectory(prefix=f"bench_batch_r{ranks.rank}_") as tmp:
        ranks.sum([0.0])
        start = time.perf_counter()
        run_jobs(pipe, jobs, args.worker_batch, Path(tmp), ranks.rank, ranks.size)
        ranks.sum([0.0])  # wait for the slowest rank
        wall = time.perf_counter() - start
    if ranks.rank == 0:
        print(
            json.dumps(
                {"ranks": ranks.size, "clips": args.clips, "seconds": wall, "clips_per_hour": args.clips * 3600 / wall}
            )
        )


def ranks_row(args, count: int) -> dict:
    launcher = shutil.which("mlx.launch")
    cmd = [
        *([launcher] if launcher else [sys.executable, "-m", "mlx._distributed_utils.launch"]),
        "-n",
        str(count),
        "--",
        sys.executable,
        __file__,
        "--worker",
        "--worker-batch",
        "1",
        "--clips",
        str(args.clips),
        "--seconds",
        str(args.seconds),
        "--steps",
        str(args.steps),
        "--model",
        args.model,
    ]
    if count == 1:
        cmd = cmd[cmd.index("--") + 1 :]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dit-only", action="store_true", help="only the DiT step comparison (batch 2 vs 2 x batch 1)")
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--other-seconds", type=float, default=5.0, help="second length for the padded comparison")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--clips", type=int, default=4)
    p.add_argument("--max-batch", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--ranks", type=int, default=1, help="also compare 1 rank with this many local ranks")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the results here")
    p.add_argument("--no-dit", action="store_true", help="skip the DiT step comparison")
    p.add_argument("--model", default="random", help="random (full-size small, in-process), a checkpoint, or demo")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--worker-batch", type=int, default=1, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)

    sys.stdout.reconfigure(line_buffering=True)  # tables appear as each part finishes
    results = {}

    def save():
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))

    if not args.no_dit:
        results["dit"] = dit_only(args.seconds, args.other_seconds, args.repeats)
        d = results["dit"]
        print(
            f"DiT step, small, {d['seconds']:g} s ({d['length']} latents): batch 1 {d['step_batch1_s']:.3f} s, "
            f"batch 2 {d['step_batch2_s']:.3f} s -> batch 2 / (2 x batch 1) = {d['batch2_over_two_batch1']:.2f}"
        )
        print(
            f"padded batch 2 ({d['seconds']:g} s + {d['other_seconds']:g} s at {d['length']} latents) / the two alone "
            f"= {d['padded_batch2_over_solo_pair']:.2f}"
        )
        save()
    if not args.dit_only:
        results["max_batch"] = max_batch_table(args.clips, args.seconds, args.steps, args.max_batch, args.model)
        mx.clear_cache()
        print(
            f"\n{args.clips} clips of {args.seconds:g} s, {args.steps} steps\n| max-batch | clips/hour | MLX peak GB "
            "| GB per extra item |\n|---|---|---|---|"
        )
        for r in results["max_batch"]:
            row = [
                r["max_batch"],
                f"{r['clips_per_hour']:.0f}",
                f"{r['mlx_peak_gb']:.2f}",
                f"{r['gb_per_extra_item']:.2f}",
            ]
            print("| " + " | ".join(map(str, row)) + " |")
        save()
        if args.ranks > 1:
            results["ranks"] = [ranks_row(args, 1), ranks_row(args, args.ranks)]
            print("\n| ranks | clips/hour |\n|---|---|")
            for r in results["ranks"]:
                print(f"| {r['ranks']} | {r['clips_per_hour']:.0f} |")
    save()


if __name__ == "__main__":
    main()
