"""mlx_sa3 side by side with its peers on the same full-size random weights (SA3 small, SAME-S): wall time, peak RSS.

Implementations, each measured in its own fresh subprocess:

* ``mlx``         mlx_sa3 on MLX with OpenBLAS (the Linux default: ``import mlx_sa3`` preloads it),
* ``mlx-refblas`` mlx_sa3 on MLX with its bundled reference BLAS (``MLX_SA3_NO_OPENBLAS=1``; DiT step only),
* ``torch``       mlx_sa3's torch backend (``mlx_sa3.demo.to_torch_backend``: the same weights), as a user runs it
                  (``import mlx_sa3`` has preloaded OpenBLAS globally: torch's BLAS calls land in it, and the
                  backend runs torch's other ops on one thread so the two thread pools do not fight for the cores),
* ``torch-noob``  the same with ``MLX_SA3_NO_OPENBLAS=1``: torch keeps its own BLAS,
* ``diffusers``   diffusers' Stable Audio 3 port, the one a user would otherwise pick: ``StableAudio3DiTModel`` with
                  the same weights (mapped by mlx_sa3.torch_backend), transformers' T5Gemma encoder with the same
                  weights, ``StableAudio3DurationEmbedder`` with the same seconds embedder, and ``AutoencoderSAME``
                  with SAME-S sizes but *random weights and different semantics* (it has neither SAME-S's chunked
                  attention nor its kernel-3 mapping, so it runs a +-1 group band attention: speed only). The
                  end-to-end run calls ``StableAudio3Pipeline`` assembled offline from these modules and a
                  sentencepiece tokenizer trained on the spot, with ``silence_padding_duration=6`` so its DiT runs
                  the same canvas as mlx_sa3 (duration + 6 s; the diffusers default is 0). Its subprocess runs with
                  ``MLX_SA3_NO_OPENBLAS=1`` (MLX only draws the random weights there), so torch keeps its own BLAS.

Workloads: SAME-S decode; one DiT step (conditioning preparation + one forward, no guidance; context of 256 prompt
tokens + 1 seconds token, latents = duration * 44100 / 4096 without headroom, as bench_dit.py); end to end
(text + ping-pong steps + decode, batch 1, no guidance). Each subprocess builds the random model first (about 35 s,
untimed), keeps only what the workload needs, runs one untimed warm-up (the same call; for the DiT step on the
reference BLAS a 16-latent call instead, since a full one costs minutes; for end to end the same duration with
1 step), then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), times one call and reads
``ru_maxrss``: "peak MB" is the peak resident memory *during the timed call* (weights included), not of the setup.

    python benchmarks/compare.py --quick                 # 10 s workloads, end to end with 2 steps
    python benchmarks/compare.py --json compare.json     # decode 30 s, DiT step 30/120 s, end to end 30 s x 8 steps
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from common import CONTEXT_TOKENS, latent_length, latents_for, peak_rss_mb  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

import mlx_sa3  # noqa: E402  (loads OpenBLAS before mlx unless MLX_SA3_NO_OPENBLAS is set)
from mlx_sa3.checkpoint import full_size_configs as full_size_parts  # noqa: E402
from mlx_sa3.demo import random_model, to_torch_backend, train_tokenizer  # noqa: E402
from mlx_sa3.info import describe, gemm_gflops  # noqa: E402

IMPLS = {
    "mlx": "mlx_sa3 MLX+OpenBLAS",
    "mlx-refblas": "mlx_sa3 MLX+ref BLAS",
    "torch": "mlx_sa3 torch backend",
    "torch-noob": "mlx_sa3 torch, no OBLAS",
    "diffusers": "diffusers",
}
PROMPT = "a slow ambient pad with field recordings and distant birds"
PROMPT_TOKENS = 16  # valid tokens of the DiT-step context mask handed to diffusers (its pipeline always passes one)
WARMUP_LATENTS = 16
HEADROOM_SECONDS = 6.0  # mlx_sa3 (and the official code) generate 6 s past the requested end
# Processes that must not preload OpenBLAS: a globally loaded OpenBLAS also serves torch's BLAS symbols.
NO_OPENBLAS = {"mlx-refblas", "torch-noob", "diffusers"}


@dataclass(frozen=True)
class Workload:
    kind: str  # "decode" | "dit_step" | "e2e"
    seconds: float
    steps: int = 1

    @property
    def label(self) -> str:
        name = {"decode": "SAME-S decode", "dit_step": "DiT step", "e2e": "end to end"}[self.kind]
        return f"{name} {self.seconds:g}s" + (f" x{self.steps}" if self.kind == "e2e" else "")


TORCH = ("torch", "torch-noob", "diffusers")
FULL = [
    (Workload("decode", 30.0), ("mlx", *TORCH)),
    (Workload("dit_step", 30.0), ("mlx", "mlx-refblas", *TORCH)),
    (Workload("dit_step", 120.0), ("mlx", *TORCH)),
    (Workload("e2e", 30.0, 8), ("mlx", *TORCH)),
]
QUICK = [
    (Workload("decode", 10.0), ("mlx", *TORCH)),
    (Workload("dit_step", 10.0), ("mlx", "mlx-refblas", *TORCH)),
    (Workload("e2e", 10.0, 2), ("mlx", *TORCH)),
]


# ---------------------------------------------------------------------------------------------- memory accounting


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def reset_peak_rss() -> bool:
    """Restart the kernel's peak-RSS mark at the current RSS (Linux >= 4.0), so ru_maxrss covers what follows only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def release(*_dropped) -> None:
    """Return freed MLX buffers and Python garbage to the OS (call after dropping the last references)."""
    gc.collect()
    mx.clear_cache()


