"""Convert a Hub checkpoint once into the mlx_sa3 layout: ``python -m mlx_sa3.convert SRC OUT``.

SRC is a full SA3 repo, a SAME repo, or a diffusers Stable Audio 3 pipeline folder; the diffusers names are mapped
back to the original ones, so both layouts give the same files (config.json then lists under ``notes`` what
diffusers does not record and had to be assumed).

The converted directory holds one safetensors file per component, already in mlx_sa3 module names and MLX layouts
(weight norm folded, conv kernels transposed, unused buffers and the T5Gemma decoder dropped), so loading it is a
plain memory read with no remapping. Conversion streams: source tensors are read lazily and each output tensor is
computed, written and released in turn, so peak memory stays near the size of the largest single tensor.

Output layout::

    OUT/config.json                     {"format": "mlx_sa3", "version": 1, "kind", "dtype", "model_config",
                                         "source", "components", "dropped", "loras" (with --lora)}
    OUT/dit.safetensors                 (SA3 only) DiT, in --dtype
    OUT/conditioners.safetensors        (SA3 only) prompt padding + seconds embedder, float32
    OUT/autoencoder.safetensors         SAME autoencoder, float32
    OUT/text_encoder/encoder.safetensors (SA3 only) T5Gemma encoder, in --dtype, next to its config and tokenizer

With ``--quantize 8|4 [--group-size 64]`` the DiT's fitting linear layers are stored MLX-affine quantized (packed
``weight`` + ``scales`` + ``biases``, see :mod:`mlx_sa3.quantize`) and config.json records it under ``"quantization"``
(bits, group_size, mode, layers); the loaders rebuild that structure before the strict check.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx

from .. import cli
from ..checkpoint import SA3Config, _parsed
from ..loading import (
    CONVERTED_FORMAT,
    CONVERTED_TEXT_ENCODER_DIR,
    DTYPES,
    PICKLE_SUFFIXES,
    SA3_PREFIXES,
    CheckpointError,
    Source,
    load_safetensors,
    open_source,
    parse_dtype,
    refuse_pickle,
    resolve_source,
    sanitize_checked,
)
from ..models import dit, same, t5gemma
from ..models.conditioners import Conditioners
from ..outputs import (
    OutputError,
    check_replaceable_conversion,
    os_error_message,
    probe_writable,
    remove_stale_temporaries,
    temp_name,
    write_conversion_marker,
)
from ..quantize import DEFAULT_GROUP_SIZE, QuantizationConfig, check_settings, quantizable_layers, quantize_weights
from .diffusers import (
    DIFFUSERS_WEIGHTS,
    DiffusersCheckpoint,
    dit_from_diffusers,
    is_diffusers,
    open_diffusers,
    same_from_diffusers,
    seconds_from_diffusers,
)
from .safetensors_io import load_folder_weights, read_safetensors_header, verify_safetensors, write_safetensors

FORMAT_VERSION = 1
COMPONENT_FILES = {
    "dit": "dit.safetensors",
    "autoencoder": "autoencoder.safetensors",
    "conditioners": "conditioners.safetensors",
    "text_encoder": f"{CONVERTED_TEXT_ENCODER_DIR}/encoder.safetensors",
}
WEIGHTS_FILE = "model.safetensors"
# Weight files of the T5Gemma folder; everything else there (config, tokenizer files) is copied as is.
_TEXT_ENCODER_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json") + PICKLE_SUFFIXES


# --------------------------------------------------------------------------------------------- conversion plan


@dataclass
class Component:
    """One output file: sanitized (still lazy) tensors in their output dtype, and the source tensors it dropped."""

    name: str
    tensors: dict[str, mx.array]
    dropped: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.tensors.values())

    def signature(self) -> dict[str, tuple[tuple, mx.Dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}


def _dropped_by(sanitize: Callable[[dict], dict], weights: dict[str, mx.array], kept: dict) -> list[str]:
    """Source names that ``sanitize`` discards.

    A source tensor whose name does not appear among the outputs was either renamed or dropped; sanitizing it alone
    (with its weight-norm partner) tells which: a dropped tensor yields nothing.
    """
    groups: dict[str, list[str]] = {}
    for key in weights:
        if key not in kept:
            groups.setdefault(re.sub(r"\.weight_[gv]$", ".weight", key), []).append(key)
    dropped = []
    for keys in groups.values():
        if not sanitize({k: weights[k] for k in keys}):
            dropped.extend(keys)
    return sorted(dropped)


_parse = _parsed


def plan_dit(
    weights: dict[str, mx.array], model_config: dict, dtype: mx.Dtype, prefix: str = SA3_PREFIXES["dit"]
) -> Component:
    config = _parse("DiT", lambda: dit.DiTConfig.from_model_config(model_config))
    out = sanitize_checked(weights, dit.sanitize, dit.DiT(config), "DiT checkpoint")
    dropped = [prefix + k for k in _dropped_by(dit.sanitize, weights, out)]
    return Component("dit", {k: v.astype(dtype) for k, v in out.items()}, dropped)


def plan_autoencoder(weights: dict[str, mx.array], model_config: dict, prefix: str) -> Component:
    config = _parse(
        "SAME autoencoder",
        lambda: same.SAMEConfig.from_dict(model_config["model"], sample_rate=model_config.get("sample_rate")),
    )
    out = sanitize_checked(weights, same.sanitize, same.SAMEAutoencoder(config), "SAME autoencoder checkpoint")
    dropped = [prefix + k for k in _dropped_by(same.sanitize, weights, out)]
    # The SAME decoder cancels badly in half precision, so the autoencoder is always stored in float32.
    return Component("autoencoder", {k: v.astype(mx.float32) for k, v in out.items()}, dropped)


def plan_conditioners(weights: dict[str, mx.array], model_config: dict) -> Component:
    config = _parse("conditioner", lambda: SA3Config.from_dict(model_config))
    conditioners = Conditioners(weights, config)  # strict name/shape check; keeps float32
    return Component("conditioners", dict(conditioners.tensors))


def plan_text_encoder(text_dir: Path, dtype: mx.Dtype, encoder_only: bool = False) -> Component:
    """The T5Gemma encoder of ``text_dir``; the decoder half of an encoder-decoder checkpoint is dropped.

    With ``encoder_only`` (the diffusers ``T5GemmaEncoderModel`` folder) there is nothing to drop, so any tensor
    outside the encoder is reported as unexpected.
    """
    config = _parse("T5Gemma", lambda: t5gemma.T5GemmaConfig.from_dir(text_dir))
    weights = load_folder_weights(text_dir, WEIGHTS_FILE)
    kept, dropped = t5gemma.sanitize(weights), t5gemma.dropped(weights)
    if encoder_only:
        kept |= {k: weights[k] for k in dropped}
        dropped = []
    sanitize_checked(kept, None, t5gemma.T5GemmaEncoder(config), "T5Gemma encoder checkpoint")
    dropped = [f"{text_dir.name}/{WEIGHTS_FILE}:{k}" for k in dropped]
    return Component("text_encoder", {k: v.astype(dtype) for k, v in kept.items()}, dropped)


def split_sa3(tensors: dict[str, mx.array]) -> dict[str, dict[str, mx.array]]:
    """Split a full SA3 ``model.safetensors`` by component prefix; a tensor under no known prefix is an error."""
    parts: dict[str, dict[str, mx.array]] = {name: {} for name in SA3_PREFIXES}
    stray = []
    for key, value in tensors.items():
        for name, prefix in SA3_PREFIXES.items():
            if key.startswith(prefix):
                parts[name][key[len(prefix) :]] = value
                break
        else:
            stray.append(key)
    if stray:
        raise CheckpointError(
            f"{WEIGHTS_FILE} has {len(stray)} tensors outside the DiT, autoencoder and "
            f"conditioners: {', '.join(sorted(stray))}"
        )
    return parts


def plan(source: Source, dtype: mx.Dtype) -> list[Component]:
    """Sanitize and strictly check every component of ``source``.

    Only headers (and the small RoPE buffers the sanitizers verify) are read here; the tensors stay lazy.
    """
    weights_path = source.root / WEIGHTS_FILE
    read_safetensors_header(weights_path)
    text_dir = source.text_encoder_dir() if source.layout == "sa3" else None
    return plan_components(load_safetensors(weights_path), source.model_config, text_dir, dtype)


def plan_components(
    tensors: dict[str, mx.array], model_config: dict, text_dir: Path | None, dtype: mx.Dtype
) -> list[Component]:
    """The components of a SAME checkpoint (``text_dir`` None) or a full SA3 checkpoint with its T5Gemma folder.

    The caller must keep no other reference to ``tensors``: then each source tensor is freed as soon as the
    output computed from it has been written.
    """
    if text_dir is None:
        return [plan_autoencoder(tensors, model_config, prefix="")]
    parts = split_sa3(tensors)
    tensors.clear()
    if not text_dir.is_dir():
        raise CheckpointError(f"{text_dir}: the T5Gemma folder is missing")
    return [
        plan_dit(parts.pop("dit"), model_config, dtype),
        plan_autoencoder(parts.pop("autoencoder"), model_config, prefix=SA3_PREFIXES["autoencoder"]),
        plan_conditioners(parts.pop("conditioners"), model_config),
        plan_text_encoder(text_dir, dtype),
    ]


def plan_diffusers(checkpoint: DiffusersCheckpoint, dtype: mx.Dtype) -> list[Component]:
    """Rename every diffusers component back to the original Hub names, then plan it like the original layout."""
    root, config = checkpoint.root, checkpoint.model_config
    differential = checkpoint.configs["transformer"]["use_differential_attention"]
    dit_weights, padding, dit_origin = dit_from_diffusers(
        load_folder_weights(root / "transformer", DIFFUSERS_WEIGHTS), differential
    )
    seconds, seconds_dropped = seconds_from_diffusers(
        load_folder_weights(root / "duration_embedder", DIFFUSERS_WEIGHTS)
    )
    same_weights, same_origin = same_from_diffusers(
        load_folder_weights(root / "vae", DIFFUSERS_WEIGHTS), checkpoint.configs["vae"]["use_differential_attention"]
    )

    dit_part = plan_dit(dit_weights, config, dtype, prefix="")
    dit_part.dropped = [f"transformer/{DIFFUSERS_WEIGHTS}:{dit_origin[k]}" for k in dit_part.dropped]
    autoencoder = plan_autoencoder(same_weights, config, prefix="")
    autoencoder.dropped = [f"vae/{DIFFUSERS_WEIGHTS}:{same_origin[k]}" for k in autoencoder.dropped]
    conditioners = plan_conditioners(padding | seconds, config)
    conditioners.dropped = [f"duration_embedder/{DIFFUSERS_WEIGHTS}:{k}" for k in seconds_dropped]
    return [dit_part, autoencoder, conditioners, plan_text_encoder(root / "text_encoder", dtype, encoder_only=True)]


# --------------------------------------------------------------------------------------------- conversion


def open_checkpoint(src) -> Source | DiffusersCheckpoint:
    """``open_source`` plus the diffusers layout and the refusals specific to conversion (pickle files, converted
    input)."""
    path = Path(src).expanduser()
    if path.is_file():
        refuse_pickle(path)
    root = resolve_source(src)
    if is_diffusers(root):
        return open_diffusers(root)
    source = open_source(root)
    if source.converted:
        raise CheckpointError(f"{source.root} is already an mlx_sa3 checkpoint; nothing to convert")
    return source


def plan_source(source: Source | DiffusersCheckpoint, dtype: mx.Dtype) -> list[Component]:
    return plan_diffusers(source, dtype) if source.layout == "diffusers" else plan(source, dtype)


def text_encoder_dirs(source: Source | DiffusersCheckpoint) -> list[Path]:
    """Folders whose config and tokenizer files make up the converted ``text_encoder/`` (none for SAME)."""
    if source.layout == "diffusers":
        return [source.root / "text_encoder", source.root / "tokenizer"]
    return [source.text_encoder_dir()] if source.layout == "sa3" else []


def source_revision(root: Path) -> str | None:
    """The commit hash of a Hugging Face cache snapshot (``.../snapshots/<hash>``), else None."""
    if root.parent.name == "snapshots" and re.fullmatch(r"[0-9a-f]{40}", root.name):
        return root.name
    return None


def _describe_source(src, root: Path) -> str:
    return str(root.resolve()) if Path(src).expanduser().exists() else str(src)


def _copy_text_encoder_files(text_dirs: list[Path], target: Path) -> list[str]:
    target.mkdir(parents=True, exist_ok=True)
    copied = []
    for text_dir in text_dirs:
        for item in sorted(text_dir.iterdir()):
            if item.is_file() and not item.name.endswith(_TEXT_ENCODER_WEIGHT_SUFFIXES):
                shutil.copyfile(item, target / item.name)
                copied.append(item.name)
    for required in ("config.json", t5gemma.TOKENIZER_FILE, t5gemma.TOKENIZER_CONFIG_FILE):
        if required not in copied:
            raise CheckpointError(f"{' + '.join(map(str, text_dirs))}: {required} is missing")
    return copied


def quantize_component(component: Component, model_config: dict, bits: int, group_size: int) -> QuantizationConfig:
    """Quantize the (still lazy) tensors of the DiT component in place; returns the record for config.json."""
    module = dit.DiT(_parse("DiT", lambda: dit.DiTConfig.from_model_config(model_config)))
    config = QuantizationConfig(bits, group_size, layers=quantizable_layers(module, group_size))
    component.tensors = quantize_weights(component.tensors, config)
    return config


def convert(
    src,
    out,
    dtype: str = "float32",
    force: bool = False,
    log: Callable[[str], None] | None = None,
    loras=None,
    quantize: int | None = None,
    group_size: int = DEFAULT_GROUP_SIZE,
) -> Path:
    """Convert ``src`` (Hub repo id or directory: full SA3 repo, SAME repo or diffusers Stable Audio 3 pipeline
    folder) into the mlx_sa3 layout at ``out``.

    ``dtype`` applies to the DiT and the T5Gemma encoder; the SAME autoencoder and the conditioners are always
    float32. ``out`` is written into a temporary directory beside it and renamed at the end, so a failure or an
    interruption leaves nothing behind; an existing ``out`` is replaced only with ``force``. Returns ``out``.

    ``loras``: ``[(path, strength), ...]`` (or bare paths, strength 1) merged into the DiT and the seconds
    conditioner in that order, exactly as loading them at run time would (see docs/LORA.md); config.json then
    lists them under ``loras``.

    ``quantize`` (8 or 4 bits, groups of ``group_size`` input columns) stores the DiT's linear layers quantized.
    """
    log = log or (lambda message: None)
    if quantize is not None:
        check_settings(int(quantize), int(group_size))
    out = Path(out).expanduser().absolute()
    target_dtype = parse_dtype(dtype or "float32")
    dtype_name = next(name for name, value in DTYPES.items() if value == target_dtype)
    check_replaceable_conversion(out, force)  # never replace anything but an earlier conversion, checked first
    loras = _checked_loras(loras)
    source = open_checkpoint(src)
    if loras and source.layout == "same":
        raise CheckpointError(f"{source.root} is a SAME autoencoder; LoRAs apply to a full SA3 checkpoint")
    if out.resolve() == source.root.resolve() or source.root.resolve() in out.resolve().parents:
        raise CheckpointError(f"{out} is inside the source checkpoint {source.root}; choose another output")
    kind = "same" if source.layout == "same" else "sa3"
    if quantize is not None and kind == "same":
        raise CheckpointError(f"{source.root} is a SAME autoencoder: --quantize applies to a Stable Audio 3 DiT only")
    _prepare_parent(out.parent)  # before the source is read, merged or quantized: that can take minutes
    described = {"same": "SAME autoencoder", "sa3": "Stable Audio 3", "diffusers": "diffusers Stable Audio 3"}
    log(f"source: {source.root} ({described[source.layout]} checkpoint)")

    components = plan_source(source, target_dtype)
    lora_record = _merge_loras(components, loras, source, log) if loras else []
    quantization = None
    if quantize is not None:
        dit_part = next(c for c in components if c.name == "dit")
        quantization = quantize_component(dit_part, source.model_config, int(quantize), int(group_size))
        log(
            f"quantizing {len(quantization.layers)} DiT linear layers to int{quantization.bits} "
            f"(groups of {quantization.group_size})"
        )
    dropped = [name for c in components for name in c.dropped]
    _log_dropped(log, dropped)
    notes = source.notes if source.layout == "diffusers" else []
    for note in notes:
        log(f"note: {note}")

    remove_stale_temporaries(out.parent)  # directories of conversions that died hard (their pid is gone)
    tmp = _make_temp_dir(out.parent, "converting")  # short name: a 255-byte ``out`` name still works
    try:
        if kind == "sa3":
            _copy_text_encoder_files(text_encoder_dirs(source), tmp / CONVERTED_TEXT_ENCODER_DIR)
        if source.layout == "diffusers":
            tokenizer_config = tmp / CONVERTED_TEXT_ENCODER_DIR / t5gemma.TOKENIZER_CONFIG_FILE
            tokenizer_config.write_text(json.dumps(source.configs["tokenizer"], indent=2) + "\n")
        for component in components:
            _write_component(tmp, component, log)
        meta = {
            "format": CONVERTED_FORMAT,
            "version": FORMAT_VERSION,
            "kind": kind,
            "dtype": dtype_name if kind == "sa3" else "float32",
            "model_config": source.model_config,
            "source": {"src": _describe_source(src, source.root), "revision": source_revision(source.root)},
            "components": {c.name: COMPONENT_FILES[c.name] for c in components},
            "dropped": dropped,
        }
        if lora_record:  # which LoRAs are baked into dit/conditioners, in order
            meta["loras"] = lora_record
        if quantization is not None:
            meta["quantization"] = quantization.to_dict()
        if notes:  # what the source layout did not record, and was assumed
            meta["notes"] = notes
        (tmp / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
        write_conversion_marker(tmp, {"format": CONVERTED_FORMAT, "version": FORMAT_VERSION})
        _replace(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log(f"wrote {out}")
    return out


def _checked_loras(loras) -> list[tuple[Path, float]]:
    """``[(path, strength) | path, ...]`` with every file checked (exists, readable, safetensors, not a pickle)."""
    from ..lora import check_lora_file

    entries = [(entry, 1.0) if isinstance(entry, (str, os.PathLike)) else entry for entry in loras or ()]
    checked = [(check_lora_file(path), float(strength)) for path, strength in entries]
    for path, _ in checked:
        read_safetensors_header(path)
    return checked


def _merge_loras(components: list[Component], loras, source, log: Callable[[str], None]) -> list[dict]:
    """Bake ``loras`` into the planned DiT and conditioner tensors (kept in their output dtypes); the record."""
    from .. import lora

    parts = {c.name: c for c in components}
    dit_part, conditioners = parts["dit"], parts["conditioners"]
    bases_name = source.model_config.get("svd_bases_path")

    def svd_bases():  # the source's bases file, read only for an -xs LoRA (as at run time)
        return lora.load_svd_bases(source.root / bases_name) if bases_name else None

    dit_part.tensors, conditioners.tensors, record = lora.merge_loras(
        dit_part.tensors, conditioners.tensors, loras, svd_bases
    )
    for entry in record:
        log(
            f"merged LoRA {entry['file']} ({entry['adapter_type']}, rank {entry['rank']}, alpha {entry['alpha']:g}) "
            f"at strength {entry['strength']:g}"
        )
    return record


def _write_component(root: Path, component: Component, log: Callable[[str], None]) -> None:
    path = root / COMPONENT_FILES[component.name]
    path.parent.mkdir(parents=True, exist_ok=True)
    signature = component.signature()
    count, nbytes = len(component.tensors), component.nbytes
    start = time.perf_counter()
    write_safetensors(path, component.tensors, metadata={"format": CONVERTED_FORMAT})
    verify_safetensors(path, signature)
    log(
        f"  {COMPONENT_FILES[component.name]:<36} {count:5d} tensors {nbytes / 1e6:10.1f} MB "
        f"({time.perf_counter() - start:.1f} s)"
    )


def _prepare_parent(parent: Path) -> None:
    """Create OUT's folder (as mkdir -p) and prove it writable, or raise one line naming it."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(os_error_message(err, parent, "cannot create the output folder")) from None
    probe_writable(parent)


