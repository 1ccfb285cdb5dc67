"""Speed of one DiT sampling step (full-size small and medium, random weights) against the machine's GEMM rate.

For each model and duration: the step-invariant work (``prepare``: context embedding, cross-attention K/V of every
block, inpainting embeddings) and one ``step`` without and with CFG (batch 2 inside the call). FLOPs per step are
counted from the shapes (matmuls and attention products, the work the implementation executes: the null-context
branch's cross-attention is exactly zero and skipped) and divided by time and by the measured fp32 GEMM rate.

    python benchmarks/bench_dit.py --quick            # small model, 10 s only
    python benchmarks/bench_dit.py --json dit.json    # small and medium at 10, 30, 120 s
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
from pathlib import Path

import mlx_sa3  # noqa: F401  (loads the BLAS before mlx)
from mlx_sa3.dit import DiT, DiTConfig
from mlx_sa3.info import describe, gemm_gflops
from mlx_sa3.loading import parse_dtype

import mlx.core as mx  # noqa: E402
from common import CONTEXT_TOKENS, latent_length, step_flops, timed

CONFIGS = {"small": DiTConfig.small, "medium": DiTConfig.medium}


def bench_one(name: str, seconds: float, dtype, repeats: int) -> dict:
    config = CONFIGS[name]()
    model = DiT(config)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    length = latent_length(seconds)
    key = mx.random.key(0)
    k1, k2, k3, k4 = mx.random.split(key, 4)
    context = mx.random.normal((1, CONTEXT_TOKENS, config.cond_token_dim), key=k1)
    global_cond = mx.random.normal((1, config.global_cond_dim), key=k2)
    x = mx.random.normal((1, config.io_channels, length), key=k3)
    local = mx.random.normal((1, config.local_add_cond_dim, length), key=k4)

    prepare_s = timed(lambda: model.prepare(context, global_cond, None, cfg=True), repeats)
    prepare_inpaint_s = timed(lambda: model.prepare(context, global_cond, local, cfg=True), repeats)
    prepared = model.prepare(context, global_cond, None, cfg=True)
    step_s = timed(lambda: mx.eval(model.step(x, 0.5, prepared)), repeats)
    step_cfg_s = timed(lambda: mx.eval(model.step(x, 0.5, prepared, cfg_scale=3.0)), repeats)

    flops = step_flops(config, length, rows=1, cross_rows=1)
    flops_cfg = step_flops(config, length, rows=2, cross_rows=1)
    result = {
        "model": name,
        "seconds": seconds,
        "latents": length,
        "dtype": str(dtype),
        "prepare_s": prepare_s,
        "prepare_inpaint_s": prepare_inpaint_s,
        "step_s": step_s,
        "step_cfg_s": step_cfg_s,
        "gflop_step": flops / 1e9,
        "gflop_step_cfg": flops_cfg / 1e9,
        "gflops_step": flops / step_s / 1e9,
        "gflops_step_cfg": flops_cfg / step_cfg_s / 1e9,
    }
    return result


def bench_text(dtype, repeats: int) -> list[dict]:
    """The full-size T5Gemma encoder (random weights) on batches of 1 and 2 prompts at max_length 256."""
    from mlx_sa3.checkpoint import FULL_SIZE_TEXT_CONFIG
    from mlx_sa3.demo import train_tokenizer
    from mlx_sa3.t5gemma import T5GemmaConfig, T5GemmaEncoder, T5GemmaTokenizer, TextEncoder

    encoder = T5GemmaEncoder(T5GemmaConfig.from_dict(FULL_SIZE_TEXT_CONFIG))
    encoder.set_dtype(dtype)
    mx.eval(encoder.parameters())
    with tempfile.TemporaryDirectory() as tmp:
        train_tokenizer(Path(tmp))
        text = TextEncoder(encoder, T5GemmaTokenizer.from_dir(tmp, 256))
    prompts = ["warm analog synth pad with a slow attack", "rain on a tin roof, distant thunder"]
    return [{"batch": b, "text_s": timed(lambda: mx.eval(text.encode(prompts[:b])), repeats)} for b in (1, 2)]


def print_table(rows: list[dict], gemm: float) -> None:
    print(f"GEMM rate (2048^3, best seen): {gemm:.1f} GFLOP/s")
    header = (
        f"{'model':>6} {'sec':>5} {'L':>5} {'prep s':>7} {'prep+inp':>8} {'step s':>7} {'GFLOP':>7} "
        f"{'GF/s':>6} {'%gemm':>6} {'cfg s':>7} {'GF/s':>6} {'%gemm':>6}"
    )
    print(header)
    for r in rows:
        print(
            f"{r['model']:>6} {r['seconds']:>5g} {r['latents']:>5} {r['prepare_s']:>7.3f} "
            f"{r['prepare_inpaint_s']:>8.3f} {r['step_s']:>7.3f} {r['gflop_step']:>7.0f} {r['gflops_step']:>6.1f} "
            f"{100 * r['gemm_fraction']:>5.1f}% {r['step_cfg_s']:>7.3f} {r['gflops_step_cfg']:>6.1f} "
            f"{100 * r['gemm_fraction_cfg']:>5.1f}%"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=sorted(CONFIGS), default=["small", "medium"])
    parser.add_argument("--seconds", nargs="+", type=float, default=[10.0, 30.0, 120.0])
    parser.add_argument("--dtype", default="float32", help="float32 | float16 | bfloat16 (weights and matmuls)")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls after one warm-up (median reported)")
    parser.add_argument("--quick", action="store_true", help="small model at 10 s, one timed call")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.models, args.seconds, args.repeats = ["small"], [10.0], 1

    dtype = parse_dtype(args.dtype)
    gemm = gemm_gflops(dtype=dtype)
    rows = []
    for name in args.models:
        for sec in args.seconds:
            rows.append(bench_one(name, sec, dtype, args.repeats))
            # On a shared machine the GEMM rate drifts: take the best seen so far, so fractions are lower bounds.
            gemm = max(gemm, gemm_gflops(dtype=dtype))
    for row in rows:
        row["gemm_fraction"] = row["gflops_step"] / gemm
        row["gemm_fraction_cfg"] = row["gflops_step_cfg"] / gemm
    print_table(rows, gemm)
    text = bench_text(dtype, args.repeats)
    print(
        "T5Gemma encoder (12 x 768), max_length 256: "
        + ", ".join(f"batch {r['batch']} {r['text_s']:.2f} s" for r in text)
    )
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_rss_mb:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": describe(),
                    "gemm_gflops": gemm,
                    "peak_rss_mb": peak_rss_mb,
                    "results": rows,
                    "text_encoder": text,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
