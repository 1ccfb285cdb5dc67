"""Quantized DiTs against fp32: DiT bytes, step time and velocity quality on a full-size checkpoint.

    python benchmarks/random_checkpoint.py small /tmp/sa3-small
    python benchmarks/bench_quantize.py /tmp/sa3-small --seconds 30 [--json q.json]

For fp32, int8 and int4 (group 64): bytes of the DiT parameters, best-of-N step time (CFG off, plain text-to-audio),
and the velocity of one step on the same inputs against fp32: cosine similarity and relative L2 error, at t = 0.9,
0.5 and 0.1, with MLX's peak memory while the variant loads and steps. With random weights these measure the
arithmetic, not audio quality.

End to end (``--e2e-steps``, default 8; 0 skips): one generation per variant through ``StableAudio3`` with the same
prompt, seed and schedule, the fp32 DiT swapped for the variant's: the velocity of every step against the fp32 DiT's
on the same input (cosine / relative L2), the sampled latents' relative L2 error against the fp32 generation's, and
the cosine of the decoded audio's RMS envelopes (frame RMS over 2048-sample windows, hop 512, per channel).

On MLX's CPU backend quantized matmuls run at ~3 GFLOP/s (measured: 451x1024x4096, int8 and int4, vs ~290 fp32),
so a full-size quantized step takes minutes there: use --seconds 1 on a CPU, or a GPU. ``--cpu-path`` measures what
mlx_sa3 runs on the CPU instead: the quantized DiT dequantized to float32 at load (``checkpoint.load_dit``), so the
stored bytes shrink, the resident ones do not, and the step is an fp32 step on the rounded weights.

``--torch-bf16`` compares the torch backend's bfloat16 DiT with its float32 one instead, the same measures:

    python benchmarks/bench_quantize.py /tmp/sa3-small --torch-bf16 --seconds 10 30 120 --rounds 2

Each round loads each dtype's DiT in turn (never both: the medium float32 DiT alone is 5.8 GB) and times a step at
every duration, so the ratios compare runs under the same machine load; the velocities of round 0 are compared.
End to end it generates with the float32 torch pipeline, then with its DiT swapped for the bfloat16 one (the
tracked per-step velocities as above), then with the whole pipeline in bfloat16 (DiT and T5Gemma; SAME stays
float32), at the first duration.
"""
# ruff: noqa: I001  (mlx_sa3 must be imported before mlx: it preloads the BLAS)

from __future__ import annotations

import argparse
import json
import time

import numpy as np

import mlx_sa3  # noqa: F401
from mlx_sa3 import quantize as Q
from mlx_sa3.dit import DiT, load_dit
from mlx_sa3.pipeline import StableAudio3
from mlx.utils import tree_flatten

import mlx.core as mx
from common import latent_length

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


HEADROOM_LATENTS = 64  # int(6 s * 44100 / 4096): the pipeline samples the duration plus 6 s of headroom


