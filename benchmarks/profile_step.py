"""Where one DiT sampling step spends its time, by op class: GEMM / attention products / attention softmax /
elementwise / copies.

The step of the MLX DiT (full-size random weights, plain text-to-audio: no inpainting input, CFG off) is re-run op by
op with an ``mx.eval`` barrier after each sub-op, timing each under its class; the instrumented step is checked to
give the same velocity as ``DiT.step``. Barriers remove MLX's overlap and fusion across sub-ops, so the table gives
shares, and the un-instrumented step time is printed beside it.

    python benchmarks/profile_step.py                       # small model, 30 s (387 latents + 64 memory tokens)
    python benchmarks/profile_step.py --model medium --seconds 10 --json profile.json
"""
# ruff: noqa: I001  (mlx_sa3 must be imported before mlx: it preloads the BLAS)

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict

import mlx_sa3  # noqa: F401  (loads the BLAS before the first import of mlx)
from mlx_sa3 import dit as D
from mlx_sa3.info import describe, gemm_gflops
from mlx_sa3.pipeline import HEADROOM_SECONDS

import mlx.core as mx

CLASSES = ("GEMM (linear layers)", "attention products", "attention softmax", "elementwise", "copies")
GEMM, PRODUCTS, SOFTMAX, ELEMENTWISE, COPIES = CLASSES
SAMPLE_RATE, HOP, CONTEXT_TOKENS = 44100, 4096, 257


