"""Where one DiT sampling step spends its time, by op class: GEMM / attention products / attention softmax /
elementwise / copies.

The step of the MLX DiT (full-size random weights, plain text-to-audio: no inpainting input, CFG off) is re-run op by
op with an ``mx.eval`` barrier after each sub-op, timing each under its class; the instrumented step is checked to
give the same velocity as ``DiT.step``. Barriers remove MLX's overlap and fusion across sub-ops, so the table gives
shares, and the un-instrumented step time is printed beside it.

    python benchmarks/profile_step.py                       # small model, 30 s (387 latents + 64 memory tokens)
    python benchmarks/profile_step.py --model medium --seconds 10 --json profile.json

``--backend torch --checkpoint DIR`` profiles the torch backend's step instead (``TorchDiT``, loaded from a full-size
checkpoint such as ``benchmarks/random_checkpoint.py``'s) with torch.profiler: the self time of each aten op, summed
by class (GEMM / attention / elementwise / copies / views and other), against the step's wall time (the rest is
Python and the MLX <-> torch conversions). ``--diffusers-blocks`` profiles diffusers' block forwards as they are
(``TorchDiT._reference_velocity``) for a before/after table; ``--dtype bfloat16`` the bfloat16 DiT.
"""
# ruff: noqa: I001  (mlx_sa3 must be imported before mlx: it preloads the BLAS)

from __future__ import annotations

import argparse
import json
import math
import statistics
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
    v_ones = timer(COPIES, D._with_ones, v)
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


# ------------------------------------------------------------------------------------------------ torch backend

TORCH_CLASSES = ("GEMM (linear layers)", "attention (SDPA)", "elementwise", "copies", "views and other")
#: aten ops by class (self time); anything not listed is "views and other" (views, dispatch, allocation)
_TORCH_OPS = {
    "GEMM (linear layers)": ("addmm", "mm", "bmm", "linear_pointwise", "mkl_linear", "slow_conv2d_forward"),
    "elementwise": (
        "mul",
        "add",
        "sub",
        "div",
        "neg",
        "rsub",
        "silu",
        "sigmoid",
        "rsqrt",
        "pow",
        "mean",
        "sum",
        "cos",
        "sin",
        "exp",
        "rms_norm",
        "addcmul",
        "fill",
        "zero",
        "any",
        "ne",
        "where",
        "linspace",
    ),
    "copies": ("copy", "cat", "clone", "contiguous", "to_copy", "index", "stack"),
}


def torch_op_class(name: str) -> str:
    """The class of an aten op (``aten::addmm`` -> GEMM) by its base name, leading/trailing underscores dropped."""
    base = name.rpartition("::")[2].strip("_")
    if "attention" in base:
        return "attention (SDPA)"
    return next((cls for cls, names in _TORCH_OPS.items() if base in names), TORCH_CLASSES[-1])