def run(src: str, seconds: float, repeats: int, group_size: int, cpu_path: bool = False) -> list[dict]:
    length = latent_length(seconds) + HEADROOM_LATENTS
    rows, reference = [], None
    for bits in (None, 8, 4):
        mx.reset_peak_memory()
        dit, stored = _variant(src, bits, group_size, cpu_path)
        x, cond, glob = _inputs(dit.config, length)
        prepared = dit.prepare(cond, glob)
        velocities = [dit.step(x, mx.array([t]), prepared) for t in (0.9, 0.5, 0.1)]
        mx.eval(velocities)
        row = {
            "dit": "fp32" if bits is None else f"int{bits} g{group_size}" + (" deq" if cpu_path else ""),
            "bytes": Q.quantized_bytes(dit) if stored is None else stored,
            "resident_bytes": Q.quantized_bytes(dit),
            "step_s": _step_time(dit, x, prepared, repeats),
            "peak_mb": mx.get_peak_memory() / 2**20,
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


def _variant(src: str, bits, group_size: int, cpu_path: bool):
    """The DiT of one row and its stored bytes (None: as resident)."""
    dit = load_dit(src)
    if not bits:
        return dit, None
    config = Q.quantize_dit(dit, bits=bits, group_size=group_size)
    if not cpu_path:
        return dit, None
    return _dequantized(dit, config), Q.quantized_bytes(dit)


class _Tracked:
    """A variant DiT that also runs the fp32 DiT on every step's input and records how far its velocity is."""

    def __init__(self, dit, reference):
        self.dit, self.reference, self.cosine, self.rel_l2 = dit, reference, [], []

    def __getattr__(self, name):
        return getattr(self.dit, name)

    def prepare(self, *args, **kwargs):
        return self.dit.prepare(*args, **kwargs), self.reference.prepare(*args, **kwargs)

    def step(self, x, t, prepared, **kwargs):
        v, v_ref = self.dit.step(x, t, prepared[0], **kwargs), self.reference.step(x, t, prepared[1], **kwargs)
        mx.eval(v, v_ref)
        self.cosine.append(_cosine(v, v_ref))
        self.rel_l2.append(_rel(v, v_ref))
        return v


def _envelope(audio: np.ndarray, window: int = 2048, hop: int = 512) -> np.ndarray:
    frames = np.lib.stride_tricks.sliding_window_view(audio, window, axis=-1)[..., ::hop, :]
    return np.sqrt(np.mean(frames.astype(np.float64) ** 2, axis=-1)).ravel()


def end_to_end(src: str, seconds: float, steps: int, group_size: int, cpu_path: bool, prompt: str) -> list[dict]:
    """Generate once per variant with the same prompt and seed; compare latents and decoded envelopes to fp32."""
    pipe = StableAudio3.from_pretrained(src, backend="mlx", keep_loaded=True)
    reference_dit = pipe.model.dit
    options = {"duration": seconds, "seed": 0, "steps": steps}
    start = time.perf_counter()
    ref = pipe.generate(prompt, **options)
    rows = [{"dit": "fp32", "wall_s": time.perf_counter() - start}]
    for bits in (8, 4):
        dit, _ = _variant(src, bits, group_size, cpu_path)
        pipe.model.dit = tracked = _Tracked(dit, reference_dit)
        start = time.perf_counter()
        out = pipe.generate(prompt, **options)
        name = f"int{bits} g{group_size}" + (" deq" if cpu_path else "")
        # the wall includes the fp32 DiT's step on every input
        rows.append(_e2e_row(name, time.perf_counter() - start, out, ref, tracked))
        pipe.model.dit = reference_dit
        del dit, tracked, out
        mx.clear_cache()
    return rows


def _torch_bytes(dit) -> int:
    return sum(p.numel() * p.element_size() for p in dit.net.parameters())


def run_torch(src: str, seconds: list[float], repeats: int, rounds: int) -> list[dict]:
    """Torch DiT, float32 vs bfloat16: step time per round and duration, velocity quality from round 0."""
    from mlx_sa3.backend import load_dit as backend_load_dit

    rows, reference = [], {}
    for round_index in range(rounds):
        for dtype in ("float32", "bfloat16"):
            dit = backend_load_dit(src, dtype, backend="torch")
            for sec in seconds:
                x, cond, glob = _inputs(dit.config, latent_length(sec) + HEADROOM_LATENTS)
                prepared = dit.prepare(cond, glob)
                row = {"dit": f"torch {dtype}", "round": round_index, "seconds": sec, "bytes": _torch_bytes(dit)}
                if round_index == 0:
                    velocities = [dit.step(x, mx.array([t]), prepared) for t in (0.9, 0.5, 0.1)]
                    mx.eval(velocities)
                    if dtype == "float32":
                        reference[sec] = velocities
                    else:
                        row["cosine"] = [_cosine(v, r) for v, r in zip(velocities, reference[sec])]
                        row["rel_l2"] = [_rel(v, r) for v, r in zip(velocities, reference[sec])]
                row["step_s"] = _step_time(dit, x, prepared, repeats)
                rows.append(row)
                print(_torch_row(row), flush=True)
            del dit, prepared
    return rows


def _quality(row: dict) -> str:
    """Velocity cosine / relative L2 per timestep, when the row was compared with a reference."""
    if "cosine" not in row:
        return ""
    return "  ".join(f"{c:.5f}/{e:.4f}" for c, e in zip(row["cosine"], row["rel_l2"]))


def _torch_row(row: dict) -> str:
    return (
        f"round {row['round']} {row['dit']:<15}{row['seconds']:>6g} s{row['bytes'] / 2**20:>7.0f} MB"
        f"{row['step_s']:>8.2f} s  {_quality(row)}"
    )


def _e2e_row(name: str, wall_s: float, out, ref, tracked=None) -> dict:
    """Latent and decoded-audio agreement of one generation with the reference one."""
    env, env_ref = _envelope(out.audio), _envelope(ref.audio)
    row = {"dit": name, "wall_s": wall_s}
    if tracked is not None:
        row.update(step_cosine=tracked.cosine, step_rel_l2=tracked.rel_l2)
    row.update(
        latent_rel_l2=_rel(out.latents, ref.latents),
        envelope_cosine=float(env @ env_ref / np.sqrt((env @ env) * (env_ref @ env_ref))),
        waveform_cosine=_cosine(mx.array(out.audio), mx.array(ref.audio)),
    )
    return row


def end_to_end_torch(src: str, seconds: float, steps: int, prompt: str) -> list[dict]:
    """The torch pipeline in float32, with a bfloat16 DiT swapped in, and wholly in bfloat16; same prompt and seed."""
    from mlx_sa3.backend import load_dit as backend_load_dit

    options = {"duration": seconds, "seed": 0, "steps": steps}
    pipe = StableAudio3.from_pretrained(src, backend="torch", keep_loaded=True)
    reference_dit = pipe.model.dit
    start = time.perf_counter()
    ref = pipe.generate(prompt, **options)
    rows = [{"dit": "torch float32", "wall_s": time.perf_counter() - start}]
    pipe.model.dit = tracked = _Tracked(backend_load_dit(src, "bfloat16", backend="torch"), reference_dit)
    start = time.perf_counter()
    out = pipe.generate(prompt, **options)  # the wall includes the float32 DiT's step on every input
    rows.append(_e2e_row("bf16 DiT", time.perf_counter() - start, out, ref, tracked))
    del pipe, reference_dit, tracked
    pipe = StableAudio3.from_pretrained(src, backend="torch", dtype="bfloat16", keep_loaded=True)
    start = time.perf_counter()
    out = pipe.generate(prompt, **options)
    rows.append(_e2e_row("bf16 DiT+T5", time.perf_counter() - start, out, ref))
    return rows


def _cosine(a, b) -> float:
    return float((mx.sum(a * b) / mx.sqrt(mx.sum(a * a) * mx.sum(b * b))).item())


def _rel(a, b) -> float:
    return float(mx.sqrt(mx.sum((a - b) ** 2) / mx.sum(b * b)).item())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="checkpoint directory (e.g. from benchmarks/random_checkpoint.py)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[30.0], help="durations (several: --torch-bf16)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=Q.DEFAULT_GROUP_SIZE)
    parser.add_argument("--cpu-path", action="store_true", help="dequantize at load, as mlx_sa3 does on the CPU")
    parser.add_argument("--e2e-steps", type=int, default=8, help="sampling steps of the end-to-end run (0: skip it)")
    parser.add_argument("--prompt", default="warm analog synth pad with slow filter sweeps")
    parser.add_argument("--torch-bf16", action="store_true", help="the torch DiT in bfloat16 against float32 instead")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved timing rounds (--torch-bf16)")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    if args.torch_bf16:
        return main_torch(args)
    if len(args.seconds) != 1:
        parser.error("give one --seconds (several need --torch-bf16)")
    args.seconds = args.seconds[0]
    rows = run(args.src, args.seconds, args.repeats, args.group_size, args.cpu_path)
    print(
        f"{'DiT':<16}{'MB':>8}{'res. MB':>8}{'peak MB':>8}{'step s':>8}  velocity cosine / rel L2 at t = 0.9, 0.5, 0.1"
    )
    for row in rows:
        print(
            f"{row['dit']:<16}{row['bytes'] / 2**20:>8.0f}{row['resident_bytes'] / 2**20:>8.0f}"
            f"{row['peak_mb']:>8.0f}{row['step_s']:>8.2f}  {_quality(row)}"
        )
    e2e = []
    if args.e2e_steps > 0:
        e2e = end_to_end(args.src, args.seconds, args.e2e_steps, args.group_size, args.cpu_path, args.prompt)
        print(f"\nend to end, {args.e2e_steps} steps, {args.seconds:g} s, seed 0, prompt {args.prompt!r}:")
        print_end_to_end(e2e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": rows, "end_to_end": e2e}, f, indent=2)


def print_end_to_end(e2e: list[dict]) -> None:
    header = f"{'DiT':<16}{'wall s':>8}{'latent rel':>12}{'env cos':>9}{'wave cos':>10}"
    print(header + "  per-step velocity cosine / rel L2")
    for row in e2e:
        if "latent_rel_l2" not in row:
            print(f"{row['dit']:<16}{row['wall_s']:>8.1f}")
            continue
        steps = "  ".join(f"{c:.5f}/{e:.4f}" for c, e in zip(row.get("step_cosine", ()), row.get("step_rel_l2", ())))
        print(
            f"{row['dit']:<16}{row['wall_s']:>8.1f}{row['latent_rel_l2']:>12.5f}{row['envelope_cosine']:>9.5f}"
            f"{row['waveform_cosine']:>10.5f}  {steps}"
        )


def main_torch(args) -> None:
    print(f"{'':8}{'DiT':<15}{'':>8}{'MB':>8}{'step s':>10}  velocity cosine / rel L2 at t = 0.9, 0.5, 0.1")
    rows = run_torch(args.src, args.seconds, args.repeats, args.rounds)
    for sec in args.seconds:
        for r in range(args.rounds):
            fp32, bf16 = (
                next(x for x in rows if x["seconds"] == sec and x["round"] == r and x["dit"] == f"torch {d}")
                for d in ("float32", "bfloat16")
            )
            print(f"round {r} {sec:g} s: bf16 / fp32 step {bf16['step_s'] / fp32['step_s']:.2f}x")
    e2e = []
    if args.e2e_steps > 0:
        e2e = end_to_end_torch(args.src, args.seconds[0], args.e2e_steps, args.prompt)
        print(f"\nend to end, torch, {args.e2e_steps} steps, {args.seconds[0]:g} s, seed 0, prompt {args.prompt!r}:")
        print_end_to_end(e2e)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"steps": rows, "end_to_end": e2e}, f, indent=2)


if __name__ == "__main__":
    main()
