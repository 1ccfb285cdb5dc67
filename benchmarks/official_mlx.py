"""The official MLX runtime (``Stability-AI/stable-audio-3``, folder ``optimized/mlx``) as a benchmark peer.

It runs from a checkout of the official repo given by path (nothing of it is copied here) on full-size random weights
written in its own ``.npz`` layout (spec §5.4): ``t5gemma_f16.npz`` (encoder, ``META`` config JSON and
``TOKENIZER_MODEL`` sentencepiece bytes), ``dit_{sm-music,medium}_f16.npz`` (the DiT with the Hub names less
``model.model.``, ``to_local_embed.seq.*``, plus ``cond.*``) and ``same_{s,l}_decoder_f32.npz``. The tensors are those
of ``mlx_sa3.demo.random_model`` (the model ``compare.py`` builds for mlx_sa3, same seed), stored at the official files'
precision (DiT and T5Gemma fp16, SAME decoder fp32), so both runtimes do the same work on the same weights. Every
tensor the official modules hold is checked against what is written: their loaders use ``strict=False`` and would
silently keep random initialisations otherwise.

A run is one call of the official CLI's ``main()`` (``scripts/sa3_mlx.py``) in a fresh process: text-to-audio, fp32 DiT
(``--dit-dtype fp32``), ``--free-models`` (its default: each model is loaded from its file when its stage starts and
freed after), CFG off, batch 1. Its weight resolver is pointed at the random-weight folder. As in ``compare.py``:
``import mlx_sa3`` first (it preloads OpenBLAS before MLX unless ``MLX_SA3_NO_OPENBLAS=1``), one untimed warm-up (the
same duration, 1 step), then ``/proc/self/clear_refs`` resets the peak-RSS mark and ``ru_maxrss`` after the timed call
is its peak. Unlike mlx_sa3's rows in compare.py, the official call *includes loading its weights* (from the page cache
after the warm-up): that is how the runtime works, and its per-stage times (parsed from its log) show load and compute
apart. Its canvas is ``ceil(seconds * 44100 / 4096)`` latents, even for SAME-S, without mlx_sa3's 6 s of headroom.

    python benchmarks/official_mlx.py --official-repo ~/src/stable-audio-3 --seconds 10 30      # small, 8 steps
    python benchmarks/official_mlx.py --official-repo PATH --variant medium --weights /tmp/sa3w-medium --keep

The subcommands ``write-weights`` and ``run`` are what compare.py calls (each prints one JSON line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import mlx_sa3  # noqa: F401  (preloads OpenBLAS before the first mlx import, like every mlx_sa3 process)

# isort: split
import mlx.core as mx
import numpy as np
from common import current_rss_mb, peak_rss_mb, reset_peak_rss
from mlx.utils import tree_flatten

PROMPT = "a slow ambient pad with field recordings and distant birds"  # compare.py's prompt
T5_FILE = "t5gemma_f16.npz"
MANIFEST = "mlx_sa3_random_weights.json"


@dataclasses.dataclass(frozen=True)
class Variant:
    dit: str  # the official --dit choice
    decoder: str  # the official --decoder choice
    dit_module: str
    decoder_module: str
    decoder_class: str

    @property
    def dit_file(self) -> str:
        return f"dit_{self.dit}_f16.npz"

    @property
    def decoder_file(self) -> str:
        return f"{self.decoder.replace('-', '_')}_decoder_f32.npz"


VARIANTS = {
    "small": Variant("sm-music", "same-s", "models.defs.dit_mlx", "models.defs.same_s_decoder", "SAMESDecoder"),
    "medium": Variant("medium", "same-l", "models.defs.dit_mlx_medium", "models.defs.same_l_decoder", "SAMELDecoder"),
}
# Official module arrays that are computed at construction, not stored in its weight files.
COMPUTED = {"timestep_features.freqs", "_local_zeros_1"}


class OfficialError(Exception):
    """A one-line user-facing error (bad checkout path, missing weights)."""


# ------------------------------------------------------------------------------------------- the official checkout


def runtime_dir(repo: Path) -> Path:
    """``optimized/mlx`` of an official checkout (the repo root or that folder itself)."""
    for candidate in (repo / "optimized" / "mlx", repo):
        if (candidate / "scripts" / "sa3_mlx.py").is_file() and (candidate / "models" / "defs").is_dir():
            return candidate.resolve()
    raise OfficialError(f"{repo}: not a Stability-AI/stable-audio-3 checkout (no optimized/mlx/scripts/sa3_mlx.py)")


def import_official(runtime: Path):
    """Make the official runtime importable the way its CLI does (its root and scripts/ on sys.path)."""
    for path in (str(runtime / "scripts"), str(runtime)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import importlib

    return importlib


# ---------------------------------------------------------------------------------- random weights, official layout


def _official_dit_name(name: str) -> str:
    """mlx_sa3 DiT parameter name -> official MLX npz key (the Hub name less ``model.model.``, spec §5.4)."""
    top = name.split(".")[0]
    if top in ("project_in", "project_out", "memory_tokens", "global_cond_embedder", "layers"):
        name = "transformer." + name
    name = re.sub(r"\.to_local_embed\.fc([12])\.", lambda m: f".to_local_embed.seq.{2 * int(m[1]) - 2}.", name)
    name = re.sub(
        r"(^|\.)(to_\w+_embed|global_cond_embedder)\.fc([12])\.", lambda m: f"{m[1]}{m[2]}.{2 * int(m[3]) - 2}.", name
    )
    name = name.replace(".ff.proj_in.", ".ff.ff.0.proj.").replace(".ff.proj_out.", ".ff.ff.2.")
    return name


_SAME_RENAMES = (
    (".attn_norm.", ".pre_norm."),
    (".attn.qkv.", ".attn.to_qkv."),
    (".attn.out.", ".attn.to_out."),
    (".ff.proj_in.", ".ff.glu_proj."),
)


def _official_decoder_tensors(autoencoder) -> dict[str, mx.array]:
    """The SAME decoder side (bottleneck scale, from_latent, decoder) in the official flat layout, fp32."""
    params = dict(tree_flatten(autoencoder.parameters()))
    out = {
        "running_std": params["bottleneck.running_std"],
        "project_in.weight": params["from_latent.weight"],
        "project_in.bias": params["from_latent.bias"],
    }
    for key, value in params.items():
        if not key.startswith("decoder."):
            continue
        name = key[len("decoder.") :]
        for old, new in _SAME_RENAMES:
            name = name.replace(old, new)
        if name == "mapping.weight":
            value = value.transpose(0, 2, 1)  # MLX (out, k, in) -> the files' torch layout (out, in, k)
        out[name] = value
    return {k: v if v.dtype == mx.float32 else v.astype(mx.float32) for k, v in out.items()}


def official_tensors(model, tokenizer_proto: bytes) -> dict[str, dict[str, mx.array]]:
    """File name -> tensors of the official runtime's weight files, from an mlx_sa3 ``SA3Model``."""
    from mlx_sa3.model import Conditioners

    dit = {_official_dit_name(k): v.astype(mx.float16) for k, v in tree_flatten(model.dit.parameters())}
    cond = model.conditioners.tensors
    dit["cond.padding_embedding"] = cond[Conditioners.PADDING].astype(mx.float16)
    dit["cond.seconds_total_weight"] = cond[Conditioners.SECONDS_W].astype(mx.float16)
    dit["cond.seconds_total_bias"] = cond[Conditioners.SECONDS_B].astype(mx.float16)
    text = {k: v.astype(mx.float16) for k, v in tree_flatten(model.text_encoder.model.parameters())}
    meta = {k: v for k, v in dataclasses.asdict(model.text_encoder.model.config).items() if k != "layer_types"}
    text["META"] = mx.array(np.frombuffer(json.dumps({**meta, "pad_token_id": 0}).encode(), dtype=np.uint8))
    text["TOKENIZER_MODEL"] = mx.array(np.frombuffer(tokenizer_proto, dtype=np.uint8))
    return {"dit": dit, "decoder": _official_decoder_tensors(model.autoencoder), "t5gemma": text}


