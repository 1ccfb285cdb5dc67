"""Load time and resident memory of each network, per backend, in a fresh process per backend.

    flock /tmp/heavy.lock python benchmarks/bench_load.py /tmp/sa3rand/small [--backends torch mlx] [--json out.json]

For each backend (a child process each, so imports and caches start cold): the import of the backend's modules,
then the text encoder, the DiT and the SAME decoder (decoder first, as the CLI loads it), each timed and followed by
its RSS. The torch backend maps float32 weights instead of reading them, so a "page-in" row also times the first
touch of every weight (a sum over each tensor), which the first use would otherwise pay.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

CHILD = r"""
import json, sys, time
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
model, backend = sys.argv[1], sys.argv[2]
rows = []
def row(name, start):
    rows.append({"step": name, "s": time.perf_counter() - start, "rss_mb": rss_mb()})
t = time.perf_counter()
import mlx_sa3
from mlx_sa3 import backend as backends
if backend == "torch":
    import mlx_sa3.torch_backend as tb
    tb.require_torch(tb.dit._SA3_DIT, tb.same._SAME_BLOCKS, tb.t5gemma._T5GEMMA)
row("import", t)
source = backends.open_source(model)
cfg = mlx_sa3.checkpoint.checkpoint_config(source)
nets = {}
t = time.perf_counter()
nets["text_encoder"] = backends.load_text_encoder(source, cfg.sa3.prompt_max_length, None, backend)
row("text_encoder", t)
t = time.perf_counter(); nets["dit"] = backends.load_dit(source, None, backend); row("dit", t)
t = time.perf_counter(); nets["same_decoder"] = backends.load_autoencoder(source, backend=backend, encoder=False)
row("same_decoder", t)
if backend == "torch":
    t = time.perf_counter()
    for net in (nets["text_encoder"].model, nets["dit"].net, nets["same_decoder"].net):
        for p in net.parameters():
            if not p.is_meta:
                float(p.sum())
    row("page-in", t)
print(json.dumps(rows))
"""


def run(model: str, backend: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-c", CHILD, model, backend], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("--backends", nargs="+", default=["torch", "mlx"])
    p.add_argument("--json")
    args = p.parse_args(argv)
    results = {}
    for backend in args.backends:
        results[backend] = rows = run(args.model, backend)
        loads = sum(r["s"] for r in rows if r["step"] in ("text_encoder", "dit", "same_decoder"))
        print(f"{backend}: networks loaded in {loads:.2f} s")
        for r in rows:
            print(f"  {r['step']:<14} {r['s']:7.2f} s   RSS after {r['rss_mb']:7.0f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
