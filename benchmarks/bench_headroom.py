"""The speed that ``--headroom 0`` buys: end-to-end generation with the official 6 s headroom vs none.

Loads one checkpoint once and runs the two settings interleaved (6, 0, 0, 6, ...) at each duration, so drift of a
shared machine hits both alike; prints the time ratio headroom-6 / headroom-0 per duration and writes JSON.

    python benchmarks/bench_headroom.py /tmp/sa3rand/small --durations 10 30 --steps 8 --json headroom.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlx_sa3  # noqa: F401  (loads OpenBLAS before mlx)
from mlx_sa3.pipeline import StableAudio3


def run(pipe: StableAudio3, seconds: float, steps: int, headroom: float, out: Path) -> dict:
    start = time.perf_counter()
    result = pipe.generate_to_file(
        out, "a slow ambient pad", seconds, steps=steps, seed=0, sampler="euler", duration_padding_sec=headroom
    )
    return {"total_s": time.perf_counter() - start, **result.timings}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="checkpoint directory (or 'demo')")
    p.add_argument("--durations", type=float, nargs="+", default=[10.0, 30.0])
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--repeats", type=int, default=1, help="pairs per duration (each pair: 6 then 0, or 0 then 6)")
    p.add_argument("--json")
    args = p.parse_args(argv)
    pipe = StableAudio3.from_pretrained(args.model, dtype="float32")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        run(pipe, 1.0, 1, 0.0, Path(tmp) / "warm.wav")  # first-call costs out of the measurement
        for seconds in args.durations:
            times = {6.0: [], 0.0: []}
            sampling = {6.0: [], 0.0: []}
            for r in range(args.repeats):
                for headroom in (6.0, 0.0) if r % 2 == 0 else (0.0, 6.0):
                    result = run(pipe, seconds, args.steps, headroom, Path(tmp) / "out.wav")
                    times[headroom].append(result["total_s"])
                    sampling[headroom].append(result["sampling"])
            lengths = {h: pipe.plan("x", seconds, duration_padding_sec=h).length for h in times}
            row = {
                "seconds": seconds,
                "steps": args.steps,
                "latents_headroom_6": lengths[6.0],
                "latents_headroom_0": lengths[0.0],
                "ratio_6_over_0": statistics.median(times[6.0]) / statistics.median(times[0.0]),
                "sampling_ratio_6_over_0": statistics.median(sampling[6.0]) / statistics.median(sampling[0.0]),
            }
            rows.append(row)
            print(
                f"{seconds:g} s, {args.steps} steps: DiT length {row['latents_headroom_6']} -> "
                f"{row['latents_headroom_0']} latents, time ratio headroom 6 / 0 = {row['ratio_6_over_0']:.2f} "
                f"(sampling alone {row['sampling_ratio_6_over_0']:.2f})",
                flush=True,
            )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