def _expected_file_shape(name: str, shape: tuple) -> set[tuple]:
    """Shapes a file tensor may have for an official module array of ``shape`` (its loaders reshape the mapping)."""
    if name != "mapping.weight":
        return {shape}
    if len(shape) == 3:  # SAME-S Conv1d (out, k, in), stored (out, in, k)
        return {(shape[0], shape[2], shape[1])}
    return {(shape[0], shape[1], 1)}  # SAME-L Linear (out, in), stored as a k=1 conv


def check_against_official(runtime: Path, variant: Variant, files: dict[str, dict[str, mx.array]]) -> None:
    """Every array the official modules hold must be written with its shape, and nothing else (no eval: lazy)."""
    importlib = import_official(runtime)
    dit_mod = importlib.import_module(variant.dit_module)
    dec_mod = importlib.import_module(variant.decoder_module)
    t5_mod = importlib.import_module("models.defs.t5gemma_mlx")
    meta = json.loads(bytes(np.array(files["t5gemma"]["META"])).decode())
    modules = {
        "dit": (dit_mod.DiT(T_lat=16), {k for k in files["dit"] if k.startswith("cond.")}),
        "decoder": (getattr(dec_mod, variant.decoder_class)(), set()),
        "t5gemma": (
            t5_mod._Encoder(t5_mod.T5GemmaConfig.from_json_bytes(json.dumps(meta).encode())),
            {"META", "TOKENIZER_MODEL"},
        ),
    }
    for part, (module, extra) in modules.items():
        wanted = {k: tuple(v.shape) for k, v in tree_flatten(module.parameters()) if k not in COMPUTED}
        if part == "t5gemma":  # its loader sets the four norms and the final norm from "<name>.weight" keys
            wanted = {(k if k.endswith(".weight") else f"{k}.weight"): s for k, s in wanted.items()}
        written = {k: tuple(v.shape) for k, v in files[part].items() if k not in extra}
        missing = sorted(set(wanted) - set(written))
        unexpected = sorted(set(written) - set(wanted))
        wrong = sorted(k for k in set(wanted) & set(written) if written[k] not in _expected_file_shape(k, wanted[k]))
        if missing or unexpected or wrong:
            raise OfficialError(
                f"{part} weights do not fit the official modules: missing {missing[:5]}, unexpected "
                f"{unexpected[:5]}, wrong shapes {wrong[:5]}"
            )