def pipeline_latents(seconds: float, align: int = 2) -> int:
    """Latents the pipeline samples for a request (mlx_sa3.pipeline.StableAudio3.plan: ceil(duration) + 6 s)."""
    canvas = -(-int((seconds + HEADROOM_SECONDS) * SAMPLE_RATE) // (HOP * align)) * align
    return min(canvas, math.ceil(int(seconds * SAMPLE_RATE) / HOP) + int(HEADROOM_SECONDS * SAMPLE_RATE / HOP))


class Timer:
    def __init__(self):
        self.seconds = defaultdict(float)
        self.flops = defaultdict(float)

    def __call__(self, cls: str, fn, *args, flops: float = 0.0):
        start = time.perf_counter()
        out = fn(*args)
        mx.eval(out)
        self.seconds[cls] += time.perf_counter() - start
        self.flops[cls] += flops
        return out


def _linear(timer: Timer, layer, x: mx.array) -> mx.array:
    flops = 2 * x.size * layer.weight.shape[0]
    return timer(GEMM, layer, x, flops=flops)


def _attention(timer: Timer, q, k, v, scale: float) -> mx.array:
    """The CPU path of mlx_sa3.dit._attention, sub-op by sub-op."""
    batch, heads, queries, dims = q.shape
    keys = k.shape[2]
    chunk = max(1, D._SCORES_PER_CHUNK // (batch * heads * keys))
    keys_t = timer(COPIES, lambda: k.swapaxes(-1, -2))
    v_ones = timer(COPIES, lambda: mx.concatenate([v, mx.ones((*v.shape[:-1], 1), v.dtype)], axis=-1))
    outs = []
    for start in range(0, queries, chunk):
        qs = timer(ELEMENTWISE, lambda s=start: q[:, :, s : s + chunk] * (scale * D._LOG2E))
        n = qs.shape[2]
        scores = timer(PRODUCTS, lambda qs=qs: qs @ keys_t, flops=2 * batch * heads * n * keys * dims)
        e = timer(SOFTMAX, D._softmax_weights, scores)
        pv = timer(PRODUCTS, lambda e=e: e @ v_ones, flops=2 * batch * heads * n * keys * (dims + 1))
        outs.append(timer(ELEMENTWISE, lambda pv=pv: (pv[..., :dims] / pv[..., dims:]).astype(v.dtype)))
    return outs[0] if len(outs) == 1 else timer(COPIES, lambda: mx.concatenate(outs, axis=2))


def _self_attention(timer: Timer, attn: D.SelfAttention, x: mx.array) -> mx.array:
    parts = 5 if attn.differential else 3
    projected = _linear(timer, attn.to_qkv, x)  # timed on its own: a nested timer would count it twice
    chunks = timer(COPIES, lambda: D._split_heads(projected, parts, attn.heads))
    q = timer(ELEMENTWISE, lambda: attn._rope(attn.q_norm(chunks[0])))
    k = timer(ELEMENTWISE, lambda: attn._rope(attn.k_norm(chunks[1])))
    v = timer(COPIES, lambda: chunks[2].transpose(0, 2, 1, 3))
    out = _attention(timer, q, k, v, attn.scale)
    if attn.differential:
        q2 = timer(ELEMENTWISE, lambda: attn._rope(attn.q_norm(chunks[3])))
        k2 = timer(ELEMENTWISE, lambda: attn._rope(attn.k_norm(chunks[4])))
        second = _attention(timer, q2, k2, v, attn.scale)
        out = timer(ELEMENTWISE, lambda: out - second)
    return _linear(timer, attn.to_out, timer(COPIES, D._merge_heads, out))


def _cross_attention(timer: Timer, attn: D.CrossAttention, x: mx.array, kv) -> mx.array:
    parts = 2 if attn.differential else 1
    projected = _linear(timer, attn.to_q, x)
    queries = timer(COPIES, lambda: D._split_heads(projected, parts, attn.heads))
    queries = [timer(ELEMENTWISE, lambda q=q: attn.q_norm(q).transpose(0, 2, 1, 3)) for q in queries]
    out = _attention(timer, queries[0], kv[0], kv[-1], attn.scale)
    if attn.differential:
        second = _attention(timer, queries[1], kv[1], kv[-1], attn.scale)
        out = timer(ELEMENTWISE, lambda: out - second)
    return _linear(timer, attn.to_out, timer(COPIES, D._merge_heads, out))


def _block(timer: Timer, layer: D.TransformerBlock, h, mod, kv, local) -> mx.array:
    """TransformerBlock.__call__ for the plain case (every row cross-attends)."""
    scale_sa, shift_sa, gate_sa, scale_ff, shift_ff, gate_ff = mod
    x = timer(ELEMENTWISE, D._norm_modulate, h, layer.pre_norm.weight, scale_sa, shift_sa, layer.pre_norm.eps)
    branch = _self_attention(timer, layer.self_attn, x)
    h = timer(ELEMENTWISE, D._gated_residual, h, branch, gate_sa)
    cross = _cross_attention(timer, layer.cross_attn, timer(ELEMENTWISE, layer.cross_attend_norm, h), kv)
    h = timer(ELEMENTWISE, lambda: D._add_per_item(h + cross, local))
    x = timer(ELEMENTWISE, D._norm_modulate, h, layer.ff_norm.weight, scale_ff, shift_ff, layer.ff_norm.eps)
    projected = _linear(timer, layer.ff.proj_in, x)
    branch = _linear(timer, layer.ff.proj_out, timer(ELEMENTWISE, D._swiglu, projected))
    return timer(ELEMENTWISE, D._gated_residual, h, branch, gate_ff)


def profiled_velocity(timer: Timer, dit: D.DiT, x: mx.array, t: mx.array, prepared) -> mx.array:
    """DiT._velocity (unguided) with every sub-op timed."""
    config, dtype = dit.config, dit.dtype
    h = timer(COPIES, lambda: x.transpose(0, 2, 1))
    conv = timer(GEMM, dit.preprocess_conv, h, flops=2 * h.size * config.io_channels)
    h = timer(ELEMENTWISE, lambda: h + conv)
    h = _linear(timer, dit.project_in, h)
    features = timer(ELEMENTWISE, lambda: D.timestep_features(t, config.timestep_features_dim).astype(dtype))
    temb = timer(GEMM, dit.to_timestep_embed, features)
    global_mod = timer(GEMM, dit.global_cond_embedder, prepared.global_embed + temb)
    batch, _, dim = h.shape
    memory = mx.broadcast_to(dit.memory_tokens.astype(dtype), (batch, config.num_memory_tokens, dim))
    h = timer(COPIES, lambda: mx.concatenate([memory, h], axis=1))
    locals_ = timer(ELEMENTWISE, dit._block_locals, prepared, h.shape[1])
    for layer, kv, local in zip(dit.layers, prepared.kv, locals_):
        mod = timer(ELEMENTWISE, layer.modulation, global_mod)
        h = _block(timer, layer, h, mod, kv, local)
    h = timer(COPIES, lambda: h[:, config.num_memory_tokens :])
    h = _linear(timer, dit.project_out, h)
    conv = timer(GEMM, dit.postprocess_conv, h, flops=2 * h.size * config.io_channels)
    h = timer(ELEMENTWISE, lambda: h + conv)
    return timer(COPIES, lambda: h.transpose(0, 2, 1))


def random_dit(variant: str, seed: int = 0) -> D.DiT:
    mx.random.seed(seed)
    dit = D.DiT(D.DiTConfig.small() if variant == "small" else D.DiTConfig.medium())
    dit.memory_tokens = mx.random.normal(dit.memory_tokens.shape) * 0.02
    mx.eval(dit.parameters())
    return dit


def run(variant: str, seconds: float, repeats: int) -> dict:
    dit = random_dit(variant)
    config = dit.config
    length = pipeline_latents(seconds)
    key = mx.random.key(1)
    x = mx.random.normal((1, config.io_channels, length), key=key)
    prepared = dit.prepare(
        mx.random.normal((1, CONTEXT_TOKENS, config.cond_token_dim), key=key) * 0.5,
        mx.random.normal((1, config.global_cond_dim), key=key) * 0.5,
    )
    t = mx.array([0.7])
    reference = dit.step(x, t, prepared)
    mx.eval(reference)
    plain = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(dit.step(x, t, prepared))
        plain.append(time.perf_counter() - start)
    best = None
    for _ in range(repeats):
        timer = Timer()
        start = time.perf_counter()
        v = profiled_velocity(timer, dit, x, t, prepared).astype(mx.float32)
        total = time.perf_counter() - start
        if best is None or total < best[0]:
            best = (total, timer, v)
    total, timer, v = best
    diff = float(mx.max(mx.abs(v - reference)).item() / mx.max(mx.abs(reference)).item())
    gemm_rate = gemm_gflops(2048)
    rows = []
    for cls in CLASSES:
        sec = timer.seconds.get(cls, 0.0)
        flops = timer.flops.get(cls, 0.0)
        rows.append(
            {
                "class": cls,
                "ms": 1e3 * sec,
                "share": sec / sum(timer.seconds.values()),
                "gflop": flops / 1e9,
                "gflops_per_s": flops / sec / 1e9 if flops and sec else None,
            }
        )
    return {
        "model": variant,
        "seconds": seconds,
        "latents": length,
        "tokens": length + config.num_memory_tokens,
        "step_ms": 1e3 * min(plain),
        "instrumented_ms": 1e3 * total,
        "max_rel_diff_vs_step": diff,
        "gemm_2048_gflops": gemm_rate,
        "rows": rows,
        "machine": describe(),
    }


def print_table(result: dict) -> None:
    print(
        f"{result['model']} DiT, {result['seconds']:g} s: {result['latents']} latents + memory = "
        f"{result['tokens']} tokens; CFG off, fp32, {result['machine']['blas']}"
    )
    print(
        f"step {result['step_ms']:.0f} ms (plain), {result['instrumented_ms']:.0f} ms instrumented; "
        f"GEMM 2048^3 {result['gemm_2048_gflops']:.0f} GFLOP/s; instrumented vs step max rel diff "
        f"{result['max_rel_diff_vs_step']:.1e}"
    )
    print(f"{'op class':<24}{'ms':>9}{'share':>8}{'GFLOP':>9}{'GFLOP/s':>9}")
    for row in result["rows"]:
        rate = f"{row['gflops_per_s']:.0f}" if row["gflops_per_s"] else "-"
        print(f"{row['class']:<24}{row['ms']:>9.1f}{100 * row['share']:>7.1f}%{row['gflop']:>9.1f}{rate:>9}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("small", "medium"), default="small")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many (default 3)")
    parser.add_argument("--json", help="also write the result here")
    args = parser.parse_args(argv)
    result = run(args.model, args.seconds, args.repeats)
    print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
