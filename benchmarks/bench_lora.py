"""LoRA representations on the full-size small DiT (random weights): no LoRA, merged weights, unmerged branch.

A random rank-16 LoRA on every Linear and Conv1d of the DiT and on the seconds embedder is written in the official
file layout, then, for each representation: the load time (read + strict checks + building the representation), the
memory held afterwards, one sampling step (median of ``--repeats`` after a warm-up, prepared conditioning, no CFG)
with its peak memory, and the time to change the strength.

* merged: what mlx_sa3 does (``SA3Model.load_lora``): effective weights recomputed from kept base copies and loaded
  into the DiT; a step is a plain DiT step.
* unmerged: every adapted layer wrapped here as ``base(x) + c * (x A^T) B^T`` (plain LoRA only; DoRA/BoRA would also
  need per-row/column rescaling), base weights untouched; a strength change is a scalar update.

    flock /tmp/heavy.lock python benchmarks/bench_lora.py --json lora.json
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import mlx_sa3  # noqa: F401  (loads the BLAS before mlx: must stay above the mlx imports)

# isort: split
from mlx_sa3 import lora
from mlx_sa3.dit import DiT, DiTConfig
from mlx_sa3.info import describe
from mlx_sa3.model import Conditioners, SA3Config, SA3Model

import mlx.core as mx
import mlx.nn as nn
from common import CONTEXT_TOKENS, LATENT_HOP, SAMPLE_RATE, timed
from mlx.utils import tree_flatten, tree_unflatten

RANK, ALPHA = 16, 16.0
MB = 1024 * 1024

# mlx_sa3 -> official module path, only to write the benchmark's LoRA file (each one is checked against sanitize).
_OFFICIAL = [(".fc1.", ".0."), (".fc2.", ".2."), (".ff.proj_in.", ".ff.ff.0.proj."), (".ff.proj_out.", ".ff.ff.2.")]
_TRANSFORMER_CHILDREN = ("layers.", "global_cond_embedder.", "project_in.", "project_out.")


def official_module(name: str) -> str:
    module = name[: -len(".weight")] + "."
    for ours, theirs in _OFFICIAL:
        module = module.replace(ours, theirs)
    module = module.rstrip(".")
    if module.startswith(_TRANSFORMER_CHILDREN):
        module = "transformer." + module
    assert lora._dit_name(module) == name, (name, module)
    return module


def adapted_names(dit: DiT) -> list[str]:
    return [k for k, v in tree_flatten(dit.parameters()) if k.endswith(".weight") and v.ndim in (2, 3)]


def write_random_lora(path: Path, dit: DiT, conditioners: Conditioners) -> int:
    """Rank-16 official-layout LoRA on every DiT Linear/Conv1d and the seconds embedder; returns the tensor count."""
    shapes = {
        f"model.{official_module(k)}": v.shape
        for k, v in tree_flatten(dit.parameters())
        if k in set(adapted_names(dit))
    }
    shapes["conditioners.seconds_total.embedder.embedding.1"] = conditioners.tensors[Conditioners.SECONDS_W].shape
    tensors, key = {}, mx.random.key(1)
    for module, shape in shapes.items():
        fan_out, fan_in = lora._fans(shape)
        key, ka, kb = mx.random.split(key, 3)
        stem = f"{module}.parametrizations.weight.0."
        tensors[stem + "lora_A"] = (mx.random.normal((RANK, fan_in), key=ka) / fan_in**0.5).astype(mx.float16)
        tensors[stem + "lora_B"] = (mx.random.normal((fan_out, RANK), key=kb) * 0.01).astype(mx.float16)
    config = {"rank": RANK, "alpha": ALPHA, "adapter_type": "lora", "include": None, "exclude": None}
    mx.save_safetensors(str(path), tensors, metadata={"lora_config": json.dumps(config)})
    return len(tensors)


class LoRABranch(nn.Module):
    """Unmerged plain LoRA around a Linear or 1x1 Conv1d (channels-last input either way)."""

    def __init__(self, base: nn.Module, a: mx.array, b: mx.array, coefficient: float):
        super().__init__()
        self.base = base
        self.lora_a, self.lora_b = a, b
        self.coefficient = coefficient

    @property
    def weight(self) -> mx.array:  # DiT.dtype reads project_in.weight
        return self.base.weight

    @property
    def bias(self) -> mx.array:  # the constant inpainting term reads to_local_embed.fc1.bias
        return self.base.bias

    def __call__(self, x: mx.array) -> mx.array:
        return self.base(x) + self.coefficient * ((x @ self.lora_a.T) @ self.lora_b.T)


def wrap_unmerged(dit: DiT, adapter: lora.LoraAdapter) -> list[LoRABranch]:
    modules = dict(dit.named_modules())
    wrappers = []
    for (target, name), layer in adapter.layers.items():
        if target != lora.DIT:
            continue
        path = name[: -len(".weight")]
        wrapper = LoRABranch(
            modules[path], layer.params["lora_A"], layer.params["lora_B"], adapter.strength * adapter.scaling
        )
        dit.update_modules(tree_unflatten([(path, wrapper)]))
        wrappers.append(wrapper)
    return wrappers


def build(config: DiTConfig) -> SA3Model:
    dit = DiT(config)
    mx.eval(dit.parameters())
    cfg = SA3Config()
    k1, k2 = mx.random.split(mx.random.key(2))
    conditioners = Conditioners(
        {
            Conditioners.PADDING: mx.zeros((cfg.cond_dim,)),
            Conditioners.SECONDS_W: mx.random.normal((cfg.cond_dim, 256), key=k1) * 0.05,
            Conditioners.SECONDS_B: mx.random.normal((cfg.cond_dim,), key=k2) * 0.05,
        },
        cfg,
    )
    return SA3Model(cfg, dit, None, None, conditioners)


def measure_step(model: SA3Model, inputs, repeats: int) -> tuple[dict, mx.array]:
    context, global_cond, x = inputs
    prepared = model.dit.prepare(context, global_cond, None)
    mx.reset_peak_memory()
    step_s = timed(lambda: mx.eval(model.dit.step(x, 0.5, prepared)), repeats)
    v = model.dit.step(x, 0.5, prepared)
    mx.eval(v)
    return {"step_s": step_s, "step_peak_mb": mx.get_peak_memory() / MB}, v


def run(seconds: float, repeats: int) -> list[dict]:
    config = DiTConfig.small()
    length = round(seconds * SAMPLE_RATE / LATENT_HOP)
    keys = mx.random.split(mx.random.key(0), 3)
    inputs = (
        mx.random.normal((1, CONTEXT_TOKENS, config.cond_token_dim), key=keys[0]),
        mx.random.normal((1, config.global_cond_dim), key=keys[1]),
        mx.random.normal((1, config.io_channels, length), key=keys[2]),
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "random_r16.safetensors"
        model = build(config)
        count = write_random_lora(path, model.dit, model.conditioners)
        print(f"LoRA file: {count} tensors, {path.stat().st_size / MB:.1f} MB, rank {RANK}; latents {length}")

        base_mb = mx.get_active_memory() / MB
        step, _ = measure_step(model, inputs, repeats)
        rows.append({"representation": "none", "load_s": 0.0, "held_mb": base_mb, **step, "strength_change_s": 0.0})

        start = time.perf_counter()
        model.load_lora(path)
        load_s = time.perf_counter() - start
        held_mb = mx.get_active_memory() / MB
        merged, v_merged = measure_step(model, inputs, repeats)
        change_s = timed(lambda: model.set_lora_strength(0.5), 1)
        rows.append(
            {"representation": "merged", "load_s": load_s, "held_mb": held_mb, **merged, "strength_change_s": change_s}
        )
        model.unload_lora()  # the original base arrays again, for the unmerged run
        step, _ = measure_step(model, inputs, repeats)  # the no-LoRA step again: how much the machine drifts
        rows.append(
            {
                "representation": "none (again)",
                "load_s": 0.0,
                "held_mb": mx.get_active_memory() / MB,
                **step,
                "strength_change_s": 0.0,
            }
        )

        start = time.perf_counter()
        adapter = lora.load_lora(
            path,
            lora._shapes(
                {lora.DIT: dict(tree_flatten(model.dit.parameters())), lora.CONDITIONERS: model.conditioners.tensors}
            ),
        )
        wrappers = wrap_unmerged(model.dit, adapter)
        mx.eval(model.dit.parameters())
        load_s = time.perf_counter() - start
        held_mb = mx.get_active_memory() / MB
        unmerged, v_unmerged = measure_step(model, inputs, repeats)
        # the two representations compute the same function (up to float32 rounding)
        unmerged["vs_merged_rel"] = (mx.abs(v_unmerged - v_merged).max() / mx.abs(v_merged).max()).item()
        print(f"unmerged vs merged output: {unmerged['vs_merged_rel']:.2e} relative")

        def change():
            for w in wrappers:
                w.coefficient = 0.5 * adapter.scaling

        rows.append(
            {
                "representation": "unmerged",
                "load_s": load_s,
                "held_mb": held_mb,
                **unmerged,
                "strength_change_s": timed(change, 1),
            }
        )
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'representation':>14} {'load s':>7} {'held MB':>8} {'step s':>7} {'step peak MB':>12} "
        f"{'strength change s':>17}"
    )
    for r in rows:
        print(
            f"{r['representation']:>14} {r['load_s']:>7.2f} {r['held_mb']:>8.0f} {r['step_s']:>7.3f} "
            f"{r['step_peak_mb']:>12.0f} {r['strength_change_s']:>17.4f}"
        )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10.0, help="latent duration of the step (default 10 s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps after one warm-up (median reported)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args(argv)
    rows = run(args.seconds, args.repeats)
    print_table(rows)
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS: {peak_rss_mb:.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": describe(),
                    "seconds": args.seconds,
                    "rank": RANK,
                    "peak_rss_mb": peak_rss_mb,
                    "results": rows,
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()