def write_weights(runtime: Path, variant_name: str, out: Path, seed: int) -> dict:
    """Write the official files for ``random_model(..., seed)`` of ``variant_name`` into ``out`` (reused if present)."""
    from mlx_sa3.demo import full_size_parts, random_model, train_tokenizer

    variant = VARIANTS[variant_name]
    manifest = {"variant": variant_name, "seed": seed, "files": [T5_FILE, variant.dit_file, variant.decoder_file]}
    marker = out / MANIFEST
    if marker.is_file() and json.loads(marker.read_text()) == manifest:
        return {**manifest, "reused": True}
    start = time.perf_counter()
    sa3, dit_cfg, same_cfg, text_cfg = full_size_parts(variant_name)
    # compare.py's mlx_sa3 worker draws its model exactly so; medium in fp16 to stay within the memory budget
    model = random_model(
        sa3, dit_cfg, same_cfg, text_cfg, dtype="float32" if variant_name == "small" else "float16", seed=seed
    )
    with tempfile.TemporaryDirectory(prefix="official_tokenizer_") as tmp:
        train_tokenizer(Path(tmp))  # the same deterministic tokenizer random_model trained
        proto = (Path(tmp) / "tokenizer.model").read_bytes()
    files = official_tensors(model, proto)
    del model
    check_against_official(runtime, variant, files)
    out.mkdir(parents=True, exist_ok=True)
    names = {"t5gemma": T5_FILE, "dit": variant.dit_file, "decoder": variant.decoder_file}
    for part in ("decoder", "t5gemma", "dit"):
        tensors = files.pop(part)
        tmp = out / f".{names[part]}.partial.npz"
        mx.savez(str(tmp), **tensors)
        os.replace(tmp, out / names[part])
        del tensors
        gc.collect()
    marker.write_text(json.dumps(manifest))
    return {**manifest, "reused": False, "write_s": time.perf_counter() - start}


