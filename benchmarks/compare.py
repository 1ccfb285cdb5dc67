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
* ``official-mlx`` the official MLX runtime (``Stability-AI/stable-audio-3``, ``optimized/mlx``) run from a checkout
                  given by ``--official-repo`` (benchmarks/official_mlx.py: its CLI's ``main()``, fp32 DiT, on the
                  same random weights written in its own .npz layout; end to end only). ``--targets`` prints the
                  issue-12 ratios (mlx_sa3 MLX over it: small 10/30/120 s wall and peak RSS, medium 10 s peak RSS).

Workloads: SAME-S decode; one DiT step (conditioning preparation + one forward, no guidance; context of 256 prompt
tokens + 1 seconds token, latents = duration * 44100 / 4096 without headroom, as bench_dit.py); end to end
(text + ping-pong steps + decode, batch 1, no guidance). Each subprocess builds the random model first (about 35 s,
untimed), keeps only what the workload needs, runs one untimed warm-up (the same call; for the DiT step on the
reference BLAS a 16-latent call instead, since a full one costs minutes; for end to end the same duration with
1 step), then resets the kernel's peak-RSS mark (``/proc/self/clear_refs``), times one call and reads
``ru_maxrss``: "peak MB" is the peak resident memory *during the timed call* (weights included), not of the setup.

    python benchmarks/compare.py --quick                 # 10 s workloads, end to end with 2 steps
    python benchmarks/compare.py --json compare.json     # decode 30 s, DiT step 30/120 s, end to end 30 s x 8 steps
    python benchmarks/compare.py --official-repo ~/src/stable-audio-3 --targets small-10 small-30   # issue-12 ratios
    python benchmarks/compare.py --official-repo PATH --checkpoint small=DIR medium=DIR --bf16-weights --targets
        # adds the CLI as it runs (mlx-oneshot) and with --weights-dtype bfloat16 (mlx-oneshot-bf16)
    ... --bf16-checkpoint small=DIR   # the bf16 row loads a `convert.py --dtype bfloat16` conversion
    ... --oneshot mlx-oneshot-h0 torch-oneshot torch-oneshot-bf16
        # also: no headroom (the official runtime's canvas), the torch backend in fp32 and in bf16 (--dtype bfloat16)
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx_sa3  # noqa: E402  (loads OpenBLAS before mlx unless MLX_SA3_NO_OPENBLAS is set)
from mlx_sa3.checkpoint import full_size_configs as full_size_parts  # noqa: E402
from mlx_sa3.demo import random_model, to_torch_backend, train_tokenizer  # noqa: E402
from mlx_sa3.info import describe, gemm_gflops  # noqa: E402

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402
from common import CONTEXT_TOKENS, current_rss_mb, latent_length, latents_for, peak_rss_mb, reset_peak_rss  # noqa: E402
from mlx.utils import tree_flatten  # noqa: E402

IMPLS = {
    "mlx": "mlx_sa3 MLX+OpenBLAS",
    "mlx-oneshot": "mlx_sa3 MLX, as the CLI",
    "mlx-oneshot-bf16": "mlx_sa3 MLX, CLI, bf16 weights",
    "mlx-oneshot-h0": "mlx_sa3 MLX, CLI, no headroom",
    "torch-oneshot": "mlx_sa3 torch, as the CLI",
    "torch-oneshot-bf16": "mlx_sa3 torch, CLI, bf16",
    "torch-oneshot-noob": "torch, CLI, no OpenBLAS",
    "torch-oneshot-bf16-noob": "torch, CLI, bf16, no OBLAS",
    "mlx-refblas": "mlx_sa3 MLX+ref BLAS",
    "torch": "mlx_sa3 torch backend",
    "torch-noob": "mlx_sa3 torch, no OBLAS",
    "diffusers": "diffusers",
    "official-mlx": "official MLX runtime",
}
PROMPT = "a slow ambient pad with field recordings and distant birds"
PROMPT_TOKENS = 16  # valid tokens of the DiT-step context mask handed to diffusers (its pipeline always passes one)
WARMUP_LATENTS = 16
HEADROOM_SECONDS = 6.0  # mlx_sa3 (and the official code) generate 6 s past the requested end
# Processes that must not preload OpenBLAS: a globally loaded OpenBLAS also serves torch's BLAS symbols.
NO_OPENBLAS = {"mlx-refblas", "torch-noob", "diffusers", "torch-oneshot-noob", "torch-oneshot-bf16-noob"}


