"""Conversion cost and payoff on a random checkpoint with the real stable-audio-3-medium key structure.

Builds a Hub-layout checkpoint (model_config.json + model.safetensors + t5gemma-b-b-ul2/) from every name and shape
in ``hub-manifest-medium.txt`` with random float32 data, written tensor by tensor with the streaming writer. The
T5Gemma folder is the tiny one of the ``sa3_medium_tiny_s0`` fixture (the real encoder is not in the manifest), so
the numbers cover the DiT, the SAME-L autoencoder and the conditioners. Then, each in a fresh subprocess:

* ``python -m mlx_sa3.convert``: wall time and peak RSS above the interpreter's baseline (imports only), against
  the checkpoint size. Target: extra RSS <= 0.5 x checkpoint size (conversion streams tensor by tensor).
* ``load_model`` of the original (read + sanitize + fold weight norm + cast) and of the converted directory (plain
  read), both in the converted dtype, best of ``--repeats``. Target: converted load >= 5x faster.

    python benchmarks/bench_convert.py --quick          # 2 DiT blocks, 1 SAME block per side (~0.9 GB)
    python benchmarks/bench_convert.py --json c.json    # the full 997-tensor checkpoint (~9.2 GB, twice on disk)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mlx_sa3  # noqa: F401  (loads the BLAS before mlx)
from mlx_sa3.convert import write_safetensors
from mlx_sa3.info import describe, gemm_gflops

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REFERENCE = Path(os.environ.get("MLX_SA3_SHARED", REPO.parent / "shared")) / "reference"
TINY = REFERENCE / "sa3_medium_tiny_s0"
QUICK_DIT_DEPTH, QUICK_SAME_DEPTH = 2, 1


def manifest(dit_depth: int | None, same_depth: int | None) -> dict[str, tuple]:
    """Names and shapes of the real medium checkpoint, optionally keeping only the first DiT / SAME blocks."""
    shapes = {}
    for line in (REFERENCE / "hub-manifest-medium.txt").read_text().splitlines():
        if not line or line.startswith("#"):
            continue
        name, shape, _ = line.split("\t")
        dit_block = re.search(r"^model\.model\.transformer\.layers\.(\d+)\.", name)
        same_block = re.search(r"\.transformers\.(\d+)\.", name)
        if dit_depth is not None and dit_block and int(dit_block.group(1)) >= dit_depth:
            continue
        if same_depth is not None and same_block and int(same_block.group(1)) >= same_depth:
            continue
        shapes[name] = tuple(json.loads(shape))
    return shapes


def medium_config(dit_depth: int, same_depth: int) -> dict:
    """The tiny medium fixture's model_config.json with the real medium sizes (and the requested depths)."""
    config = json.loads((TINY / "model_config.json").read_text())
    model = config["model"]
    model["io_channels"] = 256
    model["diffusion"]["config"].update(
        io_channels=256, embed_dim=1536, depth=dit_depth, num_heads=24, local_add_cond_dim=257, num_memory_tokens=64
    )
    ae = model["pretransform"]["config"]
    ae["latent_dim"] = 256
    for part in ("encoder", "decoder"):
        ae[part]["config"].update(channels=768, transformer_depths=[same_depth], latent_dim=256, dim_heads=64)
    ae["bottleneck"]["config"]["dim"] = 256
    return config


def random_tensor(name: str, shape: tuple, key: mx.array) -> mx.array:
    """Lazily generated data; RoPE buffers get their true values because the sanitizers check them."""
    if name.endswith("inv_freq"):
        dims = 2 * shape[0]
        return mx.array(1.0 / 10000.0 ** (np.arange(0, dims, 2) / dims), dtype=mx.float32)
    if name.endswith((".weight_g", "running_std", "scaling_factor")):
        return mx.random.uniform(0.5, 1.5, shape, key=key)
    return 0.02 * mx.random.normal(shape, key=key)


def build_checkpoint(root: Path, dit_depth: int, same_depth: int, full: bool) -> int:
    shapes = manifest(None if full else dit_depth, None if full else same_depth)
    root.mkdir(parents=True)
    (root / "model_config.json").write_text(json.dumps(medium_config(dit_depth, same_depth), indent=2))
    shutil.copytree(TINY / "t5gemma-b-b-ul2", root / "t5gemma-b-b-ul2")
    keys = mx.random.split(mx.random.key(0), len(shapes))
    tensors = {name: random_tensor(name, shape, keys[i]) for i, (name, shape) in enumerate(shapes.items())}
    return write_safetensors(root / "model.safetensors", tensors)