# --------------------------------------------------------------------------------------------------- one generation

_STAGE_PATTERNS = {
    "t5gemma_load_encode": r"\[1/5\] T5Gemma encode\W*?(\d+) ms",
    "conditioning": r"\[2/5\] Conditioning\W*?(\d+) ms",
    "dit_load": r"\[3/5\][^\n]*\n\s+load ([\d.]+)s",
    "dit_sampling": r"\n\s+sample (\d+) ms",
    "decoder_load": r"\[4/5\][^\n]*\n\s+load (\d+) ms",
    "decode": r"\n\s+decode [^\n]*?(\d+) ms",
    "unpatch_write_wav": r"\[5/5\] Unpatch \+ write WAV\W*?(\d+) ms",
}


def parse_log(log: str) -> tuple[dict, dict]:
    """(seconds per stage, MLX allocator peak MB per stage) from the official CLI's log (no colours: not a TTY)."""
    stages = {}
    for name, pattern in _STAGE_PATTERNS.items():
        match = re.search(pattern, log)
        if match:
            value = float(match[1])
            stages[name] = value if name == "dit_load" else value / 1000
    peaks = {}
    for match in re.finditer(r"^ {4}(\S[^\n]*?)\s+[█·]+\s+([\d.]+) (GB|MB)", log, re.MULTILINE):
        peaks[match[1].strip()] = float(match[2]) * (1024 if match[3] == "GB" else 1)
    return stages, peaks


def official_call(
    runtime: Path, weights: Path, variant: Variant, seconds: float, steps: int, seed: int, out_wav: Path
) -> str:
    """One run of the official CLI's ``main()`` in this process; returns its log."""
    import_official(runtime)
    import sa3_mlx

    def local(rel: str, verbose: bool = True) -> Path:
        path = weights / Path(rel).name
        if not path.is_file():
            raise OfficialError(f"{path}: missing (run write-weights first)")
        return path

    sa3_mlx.ensure_local = local  # its resolver would download from the Hub into the checkout
    sa3_mlx.is_present = lambda rel: (weights / Path(rel).name).is_file()
    argv = [
        "sa3_mlx.py",
        "--prompt",
        PROMPT,
        "--dit",
        variant.dit,
        "--decoder",
        variant.decoder,
        "--seconds",
        f"{seconds:g}",
        "--steps",
        str(steps),
        "--seed",
        str(seed),
        "--dit-dtype",
        "fp32",
        "--cfg",
        "1.0",
        "--free-models",
        "--out",
        str(out_wav),
    ]
    log = io.StringIO()
    saved = sys.argv
    try:
        sys.argv = argv
        with contextlib.redirect_stdout(log):
            sa3_mlx.main()
    finally:
        sys.argv = saved
    return log.getvalue()


def run_once(runtime: Path, weights: Path, variant_name: str, seconds: float, steps: int, seed: int = 0) -> dict:
    """Warm-up (1 step) and one timed generation in this process; a row in compare.py's format."""
    from mlx_sa3.info import describe

    variant = VARIANTS[variant_name]
    with tempfile.TemporaryDirectory(prefix="official_out_") as tmp:
        wav = Path(tmp) / "out.wav"
        official_call(runtime, weights, variant, seconds, 1, seed, wav)
        gc.collect()
        mx.clear_cache()
        ready = current_rss_mb()
        exact = reset_peak_rss()
        start = time.perf_counter()
        log = official_call(runtime, weights, variant, seconds, steps, seed, wav)
        wall = time.perf_counter() - start
        peak = peak_rss_mb()
        audio_bytes = wav.stat().st_size
    stages, mlx_peaks = parse_log(log)
    latents = re.search(r"T_lat\s+(\d+)", log)
    return {
        "impl": "official-mlx",
        "variant": variant_name,
        "kind": "e2e",
        "seconds": seconds,
        "steps": steps,
        "wall_s": wall,
        "stages_s": stages,
        "peak_rss_mb": peak,
        "ready_rss_mb": ready,
        "peak_is_timed_call_only": exact,
        "mlx_peak_by_stage_mb": mlx_peaks,
        "latents": int(latents[1]) if latents else None,
        "wav_bytes": audio_bytes,
        "blas": describe()["blas"],
    }