@dataclass(frozen=True)
class Workload:
    kind: str  # "decode" | "dit_step" | "e2e"
    seconds: float
    steps: int = 1
    variant: str = "small"

    @property
    def label(self) -> str:
        name = {"decode": "SAME-S decode", "dit_step": "DiT step", "e2e": "end to end"}[self.kind]
        model = "" if self.variant == "small" else f"{self.variant} "
        return model + f"{name} {self.seconds:g}s" + (f" x{self.steps}" if self.kind == "e2e" else "")


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
    from mlx_sa3.torch_backend import _dit_state

    import torch
    from diffusers import StableAudio3DiTModel

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
    from mlx_sa3.model import Conditioners
    from mlx_sa3.torch_backend import torch_text_encoder_from_mlx

    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, StableAudio3Pipeline
    from diffusers.pipelines.stable_audio_3.modeling_stable_audio_3 import StableAudio3DurationEmbedder
    from transformers import GemmaTokenizer

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


#: The one-shot peers: ``StableAudio3.from_pretrained`` / ``generate_to_file`` keyword arguments of each.
ONESHOT = {
    "mlx-oneshot": ({}, {}),
    "mlx-oneshot-bf16": ({"weights_dtype": "bfloat16"}, {}),  # linear weights in bf16, float32 compute
    "mlx-oneshot-h0": ({}, {"duration_padding_sec": 0.0}),  # the official MLX runtime's canvas (no 6 s headroom)
    "torch-oneshot": ({"backend": "torch"}, {}),
    "torch-oneshot-bf16": ({"backend": "torch", "dtype": "bfloat16"}, {}),  # bf16 compute (AMX CPUs)
    "torch-oneshot-noob": ({"backend": "torch"}, {}),  # ... with MLX_SA3_NO_OPENBLAS=1: torch keeps its own BLAS
    "torch-oneshot-bf16-noob": ({"backend": "torch", "dtype": "bfloat16"}, {}),
}


def oneshot_worker(impl: str, work: Workload, checkpoint: Path) -> dict:
    """mlx_sa3 as the CLI runs it: a fresh ``StableAudio3.from_pretrained(checkpoint, keep_loaded=False)`` whose
    timed call loads each network from the (page-cached) files for its stage and frees it after, like the official
    runtime's timed call; ``impl`` picks the options (:data:`ONESHOT`). Warm-up: the same with 1 step."""
    load_options, generate_options = ONESHOT[impl]

    def generate(steps: int, out: Path) -> dict:
        pipe = mlx_sa3.StableAudio3.from_pretrained(checkpoint, keep_loaded=False, **load_options)
        return pipe.generate_to_file(out, PROMPT, work.seconds, steps=steps, seed=0, **generate_options).timings

    with tempfile.TemporaryDirectory(prefix="compare_oneshot_") as tmp:
        generate(1, Path(tmp) / "warm.wav")
        release()
        ready = current_rss_mb()
        exact = reset_peak_rss()
        start = time.perf_counter()
        stages = generate(work.steps, Path(tmp) / "out.wav")
        wall = time.perf_counter() - start
    return {
        "impl": impl,
        **asdict(work),
        "wall_s": wall,
        "stages_s": stages,
        "peak_rss_mb": peak_rss_mb(),
        "ready_rss_mb": ready,
        "peak_is_timed_call_only": exact,
        "checkpoint": str(checkpoint),
        "blas": describe()["blas"],
    }


def oneshot_checkpoint(impl: str, variant: str) -> Path:
    """The folder a one-shot row loads: ``--checkpoint``'s, or for the bf16 row ``--bf16-checkpoint``'s if given."""
    converted = os.environ.get("COMPARE_BF16_CHECKPOINT_" + variant.upper())
    if impl == "mlx-oneshot-bf16" and converted:
        return Path(converted)
    return Path(os.environ["COMPARE_CHECKPOINT_" + variant.upper()])


