"""``python -m mlx_sa3.generate``: Stable Audio 3 from the terminal (a thin shell over :class:`StableAudio3`)."""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

from . import cli
from .audio import WRITE_FORMATS
from .options import DEFAULT_INIT_NOISE_LEVEL, check_batch_size, validate_inpaint_regions
from .storage import WEIGHTS_DTYPES

EXAMPLES = """examples:
  # try the whole path offline with a tiny random model (its output is noise)
  python -m mlx_sa3.generate --model demo -p "warm analog synth pad" --duration 5 -o pad.wav

  # text to audio, 30 s, with a converted checkpoint
  python -m mlx_sa3.generate --model ./sa3-small-music -p "lo-fi hip hop beat, 90 bpm" --duration 30 -o beat.wav

  # audio to audio: restyle a clip (0.1 = close variation, 0.9 = loose)
  python -m mlx_sa3.generate --model ./sa3-small-music -p "jazz trio" --init-audio in.wav \\
      --init-noise-level 0.7 -o jazz.wav

  # inpaint two regions of a clip, keep the rest
  python -m mlx_sa3.generate --model ./sa3-medium -p "drum fill" --inpaint-audio song.wav --duration 20 \\
      --inpaint-start 4 --inpaint-end 6 --inpaint-start 12 --inpaint-end 13.5 -o fixed.flac

  # several clips in one call, each with its own prompt, duration and seed: rain-1.wav, rain-2.wav
  python -m mlx_sa3.generate --model ./sa3-small-sfx -p "light rain" -p "thunder" --duration 4 --duration 7 \\
      --seed 1 --seed 2 -o rain.wav

  # with a LoRA at strength 0.8, active only in the first (noisiest) part of sampling
  python -m mlx_sa3.generate --model ./sa3-small-music -p "808 trap beat" --lora trap.safetensors \\
      --lora-strength 0.8 --lora-interval 0.5,1 -o trap.wav

  # continue a clip past its end (no regions: everything after the clip is generated)
  python -m mlx_sa3.generate --model ./sa3-small-music -p "ambient drone" --inpaint-audio intro.wav \\
      --duration 60 -o longer.wav
"""


def build_parser() -> argparse.ArgumentParser:
    p = cli.ArgumentParser(
        prog="python -m mlx_sa3.generate",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-p", "--prompt", action="append", help="what to generate; repeat for one file per prompt")
    p.add_argument(
        "--negative-prompt",
        action="append",
        help="what to steer away from (needs --cfg-scale other than 1); one, or one per -p",
    )
    p.add_argument(
        "--model",
        default="stabilityai/stable-audio-3-small-music",
        help="Hub repo id, local directory (original or converted), or 'demo' (tiny random model, no download)",
    )
    p.add_argument(
        "--duration", type=float, action="append", help="seconds of audio to write (default 30); one, or one per -p"
    )
    p.add_argument("--steps", type=int, help="sampling steps (default 8)")
    p.add_argument("--sampler", help="pingpong, euler, dpmpp or rk4 (default: the checkpoint's official default)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 1: off)")
    p.add_argument(
        "--apg-scale",
        type=float,
        default=1.0,
        help="1 = adaptive projected guidance, 0 = plain CFG, between: a blend (default 1)",
    )
    p.add_argument(
        "--seed",
        type=int,
        action="append",
        help="random seed, 0..2**63-1; -1 or any negative = random (default: random, printed); one, or one per -p",
    )
    p.add_argument("--init-audio", help="audio file to restyle (audio-to-audio)")
    p.add_argument(
        "--init-noise-level",
        type=float,
        default=DEFAULT_INIT_NOISE_LEVEL,
        help="how far to move away from --init-audio, (0, 1]",
    )
    p.add_argument("--inpaint-audio", help="audio file to inpaint or continue")
    p.add_argument(
        "--inpaint-start",
        type=float,
        action="append",
        default=[],
        help="start (s) of a region to regenerate; repeatable",
    )
    p.add_argument(
        "--inpaint-end", type=float, action="append", default=[], help="end (s) of a region to regenerate; repeatable"
    )
    p.add_argument("-o", "--output", help="output file (default output.wav; with --play and no -o nothing is written)")
    p.add_argument("--format", choices=tuple(WRITE_FORMATS), help="output format (default: from the file suffix)")
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="DiT/text precision (default: half on Metal, float32 on CPU; --backend torch: float32 or bfloat16, "
        "which is several times faster on CPUs with AMX/AVX512-BF16)",
    )
    p.add_argument(
        "--weights-dtype",
        metavar="{float32,bfloat16}",
        help="how the DiT and text encoder weights are held: bfloat16 halves their memory, rounding them once at "
        "load (relative error <= 2^-8) while computing in float32 (MLX backend; default: the compute dtype)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "mlx", "torch"),
        help="compute backend (default auto: MLX where it has a GPU, torch on an x86-64 CPU when installed, "
        "MLX otherwise; the summary says which ran and why)",
    )
    p.add_argument(
        "--batch", type=int, default=1, help="variations to generate at once, 1..1024 (files get -1, -2, ... suffixes)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files (default: refuse)")
    _add_lora_arguments(p)
    _add_controls(p)
    return p