# ------------------------------------------------------------------------------------------- subprocess front ends


def _subprocess_json(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, __file__, *args], check=False, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def prepare_weights_subprocess(repo: Path, variant: str, weights: Path, seed: int = 0) -> dict:
    """Write (or reuse) the random official-layout weights in a separate process (its memory is returned after)."""
    return _subprocess_json(
        [
            "write-weights",
            "--official-repo",
            str(repo),
            "--variant",
            variant,
            "--weights",
            str(weights),
            "--seed",
            str(seed),
        ]
    )


def run_subprocess(repo: Path, variant: str, weights: Path, seconds: float, steps: int, seed: int = 0) -> dict:
    """One measured official generation in a fresh process (compare.py's rows)."""
    row = _subprocess_json(
        [
            "run",
            "--official-repo",
            str(repo),
            "--variant",
            variant,
            "--weights",
            str(weights),
            "--seconds",
            f"{seconds:g}",
            "--steps",
            str(steps),
            "--seed",
            str(seed),
        ]
    )
    if "error" in row:
        row = {"impl": "official-mlx", "variant": variant, "kind": "e2e", "seconds": seconds, "steps": steps, **row}
    return row


def print_rows(rows: list[dict]) -> None:
    for r in rows:
        label = f"{r['variant']} {r['seconds']:g}s x{r['steps']}"
        if "error" in r:
            print(f"{label:18} failed: {' '.join(r['error'])}")
            continue
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in r["stages_s"].items())
        print(
            f"{label:18} wall {r['wall_s']:7.2f} s  peak {r['peak_rss_mb']:7.0f} MB  ready {r['ready_rss_mb']:6.0f} MB"
            f"  ({r['latents']} latents; {stages})"
        )
    if rows and "blas" in rows[0]:
        print(f"BLAS: {rows[0]['blas']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", nargs="?", default="bench", choices=("bench", "write-weights", "run"))
    parser.add_argument("--official-repo", type=Path, required=True, help="checkout of Stability-AI/stable-audio-3")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="small")
    parser.add_argument("--weights", type=Path, help="folder for the random official-layout weights (default: temp)")
    parser.add_argument("--keep", action="store_true", help="keep the --weights folder (bench)")
    parser.add_argument("--seconds", type=float, nargs="+", default=[10.0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (random_model's)")
    parser.add_argument("--json", type=Path, help="write the bench rows here")
    args = parser.parse_args(argv)
    try:
        runtime = runtime_dir(args.official_repo)
        if args.command != "bench" and args.weights is None:
            raise OfficialError(f"{args.command} needs --weights DIR")
        if args.command == "write-weights":
            print(json.dumps(write_weights(runtime, args.variant, args.weights, args.seed)))
        elif args.command == "run":
            print(json.dumps(run_once(runtime, args.weights, args.variant, args.seconds[0], args.steps)))
        else:
            weights = args.weights or Path(tempfile.mkdtemp(prefix=f"official_mlx_{args.variant}_"))
            try:
                made = prepare_weights_subprocess(runtime, args.variant, weights, args.seed)
                if "error" in made:
                    raise OfficialError(" ".join(made["error"]))
                rows = [run_subprocess(runtime, args.variant, weights, s, args.steps) for s in args.seconds]
            finally:
                if not (args.keep and args.weights):
                    shutil.rmtree(weights, ignore_errors=True)
            print_rows(rows)
            if args.json:
                args.json.write_text(json.dumps(rows, indent=2))
    except OfficialError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