def run_measured(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints one JSON line last. Adds the child's peak RSS in MB."""
    wrapper = (
        "import json, resource, time\nimport mlx_sa3\nimport mlx.core as mx\n"
        "start = time.perf_counter()\n" + code + "\n"
        "print(json.dumps({'wall_s': time.perf_counter() - start, "
        "'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", wrapper], cwd=REPO, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def best_of(code: str, repeats: int) -> dict:
    runs = [run_measured(code) for _ in range(repeats)]
    return min(runs, key=lambda r: r["wall_s"])


def bench(workdir: Path, full: bool, dtype: str, repeats: int) -> dict:
    src, out = workdir / "hub", workdir / "converted"
    start = time.perf_counter()
    size = build_checkpoint(src, 24 if full else QUICK_DIT_DEPTH, 12 if full else QUICK_SAME_DEPTH, full)
    write_s = time.perf_counter() - start
    baseline = run_measured("")
    conv = run_measured(f"from mlx_sa3.convert import convert\nconvert({str(src)!r}, {str(out)!r}, dtype={dtype!r})")
    # Both loads produce the same model: DiT and text encoder in the converted dtype, autoencoder in float32.
    load = "from mlx_sa3.model import load_model\nm = load_model({!r}, dtype=%r)" % dtype
    load_orig = best_of(load.format(str(src)), repeats)
    load_conv = best_of(load.format(str(out)), repeats)
    out_size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    extra_rss = conv["peak_rss_mb"] - baseline["peak_rss_mb"]
    size_mb = size / 1e6
    return {
        "mode": "full" if full else "quick",
        "dtype": dtype,
        "checkpoint_mb": size_mb,
        "converted_mb": out_size / 1e6,
        "write_random_s": write_s,
        "baseline_rss_mb": baseline["peak_rss_mb"],
        "convert_s": conv["wall_s"],
        "convert_mb_per_s": size_mb / conv["wall_s"],
        "convert_peak_rss_mb": conv["peak_rss_mb"],
        "convert_extra_rss_over_size": extra_rss / size_mb,
        "load_original_s": load_orig["wall_s"],
        "load_original_rss_mb": load_orig["peak_rss_mb"],
        "load_converted_s": load_conv["wall_s"],
        "load_converted_rss_mb": load_conv["peak_rss_mb"],
        "load_speedup": load_orig["wall_s"] / load_conv["wall_s"],
    }


def print_table(r: dict) -> None:
    rss_ok = r["convert_extra_rss_over_size"] <= 0.5
    load_ok = r["load_speedup"] >= 5
    rows = [
        ("checkpoint (random, medium layout)", f"{r['checkpoint_mb']:.0f} MB ({r['mode']})"),
        ("converted directory", f"{r['converted_mb']:.0f} MB ({r['dtype']})"),
        ("convert wall time", f"{r['convert_s']:.1f} s ({r['convert_mb_per_s']:.0f} MB/s)"),
        ("convert peak RSS / baseline", f"{r['convert_peak_rss_mb']:.0f} MB / {r['baseline_rss_mb']:.0f} MB"),
        (
            "extra RSS / checkpoint size",
            f"{r['convert_extra_rss_over_size']:.3f}  target <= 0.5: {'PASS' if rss_ok else 'FAIL'}",
        ),
        ("load_model original", f"{r['load_original_s']:.2f} s, {r['load_original_rss_mb']:.0f} MB RSS"),
        ("load_model converted", f"{r['load_converted_s']:.2f} s, {r['load_converted_rss_mb']:.0f} MB RSS"),
        ("load speedup", f"{r['load_speedup']:.2f}x  target >= 5x: {'PASS' if load_ok else 'FAIL'}"),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"keep {QUICK_DIT_DEPTH} DiT blocks and {QUICK_SAME_DEPTH} SAME block per side",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "float16", "bfloat16"],
        help="--dtype passed to the converter (default float32)",
    )
    parser.add_argument("--repeats", type=int, default=2, help="load timings: best of this many runs")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/tmp/mlx_sa3_bench_convert"),
        help="scratch directory (removed first and at the end unless --keep)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints in --workdir")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)

    full = not args.quick
    need = (9.3e9 if full else 0.9e9) * 2.2
    if args.workdir.exists():
        shutil.rmtree(args.workdir)
    args.workdir.parent.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.workdir.parent).free
    if free < need:
        sys.exit(
            f"not enough disk space in {args.workdir.parent}: {free / 1e9:.1f} GB free, {need / 1e9:.1f} GB needed"
        )
    try:
        result = bench(args.workdir, full, args.dtype, args.repeats)
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)
    result["gemm_gflops"] = gemm_gflops()
    result["machine"] = describe()
    print_table(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