def _add_lora_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LoRA adapters (see docs/LORA.md)")
    g.add_argument("--lora", action="append", default=[], metavar="PATH", help="LoRA .safetensors file; repeatable")
    g.add_argument(
        "--lora-strength",
        type=float,
        action="append",
        default=[],
        metavar="S",
        help="strength of the n-th --lora (by position; the rest default to 1)",
    )
    g.add_argument(
        "--lora-interval",
        action="append",
        default=[],
        metavar="LO,HI",
        help="sigma interval in which a LoRA acts (0,1 = always): one for every --lora, or one per --lora",
    )


def _parse_interval(text: str) -> tuple[float, float]:
    parts = text.split(",")
    try:
        lo, hi = (float(v) for v in parts)
    except ValueError:
        raise ValueError(f"--lora-interval {text}: expected LO,HI (two numbers)") from None
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
        raise ValueError(f"--lora-interval {text}: expected finite LO <= HI")
    return lo, hi


def lora_entries(args) -> list[tuple]:
    """``--lora`` / ``--lora-strength`` / ``--lora-interval`` -> ``[(path, strength, interval), ...]`` for
    ``StableAudio3.from_pretrained(loras=...)``, checked before any model loads (raises ValueError/CheckpointError)."""
    from .converter.safetensors_io import read_safetensors_header
    from .lora import check_lora_file

    paths, strengths, intervals = args.lora, args.lora_strength, args.lora_interval
    if not paths and (strengths or intervals):
        raise ValueError("--lora-strength / --lora-interval given without --lora")
    if len(strengths) > len(paths):
        raise ValueError(f"{len(strengths)} --lora-strength for {len(paths)} --lora")
    if len(intervals) not in (0, 1, len(paths)):
        raise ValueError(f"{len(intervals)} --lora-interval for {len(paths)} --lora: give one for all or one each")
    for s in strengths:
        if not math.isfinite(s):
            raise ValueError(f"--lora-strength {s}: not a finite number")
    strengths = strengths + [1.0] * (len(paths) - len(strengths))
    intervals = [_parse_interval(v) for v in intervals] * (len(paths) if len(intervals) == 1 else 1)
    intervals = intervals or [None] * len(paths)
    checked = [check_lora_file(p) for p in paths]
    for path in checked:
        read_safetensors_header(path)  # complete file: a truncated download fails here, not after loading
    return list(zip(checked, strengths, intervals))