def _make_temp_dir(parent: Path, kind: str) -> Path:
    """A new hidden directory ``.sa3-<pid>-<hex>.<kind>`` with the permissions a plain mkdir gives (the umask's)."""
    for _ in range(16):
        path = parent / temp_name(kind)
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise OutputError(f"cannot create a temporary directory in {parent}")


def _replace(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished temporary directory to ``out``; with ``force`` the old ``out`` is removed only afterwards.

    ``out`` is checked again right before the move: whatever appeared there meanwhile must still be an earlier
    conversion (its marker) for ``force`` to replace it.
    """
    if check_replaceable_conversion(out, force) is None:
        try:
            os.rename(tmp, out)  # fails if a file or a non-empty directory appeared meanwhile
        except OSError:
            if os.path.lexists(out):
                raise FileExistsError(f"{out} appeared during the conversion; not replacing it") from None
            raise
        return
    old = _make_temp_dir(out.parent, "old")
    os.rename(out, old / out.name)
    os.rename(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _log_dropped(log: Callable[[str], None], dropped: list[str]) -> None:
    """List the dropped tensors, with repeated per-layer names collapsed (``layers.*``) to keep the list readable."""
    if not dropped:
        log("dropped: nothing")
        return
    patterns: dict[str, int] = {}
    for name in dropped:
        pattern = re.sub(r"\.\d+\.", ".*.", name)
        patterns[pattern] = patterns.get(pattern, 0) + 1
    log(f"dropped {len(dropped)} source tensors (not used by the model; listed in config.json):")
    for pattern, count in patterns.items():
        log(f"  {pattern}" + (f"  (x{count})" if count > 1 else ""))


# --------------------------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    parser = cli.ArgumentParser(
        prog="python -m mlx_sa3.convert",
        description="Convert a Stable Audio 3 or SAME checkpoint (Hub repo id or local directory) once into "
        "mlx_sa3's own layout, which loads without any remapping.",
    )
    parser.add_argument(
        "src",
        help="Hub repo id (e.g. stabilityai/stable-audio-3-medium) or local directory: "
        "a full SA3 repo, a SAME repo or a diffusers "
        "StableAudio3Pipeline folder (model_index.json)",
    )
    parser.add_argument("out", help="output directory (must not exist unless --force)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=list(DTYPES),
        help="storage dtype of the DiT and the T5Gemma text encoder (default float32); the SAME "
        "autoencoder and the conditioners are always stored in float32, because the SAME "
        "decoder must run in float32",
    )
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="merge a LoRA .safetensors into the DiT and the seconds conditioner (strength default 1); repeatable, "
        "applied in order; config.json records file, sha256, type, rank, alpha and strength (see docs/LORA.md)",
    )
    parser.add_argument(
        "--quantize",
        type=int,
        metavar="BITS",
        help="store the DiT's linear layers MLX-affine quantized to 8 or 4 bits (SAME and the conditioners never are; "
        "on the CPU they are dequantized to float32 at load time, GPUs run them quantized)",
    )
    parser.add_argument(
        "--group-size",
        type=int,
        help=f"quantization group (32, 64 or 128; default {DEFAULT_GROUP_SIZE}); only with --quantize",
    )
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.group_size is not None and args.quantize is None:
        parser.error("--group-size applies only with --quantize")  # a group size alone would silently do nothing
    start = time.perf_counter()
    try:
        from ..lora import parse_lora_spec

        loras = [parse_lora_spec(spec) for spec in args.lora]
        out = convert(
            args.src,
            args.out,
            dtype=args.dtype,
            force=args.force,
            log=print,
            loras=loras,
            quantize=args.quantize,
            group_size=DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size,
        )
    except KeyboardInterrupt:
        print("interrupted: nothing was written", file=sys.stderr)
        return 130
    except (CheckpointError, ValueError, OSError) as err:  # user errors: bad input, missing files, no access
        return cli.fail(str(err))
    print(f"done in {time.perf_counter() - start:.1f} s: load it with mlx_sa3 from {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
