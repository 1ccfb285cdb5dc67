"""DiT step time and velocity quality with bfloat16 weight storage (``weights_dtype="bfloat16"``) against float32.

    flock /tmp/heavy.lock python benchmarks/bench_weights_dtype.py /tmp/sa3rand/small --seconds 10 30 120

Both DiTs are loaded from the same checkpoint; each round times one float32 step then one bfloat16-storage step on
the same inputs (CFG off), so the ratio of a round is measured under the same machine load; the median ratio over
rounds is reported. Quality: one forward's velocity, cosine and relative errors (RMS and max-norm) against float32.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import mlx_sa3  # noqa: F401  (loads the BLAS before mlx)
from mlx_sa3.checkpoint import load_dit

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from common import CONTEXT_TOKENS, latent_length  # noqa: E402


def _inputs(config, seconds: float):
    k1, k2, k3 = mx.random.split(mx.random.key(0), 3)
    context = mx.random.normal((1, CONTEXT_TOKENS, config.cond_token_dim), key=k1)
    global_cond = mx.random.normal((1, config.global_cond_dim), key=k2)
    # the sampler's canvas: the requested seconds plus 6 s of headroom
    x = mx.random.normal((1, config.io_channels, latent_length(seconds + 6.0)), key=k3)
    return context, global_cond, x


def _step_time(model, x, prepared) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    v = model.step(x, 0.5, prepared)
    mx.eval(v)
    return time.perf_counter() - start, np.asarray(v)


def quality(v: np.ndarray, ref: np.ndarray) -> dict:
    v, ref = v.astype(np.float64).ravel(), ref.astype(np.float64).ravel()
    return {
        "cosine": float(v @ ref / np.linalg.norm(v) / np.linalg.norm(ref)),
        "rel_rms": float(np.linalg.norm(v - ref) / np.linalg.norm(ref)),
        "rel_max": float(np.abs(v - ref).max() / np.abs(ref).max()),
    }


def bench(fp32, bf16, seconds: float, rounds: int) -> dict:
    context, global_cond, x = _inputs(fp32.config, seconds)
    prepared = {name: m.prepare(context, global_cond, None, cfg=False) for name, m in (("fp32", fp32), ("bf16", bf16))}
    _, v32 = _step_time(fp32, x, prepared["fp32"])  # warm-up, and the reference velocity
    _, v16 = _step_time(bf16, x, prepared["bf16"])
    times = {"fp32": [], "bf16": []}
    for _ in range(rounds):
        for name, model in (("fp32", fp32), ("bf16", bf16)):
            times[name].append(_step_time(model, x, prepared[name])[0])
    ratios = [b / a for a, b in zip(times["fp32"], times["bf16"])]
    return {
        "seconds": seconds,
        "step_s_fp32": statistics.median(times["fp32"]),
        "step_s_bf16": statistics.median(times["bf16"]),
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        **quality(v16, v32),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint")
    p.add_argument("--seconds", type=float, nargs="+", default=[10.0, 30.0, 120.0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json")
    args = p.parse_args(argv)
    fp32, bf16 = load_dit(args.checkpoint), load_dit(args.checkpoint, weights_dtype="bfloat16")
    rows = []
    print(f"{'sec':>5} {'fp32 s':>7} {'bf16 s':>7} {'ratio':>6} {'cosine':>10} {'rel rms':>9} {'rel max':>9}")
    for seconds in args.seconds:
        r = bench(fp32, bf16, seconds, args.rounds)
        rows.append(r)
        print(
            f"{seconds:>5g} {r['step_s_fp32']:>7.2f} {r['step_s_bf16']:>7.2f} {r['ratio_median']:>6.3f} "
            f"{r['cosine']:>10.7f} {r['rel_rms']:>9.2e} {r['rel_max']:>9.2e}  "
            f"rounds {', '.join(f'{x:.3f}' for x in r['ratios'])}",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