# -------------------------------------------------------------------------------------------------- the inputs


def dit_inputs(config, seconds: float, length: int | None = None) -> dict:
    """Seeded channels-first DiT inputs as numpy: latents, context (prompt + seconds tokens), global and local cond."""
    rng = np.random.default_rng(0)
    length = latent_length(seconds) if length is None else length
    return {
        "x": rng.standard_normal((1, config.io_channels, length), dtype=np.float32),
        "context": rng.standard_normal((1, CONTEXT_TOKENS, config.cond_token_dim), dtype=np.float32),
        "global": rng.standard_normal((1, config.global_cond_dim), dtype=np.float32),
        # text-to-audio: the official DiT still adds the (all-zero) inpainting conditioning
        "local": np.zeros((1, config.local_add_cond_dim, length), dtype=np.float32),
    }


def decode_latents(same_config, seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((1, same_config.latent_dim, latents_for(seconds, same_config)), dtype=np.float32)


# ------------------------------------------------------------------------------------ mlx_sa3 (MLX or torch backend)


def mlx_sa3_job(model, work: Workload, refblas: bool):
    """(warm-up, timed) callables for an SA3Model on either backend; the model's unused networks are dropped."""
    if work.kind == "decode":
        autoencoder = model.autoencoder
        z = decode_latents(autoencoder.config, work.seconds)
        warm_z = z[:, :, : 2 * autoencoder.config.decoder.latent_multiple]
        return (lambda: mx.eval(autoencoder.decode(warm_z)),), lambda: mx.eval(autoencoder.decode(z))
    if work.kind == "dit_step":
        dit = model.dit

        def step(inputs):
            prepared = dit.prepare(inputs["context"], inputs["global"], inputs["local"])
            mx.eval(dit.step(inputs["x"], 0.5, prepared))

        full = dit_inputs(dit.config, work.seconds)
        warm = dit_inputs(dit.config, work.seconds, WARMUP_LATENTS) if refblas else full
        return (lambda: step(warm),), lambda: step(full)
    pipe = mlx_sa3.StableAudio3(model)

    def generate(steps):
        return pipe.generate(PROMPT, work.seconds, steps=steps, seed=0).timings  # seconds per stage

    return (lambda: generate(1),), lambda: generate(work.steps)


# ----------------------------------------------------------------------------------------------------- diffusers


def diffusers_dit(model):
    """Stock ``StableAudio3DiTModel`` holding the mlx_sa3 DiT's weights (and the conditioner's padding embedding)."""
    import torch
    from diffusers import StableAudio3DiTModel

    from mlx_sa3.torch_backend import _dit_state

    c = model.dit.config
    net = StableAudio3DiTModel(
        io_channels=c.io_channels,
        embed_dim=c.embed_dim,
        depth=c.depth,
        num_heads=c.num_heads,
        cond_token_dim=c.cond_token_dim,
        global_cond_dim=c.global_cond_dim,
        local_add_cond_dim=c.local_add_cond_dim,
        timestep_features_dim=c.timestep_features_dim,
        ff_mult=c.ff_mult,
        num_memory_tokens=c.num_memory_tokens,
        use_differential_attention=c.differential,
    )
    state = _dit_state(dict(tree_flatten(model.dit.parameters())))
    state["prompt_padding_embedding"] = torch.from_numpy(np.array(model.conditioners.padding_embedding))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if set(missing) != {"rotary_pos_emb.inv_freq"} or unexpected:  # the RoPE frequencies are computed, not stored
        raise RuntimeError(f"DiT weights do not map onto diffusers: missing {missing}, unexpected {unexpected}")
    return net.eval().requires_grad_(False)


def diffusers_same(same_config):
    """``AutoencoderSAME`` with SAME-S sizes (random weights; band attention instead of chunks: speed only)."""
    from diffusers import AutoencoderSAME

    d = same_config.decoder
    vae = AutoencoderSAME(
        audio_channels=same_config.io_channels,
        patch_size=same_config.patch_size,
        encoder_channels=d.width,
        encoder_c_mults=(1,),
        encoder_strides=(d.stride,),
        encoder_transformer_depths=(d.depth,),
        latent_dim=same_config.latent_dim,
        use_differential_attention=d.differential,
        dim_heads=d.head_dim,
        ff_mult=int(d.ff_mult),
        sliding_window=1,
        sampling_rate=same_config.sample_rate,
    )
    return vae.eval().requires_grad_(False)


def diffusers_pipeline(model, tokenizer_dir: Path):
    """``StableAudio3Pipeline`` from the modules above, the mlx_sa3 text encoder / seconds embedder weights and a
    Gemma tokenizer read from ``tokenizer_dir`` (no network)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableAudio3Pipeline
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder
    from transformers import GemmaTokenizer

    from mlx_sa3.model import Conditioners
    from mlx_sa3.torch_backend import torch_text_encoder_from_mlx

    cfg = model.config
    duration = StableAudio3DurationEmbedder(output_dim=cfg.cond_dim, min_val=cfg.seconds_min, max_val=cfg.seconds_max)
    duration.linear.load_state_dict(
        {
            "weight": torch.from_numpy(np.array(model.conditioners.tensors[Conditioners.SECONDS_W])),
            "bias": torch.from_numpy(np.array(model.conditioners.tensors[Conditioners.SECONDS_B])),
        }
    )
    tokenizer = GemmaTokenizer.from_pretrained(str(tokenizer_dir), model_max_length=cfg.prompt_max_length)
    pipe = StableAudio3Pipeline(
        vae=diffusers_same(model.autoencoder.config),
        text_encoder=torch_text_encoder_from_mlx(model.text_encoder).model,
        tokenizer=tokenizer,
        duration_embedder=duration.eval().requires_grad_(False),
        transformer=diffusers_dit(model),
        scheduler=FlowMatchEulerDiscreteScheduler(stochastic_sampling=True),
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_job(model, work: Workload, tokenizer_dir: Path):
    import torch

    if work.kind == "decode":
        vae = diffusers_same(model.autoencoder.config)
        z = torch.from_numpy(decode_latents(model.autoencoder.config, work.seconds))

        def decode():
            with torch.inference_mode():
                vae.decode(z)

        return (decode,), decode
    if work.kind == "dit_step":
        net = diffusers_dit(model)
        inputs = {k: torch.from_numpy(v) for k, v in dit_inputs(model.dit.config, work.seconds).items()}
        mask = torch.zeros(1, CONTEXT_TOKENS, dtype=torch.bool)
        mask[:, :PROMPT_TOKENS] = True
        mask[:, -1] = True  # the seconds token

        def step():
            with torch.inference_mode():
                net(
                    inputs["x"],
                    torch.full((1,), 0.5),
                    encoder_hidden_states=inputs["context"],
                    global_hidden_states=inputs["global"],
                    encoder_attention_mask=mask,
                    return_dict=False,
                )

        return (step,), step
    pipe = diffusers_pipeline(model, tokenizer_dir)

    def generate(steps):
        pipe(
            PROMPT,
            duration=work.seconds,
            num_inference_steps=steps,
            silence_padding_duration=HEADROOM_SECONDS,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        )

    return (lambda: generate(1),), lambda: generate(work.steps)


# ------------------------------------------------------------------------------------------------------- workers


def run_worker(impl: str, work: Workload) -> dict:
    """Build, warm up, time one call; everything in this (fresh) process."""
    sa3, dit_cfg, same_cfg, text_cfg = full_size_parts("small")
    start = time.perf_counter()
    model = random_model(sa3, dit_cfg, same_cfg, text_cfg, dtype="float32")
    with tempfile.TemporaryDirectory(prefix="compare_tokenizer_") as tmp:
        if impl == "diffusers":
            train_tokenizer(Path(tmp))
            warmups, timed = diffusers_job(model, work, Path(tmp))
        else:
            backend = to_torch_backend(model) if impl.startswith("torch") else model
            warmups, timed = mlx_sa3_job(backend, work, refblas=impl == "mlx-refblas")
            del backend
        del model  # the jobs hold only what they need
        release()
        setup_s = time.perf_counter() - start
        setup_peak = peak_rss_mb()
        for warm in warmups:
            warm()
        ready = current_rss_mb()
        exact = reset_peak_rss()
        start = time.perf_counter()
        stages = timed()
        wall = time.perf_counter() - start
    return {
        "impl": impl,
        **asdict(work),
        "wall_s": wall,
        "stages_s": stages,
        "peak_rss_mb": peak_rss_mb(),
        "ready_rss_mb": ready,
        "peak_is_timed_call_only": exact,
        "setup_s": setup_s,
        "setup_peak_rss_mb": setup_peak,
        "blas": describe()["blas"],
    }


def run_subprocess(impl: str, work: Workload) -> dict:
    env = dict(os.environ)
    if impl in NO_OPENBLAS:
        env["MLX_SA3_NO_OPENBLAS"] = "1"
    cmd = [sys.executable, __file__, "--worker", impl, work.kind, str(work.seconds), str(work.steps)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"impl": impl, **asdict(work), "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------- report


def add_ratios(rows: list[dict]) -> None:
    """Wall time and peak RSS of each row over diffusers' on the same workload (below 1: less than diffusers)."""
    base = {(r["kind"], r["seconds"], r["steps"]): r for r in rows if r["impl"] == "diffusers" and "error" not in r}
    for r in rows:
        ref = base.get((r["kind"], r["seconds"], r["steps"]))
        if ref is not None and "error" not in r:
            r["wall_vs_diffusers"] = r["wall_s"] / ref["wall_s"]
            r["rss_vs_diffusers"] = r["peak_rss_mb"] / ref["peak_rss_mb"]


def print_table(rows: list[dict]) -> None:
    header = (
        f"{'workload':22} {'implementation':22} {'wall s':>8} {'x diff':>7} {'peak MB':>8} {'x diff':>7} "
        f"{'ready MB':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        label = Workload(r["kind"], r["seconds"], r["steps"]).label
        if "error" in r:
            print(f"{label:22} {IMPLS[r['impl']]:22} failed: {' '.join(r['error'])}")
            continue

        def ratio(key):
            return f"{r[key]:>7.2f}" if key in r else f"{'-':>7}"

        print(
            f"{label:22} {IMPLS[r['impl']]:22} {r['wall_s']:>8.2f} {ratio('wall_vs_diffusers')} "
            f"{r['peak_rss_mb']:>8.0f} {ratio('rss_vs_diffusers')} {r['ready_rss_mb']:>8.0f}"
        )
    for r in rows:
        if r.get("stages_s"):
            stages = ", ".join(f"{name} {seconds:.2f} s" for name, seconds in r["stages_s"].items())
            print(f"{Workload(r['kind'], r['seconds'], r['steps']).label}, {IMPLS[r['impl']]}: {stages}")


NOTES = [
    "x diff: this implementation over diffusers on the same workload (below 1: faster / less memory).",
    "peak MB: peak RSS during the timed call only (weights included); ready MB: RSS just before it.",
    "diffusers' AutoencoderSAME has SAME-S sizes but random weights and band attention (no chunked attention, "
    "kernel-1 mapping): its decode numbers compare speed only, not the same computation.",
    "diffusers end to end: StableAudio3Pipeline with silence_padding_duration=6 (the mlx_sa3 canvas); it decodes "
    "the whole canvas, mlx_sa3 stops decoding at the requested length.",
    "DiT step: conditioning preparation + one forward, no guidance; diffusers gets a 16-token prompt mask as its "
    "pipeline would pass, and no local conditioning (mlx_sa3 adds the official all-zero one).",
    "torch rows: with mlx_sa3's OpenBLAS preload (the default) torch's matmuls run in that OpenBLAS, and the torch "
    "backend runs torch's own ops on one thread so the two thread pools do not fight; 'no OBLAS' sets "
    "MLX_SA3_NO_OPENBLAS=1 (diffusers runs that way too).",
    "warm-up: one identical untimed call first, except the reference-BLAS DiT step (a 16-latent call) and end to "
    "end (same duration, 1 step).",
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 s workloads, end to end with 2 steps")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--worker", nargs=4, metavar=("IMPL", "KIND", "SECONDS", "STEPS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        impl, kind, seconds, steps = args.worker
        print(json.dumps(run_worker(impl, Workload(kind, float(seconds), int(steps)))))
        return

    load_before = os.getloadavg()
    gemm = gemm_gflops()
    rows = []
    for work, impls in QUICK if args.quick else FULL:
        for impl in impls:
            rows.append(run_subprocess(impl, work))
            outcome = "FAILED" if "error" in rows[-1] else f"{rows[-1]['wall_s']:.2f} s"
            print(f"  done {work.label} {impl}: {outcome}", file=sys.stderr)
    load_after = os.getloadavg()
    add_ratios(rows)
    print_table(rows)
    machine = (
        f"{os.cpu_count()} CPU cores, fp32 GEMM {gemm:.1f} GFLOP/s (MLX+OpenBLAS, 2048^3); load average "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after (other processes may share the cores)"
    )
    print(machine)
    for line in NOTES:
        print(f"note: {line}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": {**describe(), "cpu_count": os.cpu_count(), "summary": machine},
                    "gemm_gflops": gemm,
                    "load_average": [load_before, load_after],
                    "notes": NOTES,
                    "rows": rows,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