def run_torch(checkpoint: str, seconds: float, repeats: int, dtype: str, diffusers_blocks: bool) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from mlx_sa3.torch_backend import load_torch_dit
    from mlx_sa3.torch_backend.common import gemm_gflops as torch_gemm_gflops
    from mlx_sa3.torch_backend.common import onednn_linear

    dit = load_torch_dit(checkpoint, dtype)
    config = dit.config
    length = pipeline_latents(seconds)
    key = mx.random.key(1)
    x = mx.random.normal((1, config.io_channels, length), key=key).astype(dit.dtype)
    prepared = dit.prepare(
        mx.random.normal((1, CONTEXT_TOKENS, config.cond_token_dim), key=key) * 0.5,
        mx.random.normal((1, config.global_cond_dim), key=key) * 0.5,
    )
    t = mx.array([0.7])
    velocity = dit._reference_velocity if diffusers_blocks else dit._velocity
    onednn_linear()  # its one-off self-check calls F.linear outside the step
    threads = []
    linear = torch.nn.functional.linear

    def counting(*args, **kwargs):  # torch's threads inside the step (its context sets them), seen at the first call
        threads.append(torch.get_num_threads())
        return linear(*args, **kwargs)

    torch.nn.functional.linear = counting
    try:
        mx.eval(velocity(x, t, prepared, False))
    finally:
        torch.nn.functional.linear = linear
    mx.eval(velocity(x, t, prepared, False))  # warm-up: first use pages the mapped weights in
    plain = []
    for _ in range(repeats):
        start = time.perf_counter()
        mx.eval(velocity(x, t, prepared, False))
        plain.append(time.perf_counter() - start)
    best = None
    for _ in range(repeats):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            start = time.perf_counter()
            mx.eval(velocity(x, t, prepared, False))
            total = time.perf_counter() - start
        if best is None or total < best[0]:
            best = (total, prof.key_averages())
    total, averages = best
    seconds_by = defaultdict(float)
    calls_by = defaultdict(int)
    for event in averages:
        cls = torch_op_class(event.key)
        seconds_by[cls] += event.self_cpu_time_total / 1e6
        calls_by[cls] += event.count
    flops = step_flops(config, length)
    if diffusers_blocks:  # diffusers' blocks also recompute the step-invariant cross-attention K/V and local terms
        e, kv_parts = config.embed_dim, 3 if config.differential else 2
        flops += config.depth * (
            2 * CONTEXT_TOKENS * e * e * kv_parts + 2 * length * (config.local_add_cond_dim + e) * e
        )
    rows = [
        {
            "class": cls,
            "ms": 1e3 * seconds_by[cls],
            "share": seconds_by[cls] / total,
            "calls": calls_by[cls],
            "gflop": flops / 1e9 if cls == TORCH_CLASSES[0] else 0.0,
            "gflops_per_s": flops / seconds_by[cls] / 1e9 if cls == TORCH_CLASSES[0] and seconds_by[cls] else None,
        }
        for cls in TORCH_CLASSES
    ]
    outside = total - sum(seconds_by.values())
    rows.append({"class": "outside aten ops", "ms": 1e3 * outside, "share": outside / total, "calls": 0, "gflop": 0.0})
    return {
        "backend": "torch",
        "blocks": "diffusers" if diffusers_blocks else "mlx_sa3",
        "model": "medium" if config.differential else "small",
        "dtype": str(dit.dtype).replace("mlx.core.", ""),
        "threads": sorted(set(threads)),
        "seconds": seconds,
        "latents": length,
        "tokens": length + config.num_memory_tokens,
        "step_ms": 1e3 * statistics.median(plain),
        "instrumented_ms": 1e3 * total,
        "gemm_2048_gflops": torch_gemm_gflops(2048, dtype=dit.dtype),
        "rows": rows,
        "top_ops": [
            {"op": e.key, "ms": e.self_cpu_time_total / 1e3, "calls": e.count}
            for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:15]
        ],
        "machine": describe(),
    }


def step_flops(config: D.DiTConfig, length: int, context: int = CONTEXT_TOKENS) -> float:
    """GEMM FLOPs of one unguided step: the linear layers of the blocks and the 1x1 convolutions and projections
    around them (per-step work only: the cross-attention keys/values and local terms are step-invariant)."""
    e, n, c, inner = config.embed_dim, config.num_memory_tokens + length, config.io_channels, config.ff_inner
    pairs = 2 if config.differential else 1
    block = 2 * n * e * e * ((2 * pairs + 1) + 1 + pairs + 1) + 2 * n * e * 3 * inner
    return config.depth * block + 2 * (2 * length * c * c) + 2 * (2 * length * c * e)


def print_torch_table(result: dict) -> None:
    print(
        f"torch {result['model']} DiT ({result['blocks']} blocks), {result['seconds']:g} s: {result['latents']} "
        f"latents + memory = {result['tokens']} tokens; CFG off, {result['dtype']}, torch threads {result['threads']}"
    )
    print(
        f"step {result['step_ms']:.0f} ms (median), {result['instrumented_ms']:.0f} ms profiled; torch GEMM 2048^3 "
        f"{result['gemm_2048_gflops']:.0f} GFLOP/s"
    )
    print(f"{'op class':<24}{'ms':>9}{'share':>8}{'calls':>7}{'GFLOP':>8}{'GFLOP/s':>9}")
    for row in result["rows"]:
        rate = f"{row['gflops_per_s']:.0f}" if row.get("gflops_per_s") else "-"
        gflop = f"{row['gflop']:.0f}" if row["gflop"] else "-"
        print(f"{row['class']:<24}{row['ms']:>9.1f}{100 * row['share']:>7.1f}%{row['calls']:>7}{gflop:>8}{rate:>9}")
    print(
        "top ops (self ms, calls): " + ", ".join(f"{o['op']} {o['ms']:.0f} ({o['calls']})" for o in result["top_ops"])
    )


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
    parser.add_argument("--backend", choices=("mlx", "torch"), default="mlx")
    parser.add_argument("--checkpoint", help="torch: a full-size SA3 checkpoint directory (random_checkpoint.py)")
    parser.add_argument("--dtype", default="float32", help="torch: float32 | bfloat16")
    parser.add_argument("--diffusers-blocks", action="store_true", help="torch: diffusers' block forwards as they are")
    args = parser.parse_args(argv)
    if args.backend == "torch":
        if not args.checkpoint:
            parser.error("--backend torch needs --checkpoint")
        result = run_torch(args.checkpoint, args.seconds, args.repeats, args.dtype, args.diffusers_blocks)
        print_torch_table(result)
    else:
        result = run(args.model, args.seconds, args.repeats)
        print_table(result)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