def _add_controls(p: argparse.ArgumentParser) -> None:
    """The guidance, schedule, level, format and playback controls (official defaults in the help)."""
    g = p.add_argument_group("guidance and schedule (official defaults)")
    g.add_argument("--cfg-interval", metavar="LO,HI", help="guide only at noise levels LO <= t <= HI (default 0,1)")
    g.add_argument("--cfg-rescale", type=float, default=0.0, metavar="PHI", help="CFG rescale in [0, 1] (default 0)")
    g.add_argument(
        "--cfg-norm-threshold", type=float, default=0.0, metavar="T", help="cap on the guidance norm (default 0: off)"
    )
    g.add_argument(
        "--sigma-max",
        type=float,
        metavar="S",
        help="starting noise level in (0, 1] (default 1; a2a: --init-noise-level)",
    )
    g.add_argument(
        "--headroom", type=float, default=6.0, metavar="SECONDS", help="seconds generated past the end (default 6)"
    )
    g.add_argument(
        "--dist-shift",
        metavar="TYPE[:k=v,...]",
        help="schedule shift: logsnr, flux, full or none (default: checkpoint's)",
    )
    lv = p.add_argument_group("levels (default: the official clamp to [-1, 1], no gain)")
    lv.add_argument("--normalize", choices=("peak", "loudness"), help="peak: to --ceiling; loudness: to --target-lufs")
    lv.add_argument("--ceiling", type=float, default=-1.0, metavar="DBFS", help="peak ceiling (default -1 dBFS)")
    lv.add_argument("--target-lufs", type=float, default=-14.0, metavar="LUFS", help="loudness target (default -14)")
    lv.add_argument("--no-clamp", action="store_true", help="write the raw decoder output (float wav only)")
    out = p.add_argument_group("output")
    out.add_argument(
        "--bit-depth", type=int, metavar="16|24|32", help="wav 16/24/32 (default 32 float), flac 16/24 (24)"
    )
    out.add_argument("--play", action="store_true", help="play the result on the default output device at the end")