def run_worker(impl: str, work: Workload) -> dict:
    """Build, warm up, time one call; everything in this (fresh) process."""
    if impl in ONESHOT:
        return oneshot_worker(impl, work, oneshot_checkpoint(impl, work.variant))
    sa3, dit_cfg, same_cfg, text_cfg = full_size_parts(work.variant)
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


def run_subprocess(impl: str, work: Workload, official: Official | None = None) -> dict:
    if impl == "official-mlx":
        return official.run(work)
    env = dict(os.environ)
    if impl in NO_OPENBLAS:
        env["MLX_SA3_NO_OPENBLAS"] = "1"
    cmd = [sys.executable, __file__, "--worker", impl, work.kind, str(work.seconds), str(work.steps), work.variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        return {"impl": impl, **asdict(work), "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------- the official MLX runtime (official_mlx.py)

# The issue-12 targets: mlx_sa3 (MLX backend) over the official MLX runtime (fp32 DiT), end to end, 8 steps.
TARGETS = {
    "small-10": Workload("e2e", 10.0, 8),
    "small-30": Workload("e2e", 30.0, 8),
    "small-120": Workload("e2e", 120.0, 8),
    "medium-10": Workload("e2e", 10.0, 8, "medium"),
}
TARGET_WALL = {"small": 0.5}  # wall ratio targets per variant (medium: peak RSS only)
TARGET_RSS = 0.6


@dataclass
class Official:
    """Runs benchmarks/official_mlx.py (a checkout of the official repo, random weights in its layout) per row."""

    repo: Path
    weights: Path  # one subfolder per variant, written once
    ready: dict = field(default_factory=dict)  # variant -> write-weights outcome

    def _call(self, *args: str) -> dict:
        cmd = [
            sys.executable,
            str(Path(__file__).with_name("official_mlx.py")),
            *args,
            "--official-repo",
            str(self.repo),
        ]
        proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
        if proc.returncode != 0:
            return {"error": proc.stderr.strip().splitlines()[-1:]}
        return json.loads(proc.stdout.strip().splitlines()[-1])

    def run(self, work: Workload) -> dict:
        folder = self.weights / work.variant
        if work.variant not in self.ready:
            self.ready[work.variant] = self._call("write-weights", "--variant", work.variant, "--weights", str(folder))
        made = self.ready[work.variant]
        row = (
            made
            if "error" in made
            else self._call(
                "run",
                "--variant",
                work.variant,
                "--weights",
                str(folder),
                "--seconds",
                f"{work.seconds:g}",
                "--steps",
                str(work.steps),
            )
        )
        return {**row, "impl": "official-mlx", **asdict(work)} if "error" in row else row


def print_targets(rows: list[dict], impl: str = "mlx") -> None:
    """mlx_sa3 (MLX backend, ``impl``) over the official MLX runtime, per end-to-end workload both ran."""

    def key(r):
        return r.get("variant", "small"), r["kind"], r["seconds"], r["steps"], r.get("round", 0)

    ours = {key(r): r for r in rows if r["impl"] == impl and "error" not in r}
    theirs = {key(r): r for r in rows if r["impl"] == "official-mlx" and "error" not in r}
    pairs = [(k, ours[k], theirs[k]) for k in ours if k in theirs]
    if not pairs:
        return
    print()
    header = (
        f"{IMPLS[impl] + ' / official MLX':30} {'wall s':>15} {'x wall':>7} {'target':>7} {'peak MB':>13} "
        f"{'x peak':>7} {'target':>7}"
    )
    print(header)
    print("-" * len(header))
    for (variant, kind, seconds, steps, rnd), a, b in pairs:
        wall, rss = a["wall_s"] / b["wall_s"], a["peak_rss_mb"] / b["peak_rss_mb"]
        wall_target = TARGET_WALL.get(variant)
        wall_mark = "-" if wall_target is None else f"<={wall_target:g} " + ("ok" if wall <= wall_target else "NO")
        label = Workload(kind, seconds, steps, variant).label + (f" r{rnd}" if rnd else "")
        print(
            f"{label:30} {a['wall_s']:>7.1f}/{b['wall_s']:<7.1f} {wall:>7.2f} {wall_mark:>7} "
            f"{a['peak_rss_mb']:>6.0f}/{b['peak_rss_mb']:<6.0f} {rss:>7.2f} "
            f"{f'<={TARGET_RSS:g} ' + ('ok' if rss <= TARGET_RSS else 'NO'):>7}"
        )
    rounds = {}
    for (variant, kind, seconds, steps, _), a, b in pairs:
        rounds.setdefault((variant, kind, seconds, steps), []).append(
            (a["wall_s"] / b["wall_s"], a["peak_rss_mb"] / b["peak_rss_mb"])
        )
    for (variant, kind, seconds, steps), ratios in rounds.items():
        if len(ratios) > 1:
            walls, peaks = zip(*ratios)
            print(
                f"{Workload(kind, seconds, steps, variant).label}: median over {len(ratios)} rounds x wall "
                f"{np.median(walls):.2f}, x peak {np.median(peaks):.2f}"
            )
    for (variant, kind, seconds, steps, rnd), a, b in pairs:
        if rnd:
            continue
        print(
            f"official MLX runtime {Workload(kind, seconds, steps, variant).label}: {b.get('latents')} latents "
            f"(mlx_sa3: duration + {HEADROOM_SECONDS:g} s); BLAS {b.get('blas')}"
        )


# ------------------------------------------------------------------------------------------------------- report


def add_ratios(rows: list[dict]) -> None:
    """Wall time and peak RSS of each row over diffusers' on the same workload (below 1: less than diffusers)."""

    def key(r):
        return r.get("variant", "small"), r["kind"], r["seconds"], r["steps"]

    base = {key(r): r for r in rows if r["impl"] == "diffusers" and "error" not in r}
    for r in rows:
        ref = base.get(key(r))
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
        label = Workload(r["kind"], r["seconds"], r["steps"], r.get("variant", "small")).label
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
            label = Workload(r["kind"], r["seconds"], r["steps"], r.get("variant", "small")).label
            print(f"{label}, {IMPLS[r['impl']]}: {stages}")


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
    (
        "official MLX runtime (benchmarks/official_mlx.py): its CLI's main() from the checkout, fp32 DiT, "
        "--free-models, on random_model's weights stored in its layout (DiT/T5Gemma fp16 files, SAME fp32); "
        "its timed call includes loading each model from its file (page cache warm), and its canvas has no 6 "
        "s headroom. Same BLAS setting as mlx_sa3's rows (the OpenBLAS preload, or none with MLX_SA3_NO_OPENBLAS=1)."
    ),
]


def export_folders(items: list[str], prefix: str) -> dict[str, str]:
    """``VARIANT=DIR`` arguments as a dict, each also exported (resolved) as ``prefix + VARIANT`` for the workers."""
    folders = dict(item.split("=", 1) for item in items)
    for variant, folder in folders.items():
        os.environ[prefix + variant.upper()] = str(Path(folder).resolve())
    return folders


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10 s workloads, end to end with 2 steps")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--official-repo",
        type=Path,
        help="checkout of Stability-AI/stable-audio-3: adds its MLX "
        "runtime (optimized/mlx) to the end-to-end workloads",
    )
    parser.add_argument("--official-weights", type=Path, help="keep its random weights here (default: a temp dir)")
    parser.add_argument(
        "--checkpoint",
        nargs="+",
        metavar="VARIANT=DIR",
        default=[],
        help="full-size checkpoints (benchmarks/random_checkpoint.py), e.g. small=/tmp/sa3rand/small: adds the "
        "mlx-oneshot row (mlx_sa3 as the CLI runs it: loads per stage inside the timed call) to end-to-end workloads",
    )
    parser.add_argument(
        "--bf16-weights",
        action="store_true",
        help="with --checkpoint: also the mlx-oneshot-bf16 row (the CLI with --weights-dtype bfloat16)",
    )
    parser.add_argument(
        "--bf16-checkpoint",
        nargs="+",
        metavar="VARIANT=DIR",
        default=[],
        help="with --bf16-weights: the mlx-oneshot-bf16 row loads this `convert.py SRC DIR --dtype bfloat16` "
        "output instead of --checkpoint's float32 folder (converted once, as the official runtime's half files)",
    )
    parser.add_argument(
        "--oneshot",
        nargs="+",
        choices=sorted(ONESHOT),
        default=[],
        help="with --checkpoint: more one-shot rows (mlx-oneshot-h0: no headroom, the official runtime's canvas; "
        "torch-oneshot(-bf16): the torch backend, as --backend torch [--dtype bfloat16])",
    )
    parser.add_argument(
        "--targets",
        nargs="*",
        choices=sorted(TARGETS),
        help="the issue-12 target set (all of it "
        "when no names follow): end to end x8 steps, mlx_sa3 MLX vs the official runtime "
        "(needs --official-repo)",
    )
    parser.add_argument(
        "--skip",
        nargs="+",
        default=[],
        metavar="IMPL",
        help="leave these implementations out (e.g. mlx: the kept-loaded row)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="repeat the plan, alternating the order of the implementations (ratios are taken within a round)",
    )
    parser.add_argument(
        "--worker", nargs=5, metavar=("IMPL", "KIND", "SECONDS", "STEPS", "VARIANT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    if args.worker:
        impl, kind, seconds, steps, variant = args.worker
        print(json.dumps(run_worker(impl, Workload(kind, float(seconds), int(steps), variant))))
        return
    if args.targets is not None and args.official_repo is None:
        parser.error("--targets needs --official-repo")
    if args.targets is not None:
        plan = [(TARGETS[name], ("mlx", "official-mlx")) for name in (args.targets or TARGETS)]
    else:
        plan = QUICK if args.quick else FULL
    if args.official_repo is not None and args.targets is None:
        plan = [(w, (*impls, "official-mlx") if w.kind == "e2e" else impls) for w, impls in plan]
    checkpoints = export_folders(args.checkpoint, "COMPARE_CHECKPOINT_")
    converted = export_folders(args.bf16_checkpoint, "COMPARE_BF16_CHECKPOINT_")
    if converted and not args.bf16_weights:
        parser.error("--bf16-checkpoint needs --bf16-weights")
    if set(converted) - set(checkpoints):
        parser.error("--bf16-checkpoint names a variant that --checkpoint does not")
    extra = (["mlx-oneshot-bf16"] if args.bf16_weights else []) + args.oneshot
    oneshot = ("mlx-oneshot", *dict.fromkeys(name for name in extra if name != "mlx-oneshot"))
    plan = [(w, (*impls, *oneshot) if w.kind == "e2e" and w.variant in checkpoints else impls) for w, impls in plan]
    plan = [(w, tuple(impl for impl in impls if impl not in args.skip)) for w, impls in plan]
    scratch = None if args.official_weights else tempfile.TemporaryDirectory(prefix="compare_official_")
    official = Official(args.official_repo, args.official_weights or Path(scratch.name)) if args.official_repo else None

    load_before = os.getloadavg()
    gemm = gemm_gflops()
    rows = []
    for rnd in range(args.rounds):
        for work, impls in plan:
            for impl in impls[::-1] if rnd % 2 else impls:
                rows.append({**run_subprocess(impl, work, official), "round": rnd})
            outcome = "FAILED" if "error" in rows[-1] else f"{rows[-1]['wall_s']:.2f} s"
            print(f"  done {work.label} {impl}: {outcome}", file=sys.stderr)
    load_after = os.getloadavg()
    if scratch is not None:
        scratch.cleanup()
    add_ratios(rows)
    print_table(rows)
    print_targets(rows)
    for impl in oneshot:
        print_targets(rows, impl)
    machine = (
        f"{os.cpu_count()} CPU cores, fp32 GEMM {gemm:.1f} GFLOP/s (MLX, 2048^3; BLAS {describe()['blas']}); "
        f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after (other processes may share the cores)"
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