def _progress(quiet: bool, check_signals=None):
    """A callback that draws one bar for the sampling steps and one for decoding; at every event it first calls
    ``check_signals`` (:func:`mlx_sa3.outputs.handle_signals`: a signal whose exception was lost ends the run here)."""
    from tqdm import tqdm

    bars = {}

    def bar(stage: str, **kwargs):
        if stage not in bars:
            for previous in bars.values():  # one live bar at a time keeps the terminal tidy
                previous.close()
            bars[stage] = tqdm(desc=stage, file=sys.stderr, **kwargs)
        return bars[stage]

    def callback(event):
        if check_signals is not None:
            check_signals()
        if event.stage == "done":
            for b in bars.values():
                b.close()
        elif quiet:
            pass
        elif event.stage == "sampling":
            bar("sampling", total=event.total, unit="step").update(1)
        elif event.stage == "decoding":
            bar("decoding", total=event.total, unit="sample", unit_scale=True).update(event.audio.shape[-1])
        return True

    return callback


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if len(args.inpaint_start) != len(args.inpaint_end):
        return cli.fail(f"got {len(args.inpaint_start)} --inpaint-start but {len(args.inpaint_end)} --inpaint-end")
    if args.output is None and not args.play:
        args.output = "output.wav"
    if args.weights_dtype is not None and args.weights_dtype not in WEIGHTS_DTYPES:
        return cli.fail(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {args.weights_dtype!r}")
    try:
        args.items = per_item_options(args)
    except ValueError as err:
        return cli.fail(str(err))
    from .loading import CheckpointError

    try:
        args.loras = lora_entries(args)
    except (ValueError, CheckpointError) as err:
        return cli.fail(str(err))
    from .platform import blas_warning

    if blas_warning():
        print(f"warning: {blas_warning()}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = lambda message, *a, **k: print(f"warning: {message}", file=sys.stderr)
        return _run(args)


def _max_samples(model: str) -> int | None:
    """The checkpoint's canvas (``sample_size``) from its config alone, without loading weights (None: unknown)."""
    from .checkpoint import SA3Config, model_config_of
    from .loading import open_source

    if model == "demo":
        from .demo import DEMO_CONFIG

        return SA3Config.from_dict(DEMO_CONFIG).sample_size
    source = open_source(model, allow_patterns=["model_config.json", "config.json"])  # configs only
    return model_config_of(source).sample_size if source.layout != "same" else None


def _preflight(args):
    """Check every argument and input before a model loads; returns the seed and the audio inputs as arrays."""
    from .audio import SAMPLE_RATE, check_duration, format_for, load_audio_input
    from .outputs import batch_targets, check_output_targets, resolve_seed
    from .pipeline import StableAudio3
    from .sampling import SAMPLERS

    items = args.items
    seed = [resolve_seed(s) for s in items["seed"]] if isinstance(items["seed"], list) else resolve_seed(items["seed"])
    check_batch_size(args.batch)
    count = max([len(v) for v in items.values() if isinstance(v, list)], default=args.batch)
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"steps must be at least 1, got {args.steps}")
    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 < args.init_noise_level <= 1.0:
        raise ValueError(f"init noise level must be in (0, 1], got {args.init_noise_level}")
    for start, end in zip(args.inpaint_start, args.inpaint_end):
        if not 0 <= start < end:
            raise ValueError(f"inpaint region ({start:g}, {end:g}) must satisfy 0 <= start < end")
    if args.inpaint_start and args.inpaint_audio is None:
        raise ValueError("inpaint regions need inpaint audio (the audio to keep outside the regions)")
    has_audio = args.init_audio is not None or args.inpaint_audio is not None
    prompt = items["prompt"]
    StableAudio3._prompts(prompt, len(prompt) if isinstance(prompt, list) else args.batch, required=not has_audio)
    if args.output == "-":  # every other tool's standard output; a file named "-" is ./-
        raise ValueError(
            "-o -: writing to standard output is not supported (a file is written atomically, then "
            "renamed); give a file name, or --play to listen"
        )
    if args.output is not None:  # --play alone writes nothing
        format_for(args.output, args.format)
        check_output_targets(batch_targets(args.output, count), args.overwrite)
    durations = items["duration"] if isinstance(items["duration"], list) else [items["duration"]]
    max_samples = _max_samples(args.model)
    for duration in durations:
        check_duration(duration, SAMPLE_RATE, max_samples)
    init = load_audio_input(args.init_audio, "--init-audio") if args.init_audio is not None else None
    inpaint = load_audio_input(args.inpaint_audio, "--inpaint-audio") if args.inpaint_audio is not None else None
    if inpaint is not None:
        _check_inpainting(list(zip(args.inpaint_start, args.inpaint_end)), inpaint.shape[1] / SAMPLE_RATE, durations)
    return seed, init, inpaint


def _check_inpainting(regions: list, source_seconds: float, durations: list) -> None:
    """The regions (or the continuation) against every item's duration, as the pipeline will check them."""
    for i, duration in enumerate(durations):
        try:
            validate_inpaint_regions(regions, source_seconds, duration)
        except ValueError as err:
            raise ValueError(f"item {i + 1}: {err}" if len(durations) > 1 else str(err)) from None


def _run(args) -> int:
    from .audio import AudioError
    from .loading import CheckpointError
    from .outputs import Terminated, handle_signals, os_error_message
    from .pipeline import GenerationCancelled, GenerationRequest, StableAudio3
    from .playback import PlaybackError
    from .sampling import NonFiniteError

    try:
        with handle_signals() as check_signals:
            _check_weights_dtype(args)
            seed, init_audio, inpaint_audio = _preflight(args)
            _check_before_loading(args, _controls_request(args, GenerationRequest))
            start = time.perf_counter()
            # one generation: each network is loaded for its stage and freed after it (one network at a time)
            pipe = StableAudio3.from_pretrained(
                args.model,
                dtype=args.dtype,
                backend=args.backend,
                loras=getattr(args, "loras", None),
                keep_loaded=False,
                weights_dtype=args.weights_dtype,
            )
            load_time = time.perf_counter() - start
            slow = _slow_dtype_warning(pipe.backend, args.dtype)
            if slow:
                print(slow, file=sys.stderr)
            if args.model == "demo":
                print("note: the demo model has random weights: its output is noise, not music", file=sys.stderr)
            request = GenerationRequest(
                **{**args.items, "seed": seed},
                steps=args.steps,
                sampler=args.sampler,
                cfg_scale=args.cfg_scale,
                apg_scale=args.apg_scale,
                init_audio=init_audio,
                init_noise_level=args.init_noise_level,
                inpaint_audio=inpaint_audio,
                inpaint_regions=list(zip(args.inpaint_start, args.inpaint_end)) or None,
                batch_size=args.batch,
                **_control_fields(args),
            )
            if args.output is None:  # --play only: nothing touches the disk
                out = pipe.generate(callback=_progress(args.quiet, check_signals), request=request)
            else:
                out = pipe.generate_to_file(
                    args.output,
                    fmt=args.format,
                    callback=_progress(args.quiet, check_signals),
                    request=request,
                    overwrite=args.overwrite,
                    bit_depth=args.bit_depth,
                )
            _summary(out, load_time)
            print(f"backend: {pipe.backend} ({pipe.backend_reason}); each stage's time includes loading its network")
            hint = _dtype_hint(pipe.backend, args.dtype)
            if hint:
                print(hint)
            if args.play:
                _play(out)
    except KeyboardInterrupt:
        return cli.fail("interrupted; no output written", 130)
    except Terminated as err:
        return cli.fail(f"{err}; no output written", err.status)
    except GenerationCancelled as err:
        return cli.fail(str(err))
    except (ValueError, AudioError, CheckpointError, NonFiniteError) as err:
        return cli.fail(str(err))
    except PlaybackError as err:
        return cli.fail(str(err))
    except OSError as err:  # missing files, permissions, full or read-only disks: one line, never a traceback
        return cli.fail(os_error_message(err, action="cannot read or write") if err.errno else str(err))
    return 0


def _control_fields(args) -> dict:
    """The guidance, schedule and level controls as GenerationRequest fields (CLI flag -> library name)."""
    return {
        "cfg_interval": args.cfg_interval,
        "scale_phi": args.cfg_rescale,
        "cfg_norm_threshold": args.cfg_norm_threshold,
        "sigma_max": args.sigma_max,
        "duration_padding_sec": args.headroom,
        "dist_shift": args.dist_shift,
        "normalize": args.normalize,
        "ceiling_dbfs": args.ceiling,
        "target_lufs": args.target_lufs,
        "clamp": not args.no_clamp,
    }


def _controls_request(args, request_class):
    """A request holding just the controls, to check them before a model loads."""
    return request_class(
        "x",
        init_audio=args.init_audio,
        init_noise_level=args.init_noise_level,
        cfg_scale=args.cfg_scale,
        apg_scale=args.apg_scale,
        **_control_fields(args),
    )


def _check_before_loading(args, request) -> None:
    """Every model-independent check, so a bad value is refused before the (slow) model load."""
    from .audio import format_for, is_float_output, subtype_for
    from .playback import check_playback

    request.validate()
    if args.output is not None:
        fmt = format_for(args.output, args.format)
        subtype_for(fmt, args.bit_depth)
        if args.no_clamp and not is_float_output(fmt, args.bit_depth):
            raise ValueError(
                f"--no-clamp needs a float format (32-bit wav); {fmt} cannot hold samples beyond full scale"
            )
    elif args.bit_depth is not None or args.format is not None:
        raise ValueError("--format and --bit-depth need an output file (-o)")
    if args.play:
        check_playback()


def _check_weights_dtype(args) -> None:
    """--dtype and --weights-dtype against the backend that will run (raises ValueError)."""
    from .backend import check_dtype, check_weights_dtype, resolve_backend

    backend = resolve_backend(args.backend, args.dtype, args.weights_dtype)[0]
    check_dtype(args.dtype, backend)
    if args.weights_dtype is not None:
        check_weights_dtype(args.weights_dtype, args.dtype, backend)


def _summary(out, load_time: float) -> None:
    stages = ", ".join(f"{k} {v:.2f}s" for k, v in {"load": load_time, **out.timings}.items() if isinstance(v, float))
    seeds = f"seeds {', '.join(map(str, out.seeds))}" if len(set(out.seeds)) > 1 else f"seed {out.seed}"
    if hasattr(out, "paths"):
        print(f"wrote {', '.join(map(str, out.paths))} ({seeds}; {stages})")
    else:
        print(f"generated {out.audio.shape[-1] / out.sample_rate:.2f} s ({seeds}; {stages})")
    for i, report in enumerate(out.levels):
        prefix = f"levels {i + 1}" if len(out.levels) > 1 else "levels"
        print(f"{prefix}: {report.summary()}")


def _dtype_hint(backend: str, dtype: str | None) -> str | None:
    """A float32 torch run on a CPU with bfloat16 matrix instructions: say what --dtype bfloat16 would give.

    Not the default: it changes each DiT step's velocity by ~3-4.5 % (cosine 0.999-0.9996; docs/ARCHITECTURE.md,
    "bfloat16 compute on the torch backend"), and float32 is the official precision on CPUs."""
    from .platform import has_fast_bf16_matmul

    if backend != "torch" or dtype not in (None, "float32") or not has_fast_bf16_matmul():
        return None
    return (
        "hint: this CPU has bfloat16 matrix instructions: --dtype bfloat16 ran the small DiT's steps ~4x faster on "
        "such a CPU (velocity within ~3 % of float32)"
    )


def _slow_dtype_warning(backend: str, dtype: str | None) -> str | None:
    """A half-precision compute dtype that this machine runs far slower than float32: say so before sampling.

    torch's bfloat16 GEMMs are fast only with bfloat16 matrix instructions (AMX / AVX512-BF16); without them torch
    falls back to generic kernels (measured on an AVX2-only x86-64 CPU: ~0.75 GFLOP/s against ~28 in float32, 1024-wide
    products). MLX's CPU backend has no fast half-precision matmul at all (float32 is its CPU default)."""
    import mlx.core as mx

    from .platform import has_fast_bf16_matmul

    if dtype in (None, "float32"):
        return None
    if backend == "torch" and not has_fast_bf16_matmul():
        return (
            f"warning: --dtype {dtype} on a CPU without bfloat16 matrix instructions: torch's bfloat16 GEMMs run "
            "tens of times slower than float32 here (leave --dtype out for float32)"
        )
    if backend == "mlx" and mx.default_device() == mx.cpu:  # the CPU test of the kernels and the loader
        return (
            f"warning: --dtype {dtype} on MLX's CPU backend: its half-precision matmuls are slower than float32 "
            "(--weights-dtype bfloat16 halves the weights' memory and keeps float32 compute)"
        )
    return None


def _play(out) -> None:
    from . import playback

    if hasattr(out, "paths"):
        for path in out.paths:
            playback.play_file(path)
    else:
        for audio in out.audio:
            playback.play(audio, out.sample_rate)


PER_ITEM_FLAGS = {"prompt": "-p", "duration": "--duration", "seed": "--seed", "negative_prompt": "--negative-prompt"}


def per_item_options(args) -> dict:
    """The repeatable flags as request fields: one value broadcasts, several give one item each (checked here).

    Every flag given more than once must be given as often as the others given more than once; ``--batch`` makes
    variations of one prompt and does not combine with several items.
    """
    given = {field: getattr(args, field) or [] for field in PER_ITEM_FLAGS}
    counts = {field: len(values) for field, values in given.items() if len(values) > 1}
    if len(set(counts.values())) > 1:
        listed = ", ".join(f"{len(given[f])} {PER_ITEM_FLAGS[f]}" for f in counts)
        raise ValueError(f"got {listed}: give each of these once or once per item")
    if counts and args.batch != 1:
        raise ValueError("--batch makes variations of one prompt; with several -p/--duration/--seed leave it out")
    options = {field: (values if len(values) > 1 else values[0] if values else None) for field, values in given.items()}
    if options["duration"] is None:
        options["duration"] = 30.0
    return options


if __name__ == "__main__":
    sys.exit(main())
