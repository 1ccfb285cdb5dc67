"""LoRA adapters on the SA3 DiT and duration conditioner, with the official ``stable_audio_3.models.lora`` semantics.

Files are the official training exports (``save_lora_safetensors``: fp16 tensors, header metadata
``{"lora_config": json}``, keys ``model.<DiT module>.parametrizations.weight.0.<param>`` and
``conditioners.seconds_total.embedder.embedding.1.parametrizations.weight.0.<param>``), the legacy ``"dora"`` type,
and PEFT exports (``base_model.model.<module>.lora_A.weight``) of plain LoRAs. Every tensor must land on a weight of
the loaded checkpoint with the right shape and rank; anything else is a :class:`~mlx_sa3.loading.CheckpointError`
naming the file and the tensor (the official loader uses ``strict=False`` and silently drops such tensors).

Effective weight of a layer for one adapter at strength ``s``, with ``c = s * alpha / rank`` and the weight ``W`` in
the official 2-D layout (out, in * k), as ``LoRAParametrization`` computes it:

* ``lora``: ``W + c B A``; ``lora-xs``: ``W + c U M V^T`` (U, V: top-``rank`` singular vectors of the *base* weight,
  sign-canonicalised so that the largest-magnitude entry of each U column is positive, or read from a bases file);
* ``dora-rows`` / ``dora-cols`` (and ``-xs``): ``V = W + c delta``, then ``V / (||V|| + 1e-12) * magnitude`` with the
  norm over the input (rows) or output (cols) axis; ``bora`` (and ``-xs``): row-normalise times ``magnitude_r``, then
  column-normalise times ``magnitude_c``. DoRA/BoRA skip the adapter at ``s = 0`` (the official rule); for the
  additive types ``s = 0`` is the identity anyway.

Several LoRAs compose in load order (the official parametrization chain): adapter ``i + 1`` acts on the output of
adapter ``i``; every ``-xs`` basis comes from the original weight. At run time a LoRA can be restricted to a sigma
interval (active only while the sampler's sigma lies inside it) and have DiT layers switched off by a layer filter
(comma-separated substrings of the official module names, ``[a-b]`` ranges expanded), both as in the official
``DiffusionTransformer.forward``; neither touches the conditioner, as there.

Representation: merged weights. :meth:`LoraStack.effective` recomputes the adapted tensors from the kept base
tensors whenever the strengths or the active set change; a sampling step then costs exactly what it costs without
a LoRA (measured in ``benchmarks/bench_lora.py``). Computation is float32, cast once to the base dtype at the end
(the official chain casts back after every adapter, which only differs for half-precision bases).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import mlx.core as mx
import numpy as np

from .loading import PICKLE_SUFFIXES, CheckpointError, read_json
from .models.dit import sanitize
from .options import real_number, whole_number
from .outputs import MISSING, not_a_file

DIT = "dit"
CONDITIONERS = "conditioners"

# Trained tensors per adapter type (official utils._get_adapter_param_names).
ADAPTER_PARAMS = {
    "lora": ("lora_A", "lora_B"),
    "dora-rows": ("lora_A", "lora_B", "magnitude"),
    "dora-cols": ("lora_A", "lora_B", "magnitude"),
    "bora": ("lora_A", "lora_B", "magnitude_r", "magnitude_c"),
    "lora-xs": ("M_xs",),
    "dora-rows-xs": ("M_xs", "magnitude"),
    "dora-cols-xs": ("M_xs", "magnitude"),
    "bora-xs": ("M_xs", "magnitude_r", "magnitude_c"),
}
ADAPTER_TYPES = tuple(ADAPTER_PARAMS)
_NORM_EPS = 1e-12
_SA3_KEY = re.compile(
    r"^(?P<module>.+)\.parametrizations\.weight\.(?P<index>\d+)\.(?P<param>lora_A|lora_B|M_xs|magnitude|magnitude_r"
    r"|magnitude_c)$"
)
_PEFT_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.(?P<param>lora_A|lora_B)\.weight$")
# Where a module path of each layout may start, and the model part it then names. SA3 files are relative to the
# DiT wrapper / MultiConditioner; PEFT files may be rooted at any level, and a path must resolve under one root only.
_SA3_ROOTS = (("model.", DIT), ("conditioners.", CONDITIONERS))
_PEFT_ROOTS = (("model.model.", DIT), ("conditioner.conditioners.", CONDITIONERS), *_SA3_ROOTS, ("", DIT))
# Official full-checkpoint prefixes (``model.safetensors`` and the official SVD bases file).
_FULL_PREFIX = {DIT: "model.model.", CONDITIONERS: "conditioner.conditioners."}
_ANY_SHAPE = mx.zeros((0, 0, 0))  # stands for a value when only sanitize's renames are wanted


# ----------------------------------------------------------------------------------------------------- data


@dataclass
class LoraLayer:
    """One adapted weight: where it lives, its official names and its float32 tensors."""

    target: str  # DIT or CONDITIONERS
    name: str  # mlx_sa3 parameter name (DiT) or Conditioners.tensors name
    module: str  # official module path relative to the DiffusionTransformer / MultiConditioner (layer filter)
    params: dict  # param name -> float32 mx.array (magnitudes 1-D)
    bases: tuple | None = None  # (U (out, r), V (in, r)) for the -xs types

    @property
    def key(self) -> str:
        """The adapted weight's name in the official full checkpoint."""
        return f"{_FULL_PREFIX[self.target]}{self.module}.weight"


@dataclass
class LoraAdapter:
    """One loaded LoRA file and its runtime controls."""

    path: Path
    adapter_type: str
    rank: int
    alpha: float
    config: dict
    layers: dict  # (target, name) -> LoraLayer
    sha256: str = ""
    strength: float = 1.0
    interval: tuple | None = None  # (lo, hi): active only while lo <= sigma <= hi
    layer_filter: str = ""  # DiT layers whose official name matches are left unadapted

    @property
    def name(self) -> str:
        return self.path.stem

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def interval_active(self, sigma: float | None) -> bool:
        return sigma is None or self.interval is None or self.interval[0] <= sigma <= self.interval[1]

    def acts_on(self, layer: LoraLayer, sigma: float | None) -> bool:
        if self.strength == 0:
            return False  # official: DoRA/BoRA skip the adapter; for lora/lora-xs W + 0 is W
        if layer.target != DIT:
            return True  # interval and filter gate the DiT only (official DiffusionTransformer.forward)
        return self.interval_active(sigma) and not _matches_filter(layer.module, self.layer_filter)

    def describe(self, index: int) -> dict:
        return {
            "index": index,
            "name": self.name,
            "path": str(self.path),
            "adapter_type": self.adapter_type,
            "rank": self.rank,
            "alpha": self.alpha,
            "strength": self.strength,
            "interval": self.interval,
            "layer_filter": self.layer_filter,
            "layers": len(self.layers),
        }


# ------------------------------------------------------------------------------------------------ filters


def expand_pattern(pattern: str) -> list[str]:
    """Official bracket expansion: ``"layers.[0-2]."`` -> ``["layers.0.", "layers.1.", "layers.2."]``."""
    parts = re.split(r"\[(\d+)-(\d+)\]", pattern)
    if len(parts) == 1:
        return [pattern]
    literals, pools = parts[0::3], []
    for a, b in zip(parts[1::3], parts[2::3]):
        lo, hi = int(a), int(b)
        step = 1 if hi >= lo else -1
        pools.append([str(n) for n in range(lo, hi + step, step)])
    return ["".join(lit + num for lit, num in zip(literals, (*combo, ""))) for combo in product(*pools)]


def _matches_filter(module: str, layer_filter: str) -> bool:
    """Official filter_lora_layers: comma-separated, lower-cased substrings (OR), with bracket expansion."""
    patterns = [p.lower().strip() for p in (layer_filter or "").strip().split(",") if len(p)]
    return any(expanded in module for p in patterns for expanded in expand_pattern(p))


# ------------------------------------------------------------------------------------------------ reading


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle LoRA checkpoints are refused (loading one can run arbitrary code); convert it once "
            "with the official stable_audio_3.models.lora.convert_lora_ckpt_to_safetensors and load the .safetensors"
        )


def read_lora_file(path) -> tuple[dict, dict, str]:
    """Tensors (as stored), the ``lora_config`` dict (PEFT: from ``adapter_config.json`` beside it) and the sha256."""
    path = check_lora_file(path)
    try:
        tensors, metadata = mx.load(str(path), format="safetensors", return_metadata=True)
        mx.eval(list(tensors.values()))
    except Exception as err:  # MLX raises RuntimeError/ValueError for truncated or corrupt files, naming the tensor
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    config = {}
    if metadata and "lora_config" in metadata:
        try:
            config = json.loads(metadata["lora_config"])
        except json.JSONDecodeError as err:
            raise CheckpointError(f"{path}: header metadata lora_config is not valid JSON ({err})") from None
        if not isinstance(config, dict):
            raise CheckpointError(f"{path}: header metadata lora_config is not a JSON object")
    peft_config = path.parent / "adapter_config.json"
    if not config and peft_config.is_file() and any(k.startswith("base_model.model.") for k in tensors):
        config = _from_peft_config(read_json(peft_config), peft_config)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return tensors, config, digest


_PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch.save zip archives, raw pickles (protocol 2+)


def check_lora_file(path) -> Path:
    """Cheap checks before any model loads: the file exists, is readable and is not a pickle (the command lines
    also validate its safetensors header). The strict per-tensor checks come when it is loaded."""
    path = Path(path).expanduser()
    _refuse_pickle(path)
    problem = not_a_file(path)
    if problem == MISSING:
        raise CheckpointError(f"{path}: no such LoRA file")
    if problem is not None:
        raise CheckpointError(f"{path} is {problem}, not a LoRA file")
    _refuse_pickle_content(path)
    return path


def _refuse_pickle_content(path: Path) -> None:
    """A pickle under a safetensors name: say so (and never unpickle it) instead of reporting a corrupt header."""
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the LoRA file ({err.strerror})") from None
    if magic.startswith(_PICKLE_MAGIC):
        raise CheckpointError(f"{path}: a pickle (torch.save) file, refused (loading one can run arbitrary code)")


def parse_lora_spec(spec: str) -> tuple[str, float]:
    """``PATH[:STRENGTH]`` -> (path, strength). Paths may hold ':'; only a last ':' followed by a number splits."""
    head, sep, tail = spec.rpartition(":")
    if sep and head:
        try:
            strength = float(tail)
        except ValueError:
            if not Path(spec).exists() and Path(head).exists():
                # a typo in the strength, not a missing file: "no such LoRA file" would name the wrong mistake
                raise ValueError(f"--lora {spec}: strength {tail!r} is not a number (PATH:STRENGTH)") from None
            return spec, 1.0
        if not math.isfinite(strength):
            raise ValueError(f"--lora {spec}: strength {tail} is not a finite number")
        return head, strength
    return spec, 1.0


def _from_peft_config(peft: dict, where: Path) -> dict:
    if peft.get("use_dora") or peft.get("rank_pattern") or peft.get("alpha_pattern"):
        raise CheckpointError(f"{where}: only plain PEFT LoRAs with one rank and alpha are supported")
    config = {"adapter_type": "lora"}
    if "r" in peft:
        config["rank"] = peft["r"]
    if "lora_alpha" in peft:
        config["alpha"] = peft["lora_alpha"]
    return config


def _group_by_module(path: Path, tensors: Mapping) -> tuple[dict, bool]:
    """{module path: {param: (file key, tensor)}} and whether the file is in the PEFT layout."""
    groups, layouts = {}, set()
    for key in sorted(tensors):
        match = _SA3_KEY.match(key)
        if match and match["index"] != "0":
            raise CheckpointError(
                f"{path}: tensor {key}: parametrization index {match['index']}, LoRA files hold one adapter at index 0"
            )
        match = match or _PEFT_KEY.match(key)
        if match is None:
            raise CheckpointError(
                f"{path}: tensor {key} is not a LoRA tensor (expected <module>.parametrizations."
                "weight.0.<lora_A|lora_B|M_xs|magnitude|magnitude_r|magnitude_c> or PEFT "
                "base_model.model.<module>.lora_A.weight)"
            )
        peft = match.re is _PEFT_KEY
        layouts.add(peft)
        value = tensors[key]
        if peft and value.ndim == 3:  # PEFT Conv1d adapters: A (r, in, k), B (out, r, 1) -> official 2-D
            value = value.reshape(value.shape[0], -1)
        groups.setdefault(match["module"], {})[match["param"]] = (key, value)
    if len(layouts) > 1:
        raise CheckpointError(f"{path}: mixes the SA3 and the PEFT key layouts")
    if not groups:
        raise CheckpointError(f"{path}: holds no LoRA tensors")
    return groups, layouts == {True}


def _dit_name(module: str) -> str:
    """Official DiffusionTransformer module path -> mlx_sa3 parameter name of its weight (sanitize's renames)."""
    (name,) = sanitize({f"{module}.weight": _ANY_SHAPE})
    return name


def _resolve(module: str, roots, shapes: Mapping[str, Mapping]) -> list[tuple[str, str, str]]:
    """Every (target, mlx_sa3 name, official module) that ``module`` names under one of ``roots``."""
    found = []
    for prefix, target in roots:
        if not module.startswith(prefix):
            continue
        rel = module[len(prefix) :]
        name = _dit_name(rel) if target == DIT else f"{rel}.weight"
        shape = shapes[target].get(name)
        if shape is not None and len(shape) in (2, 3):  # a Linear or Conv1d weight, not a norm gain
            found.append((target, name, rel))
    return list(dict.fromkeys(found))


def _fans(shape) -> tuple[int, int]:
    """(fan_out, fan_in) of a Linear (out, in) or MLX Conv1d (out, k, in) weight, as the official (out, in * k)."""
    return shape[0], int(np.prod(shape[1:]))


def _resolve_adapter_type(path: Path, config: dict, groups: dict) -> str:
    adapter_type = config.get("adapter_type", "lora")
    if adapter_type == "dora":  # legacy: rows/cols from the first 2-D magnitude (official detect_dora_variant)
        adapter_type = "dora-rows"
        for module in sorted(groups):
            if "magnitude" in groups[module]:
                shape = groups[module]["magnitude"][1].shape
                if len(shape) == 2 and shape[0] == 1:
                    adapter_type = "dora-cols"
                break
    if adapter_type not in ADAPTER_PARAMS:
        raise CheckpointError(f"{path}: unknown adapter_type {adapter_type!r}; known: {', '.join(ADAPTER_TYPES)}")
    return adapter_type


def _infer_rank(groups: dict) -> int:
    """Official infer_global_rank: the first lora_A rows / lora_B columns / M_xs size in key order."""
    for module in sorted(groups):
        for param, (_, value) in sorted(groups[module].items()):
            if param == "lora_A" or param == "M_xs":
                return value.shape[0]
            if param == "lora_B":
                return value.shape[1]
    raise CheckpointError("no lora_A / lora_B / M_xs tensor to infer the rank from")


def _expected_shapes(adapter_type: str, rank: int, fan_out: int, fan_in: int) -> dict:
    rows = (fan_out,)
    cols = (fan_in,)
    magnitude = cols if adapter_type.startswith("dora-cols") else rows
    shapes = {
        "lora_A": (rank, fan_in),
        "lora_B": (fan_out, rank),
        "M_xs": (rank, rank),
        "magnitude": magnitude,
        "magnitude_r": rows,
        "magnitude_c": cols,
    }
    return {p: shapes[p] for p in ADAPTER_PARAMS[adapter_type]}


def load_lora(
    path, shapes: Mapping[str, Mapping[str, tuple]], base: Mapping[str, Mapping] | None = None, svd_bases=None
) -> LoraAdapter:
    """Read and strictly check one LoRA file against a model.

    ``shapes`` (and ``base``, needed for the ``-xs`` types) are ``{DIT: {name: ...}, CONDITIONERS: {name: ...}}``
    with mlx_sa3 parameter names and MLX layouts. ``svd_bases`` are optional precomputed bases (see
    :func:`load_svd_bases`), or a function returning them that is only called for an ``-xs`` file; layers without
    one get the SVD of their base weight, as officially.
    """
    path = Path(path)
    tensors, config, digest = read_lora_file(path)
    groups, peft = _group_by_module(path, tensors)
    adapter_type = _resolve_adapter_type(path, config, groups)
    if callable(svd_bases):
        svd_bases = svd_bases() if adapter_type.endswith("-xs") else None
    try:
        rank = whole_number(config["rank"], "lora_config rank") if "rank" in config else _infer_rank(groups)
        alpha = real_number(config.get("alpha", rank), "lora_config alpha")
        if not math.isfinite(alpha):
            raise ValueError(f"lora_config alpha must be finite, got {alpha}")
    except (TypeError, ValueError, CheckpointError) as err:
        raise CheckpointError(f"{path}: {err}") from None
    if rank <= 0:
        raise CheckpointError(f"{path}: rank {rank} in lora_config")
    roots = _PEFT_ROOTS if peft else _SA3_ROOTS
    layers = {}
    for module, params in groups.items():
        first_key = next(iter(params.values()))[0]
        found = _resolve(module, roots, shapes)
        if not found:
            raise CheckpointError(f"{path}: tensor {first_key}: no Linear/Conv1d weight {module} in this checkpoint")
        if len(found) > 1:
            names = ", ".join(f"{t}:{n}" for t, n, _ in found)
            raise CheckpointError(f"{path}: tensor {first_key}: module {module} is ambiguous ({names})")
        target, name, rel = found[0]
        layer = _check_layer(path, adapter_type, rank, params, target, name, rel, shapes[target][name])
        if adapter_type.endswith("-xs"):
            if base is None:
                raise ValueError("base weights are needed for the -xs adapter types")
            layer.bases = _layer_bases(path, layer, base[target][name], rank, svd_bases)
        layers[(target, name)] = layer
    return LoraAdapter(path, adapter_type, rank, alpha, config, layers, digest)


def _check_layer(
    path: Path, adapter_type: str, rank: int, params: dict, target: str, name: str, module: str, shape
) -> LoraLayer:
    fan_out, fan_in = _fans(shape)
    expected = _expected_shapes(adapter_type, rank, fan_out, fan_in)
    where = f"{_FULL_PREFIX[target]}{module}.weight {tuple(shape)}"
    for param, (key, _) in params.items():
        if param not in expected:
            raise CheckpointError(f"{path}: tensor {key}: a {adapter_type} adapter has no {param}")
    missing = [p for p in expected if p not in params]
    if missing:
        raise CheckpointError(f"{path}: layer {module}: {adapter_type} tensors missing: {', '.join(missing)}")
    if adapter_type.endswith("-xs") and rank > min(fan_out, fan_in):
        raise CheckpointError(
            f"{path}: layer {module}: rank {rank} exceeds the weight's {min(fan_out, fan_in)} singular vectors"
        )
    values = {}
    for param, (key, value) in params.items():
        if param == "magnitude" and value.ndim == 2 and 1 in value.shape:
            value = value.reshape(-1)  # legacy 2-D magnitudes (official prepare_dora_state_dict squeezes them)
        if tuple(value.shape) != expected[param]:
            raise CheckpointError(
                f"{path}: tensor {key} has shape {tuple(params[param][1].shape)}, expected "
                f"{expected[param]} (rank {rank}, {adapter_type} on {where})"
            )
        values[param] = value.astype(mx.float32)
    return LoraLayer(target, name, module, values)


# ------------------------------------------------------------------------------------------------ SVD bases


def load_svd_bases(path) -> dict[str, mx.array]:
    """Precomputed ``-xs`` bases: a safetensors file with ``<official weight key>.U`` (out, >= r) and ``.V``
    (in, >= r), the official ``svd_bases.pt`` content (keys ``model.model.<module>.weight``) without pickle."""
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle SVD bases are refused (loading one can run arbitrary code); store "
            "them as safetensors with keys <weight key>.U and <weight key>.V"
        )
    try:
        return dict(mx.load(str(path), format="safetensors"))
    except Exception as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


def canonical_svd(w2d) -> tuple[np.ndarray, np.ndarray]:
    """Thin SVD (float32) with the official sign rule: the largest-|.| entry of each U column is positive, and the
    matching Vh row takes the same sign. Returns (U (out, k), Vh (k, in))."""
    u, _, vh = np.linalg.svd(np.asarray(w2d, dtype=np.float32), full_matrices=False)
    signs = np.sign(u[np.argmax(np.abs(u), axis=0), np.arange(u.shape[1])])
    signs[signs == 0] = 1
    return u * signs[None, :], vh * signs[:, None]


def _layer_bases(path: Path, layer: LoraLayer, base_weight, rank: int, svd_bases) -> tuple[mx.array, mx.array]:
    fan_out, fan_in = _fans(base_weight.shape)
    if svd_bases is not None and f"{layer.key}.U" in svd_bases:
        u, v = svd_bases[f"{layer.key}.U"], svd_bases.get(f"{layer.key}.V")
        if (
            v is None
            or u.ndim != 2
            or v.ndim != 2
            or u.shape[0] != fan_out
            or v.shape[0] != fan_in
            or min(u.shape[1], v.shape[1]) < rank
        ):
            raise CheckpointError(f"{path}: SVD bases of {layer.key} do not fit ({fan_out}, {fan_in}) at rank {rank}")
        return u[:, :rank].astype(mx.float32), v[:, :rank].astype(mx.float32)
    u, vh = canonical_svd(np.array(to_official_2d(base_weight)))
    return mx.array(np.ascontiguousarray(u[:, :rank])), mx.array(np.ascontiguousarray(vh[:rank].T))


# ------------------------------------------------------------------------------------------------ formulas


def to_official_2d(w: mx.array) -> mx.array:
    """float32 (out, in * k) as the official parametrization sees it; MLX Conv1d weights are (out, k, in)."""
    w = w.astype(mx.float32)
    if w.ndim == 3:
        w = w.transpose(0, 2, 1)
    return w.reshape(w.shape[0], -1)


def from_official_2d(w2d: mx.array, like: mx.array) -> mx.array:
    if like.ndim == 3:
        out, k, cin = like.shape
        w2d = w2d.reshape(out, cin, k).transpose(0, 2, 1)
    return w2d.astype(like.dtype)


def _normalise(v: mx.array, axis: int) -> mx.array:
    return v / (mx.linalg.norm(v, axis=axis, keepdims=True) + _NORM_EPS)


def adapt(w2d: mx.array, layer: LoraLayer, adapter_type: str, coefficient: float) -> mx.array:
    """One official parametrization on the 2-D float32 weight; ``coefficient`` = strength * alpha / rank."""
    p = layer.params
    if adapter_type.endswith("-xs"):
        u, v = layer.bases
        delta = u @ p["M_xs"] @ v.T
    else:
        delta = p["lora_B"] @ p["lora_A"]
    v = w2d + coefficient * delta
    kind = adapter_type.removesuffix("-xs")
    if kind == "lora":
        return v
    if kind == "dora-rows":
        return _normalise(v, 1) * p["magnitude"][:, None]
    if kind == "dora-cols":
        return _normalise(v, 0) * p["magnitude"][None, :]
    rows = p["magnitude_r"][:, None] * _normalise(v, 1)  # bora
    return _normalise(rows, 0) * p["magnitude_c"][None, :]


# ------------------------------------------------------------------------------------------------ stack


@dataclass
class LoraStack:
    """Loaded LoRAs in order (``lora_index`` = position) and the base value of every tensor any of them adapts."""

    adapters: list = field(default_factory=list)
    base: dict = field(default_factory=dict)  # (target, name) -> original mx.array
    applied: tuple | None = None  # state_key of the weights last handed to the model

    def add(self, adapter: LoraAdapter, base: Mapping[str, Mapping]) -> int:
        for target, name in adapter.layers:
            self.base.setdefault((target, name), base[target][name])
        self.adapters.append(adapter)
        return len(self.adapters) - 1

    def select(self, lora_index: int | None) -> list[LoraAdapter]:
        if lora_index is None:
            return list(self.adapters)
        lora_index = whole_number(lora_index, "lora_index")
        if not 0 <= lora_index < len(self.adapters):
            raise IndexError(f"lora_index {lora_index} out of range: {len(self.adapters)} LoRA(s) loaded")
        return [self.adapters[lora_index]]

    def set_strength(self, strength: float, lora_index: int | None = None) -> None:
        strength = _checked_strength(strength)
        for adapter in self.select(lora_index):
            adapter.strength = strength

    def set_interval(self, interval, lora_index: int | None = None) -> None:
        interval = _checked_interval(interval)
        for adapter in self.select(lora_index):
            adapter.interval = interval

    def set_layer_filter(self, layer_filter: str, lora_index: int | None = None) -> None:
        if layer_filter is not None and not isinstance(layer_filter, str):
            raise ValueError(f"layer_filter must be a string of module names, got {layer_filter!r}")
        for adapter in self.select(lora_index):
            adapter.layer_filter = layer_filter or ""

    def remove(self, lora_index: int | None = None) -> dict:
        """Drop one LoRA (or all); returns the base tensors no remaining LoRA adapts, for the caller to restore."""
        removed = self.select(lora_index)
        self.adapters = [a for a in self.adapters if all(a is not r for r in removed)]
        still = {key for a in self.adapters for key in a.layers}
        freed = {key: value for key, value in self.base.items() if key not in still}
        self.base = {key: value for key, value in self.base.items() if key in still}
        self.applied = None
        return _by_target(freed)

    @property
    def has_intervals(self) -> bool:
        return any(a.interval is not None for a in self.adapters)

    def state_key(self, sigma: float | None) -> tuple:
        """What the effective weights depend on at ``sigma``: equal keys give equal weights."""
        return tuple((id(a), a.strength, a.layer_filter, a.interval_active(sigma)) for a in self.adapters)

    def effective(self, sigma: float | None = None) -> dict:
        """``{DIT: {name: weight}, CONDITIONERS: {name: weight}}`` for every adapted tensor at ``sigma``.

        ``sigma=None`` ignores the intervals (every LoRA active). Tensors no active adapter touches come back as
        their base arrays, so handing the result to the model also restores what an earlier state changed.
        """
        out = {}
        for (target, name), w0 in self.base.items():
            w = None
            for adapter in self.adapters:
                layer = adapter.layers.get((target, name))
                if layer is not None and adapter.acts_on(layer, sigma):
                    w = adapt(
                        to_official_2d(w0) if w is None else w,
                        layer,
                        adapter.adapter_type,
                        adapter.strength * adapter.scaling,
                    )
            out[(target, name)] = w0 if w is None else from_official_2d(w, w0)
        return _by_target(out)

    def record(self) -> list[dict]:
        """What went in, for a converted checkpoint's config: file, sha256, type, rank, alpha, strength per LoRA."""
        return [
            {
                "file": a.path.name,
                "sha256": a.sha256,
                "adapter_type": a.adapter_type,
                "rank": a.rank,
                "alpha": a.alpha,
                "strength": a.strength,
            }
            for a in self.adapters
        ]


def _by_target(flat: Mapping[tuple, mx.array]) -> dict:
    out = {DIT: {}, CONDITIONERS: {}}
    for (target, name), value in flat.items():
        out[target][name] = value
    return out


def _shapes(base: Mapping[str, Mapping]) -> dict:
    return {target: {k: tuple(v.shape) for k, v in tensors.items()} for target, tensors in base.items()}


def _with_strengths(loras: Iterable) -> list[tuple[Path, float, tuple | None]]:
    """``[path | (path, strength) | (path, strength, interval), ...]`` -> ``[(path, strength, interval), ...]``
    (strength 1 and no interval by default)."""
    out = []
    for entry in loras:
        if isinstance(entry, (str, Path)):
            entry = (entry,)
        path, strength, interval = (*entry, 1.0, None)[:3] if len(entry) == 1 else (*entry, None)[:3]
        out.append((Path(path), _checked_strength(strength), interval))
    return out


def _checked_strength(value) -> float:
    strength = real_number(value, "a LoRA strength")
    if not math.isfinite(strength):
        raise ValueError(f"a LoRA strength must be finite, got {strength}")
    return strength


def _checked_interval(value) -> tuple[float, float] | None:
    """None (always active) or ``(low, high)``: two finite sigmas, low <= high (a list pair too)."""
    if value is None:
        return None
    if _is_interval(value):
        lo, hi = (real_number(v, "a LoRA sigma") for v in value)
        if math.isfinite(lo) and math.isfinite(hi) and lo <= hi:
            return lo, hi
    raise ValueError(f"LoRA sigma interval {value!r}: expected (low, high), finite, with low <= high")


def _is_interval(value) -> bool:
    return isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value)


def per_lora_intervals(interval, count: int) -> list:
    """``None`` / one ``(lo, hi)`` for every LoRA / a list with one entry (``(lo, hi)`` or None) per LoRA, or a
    single-entry list that applies to all."""
    if interval is None or _is_interval(interval):
        return [interval] * count
    intervals = list(interval)
    if len(intervals) == 1:
        return intervals * count
    if len(intervals) != count:
        raise ValueError(f"{len(intervals)} LoRA sigma intervals for {count} LoRA files")
    return intervals


def merge_loras(
    dit_weights: Mapping[str, mx.array],
    conditioner_tensors: Mapping[str, mx.array],
    loras,
    svd_bases: Mapping[str, mx.array] | None = None,
) -> tuple[dict, dict, list]:
    """Bake LoRAs into the weights, for a converter: ``loras`` = ``[(path, strength), ...]`` applied in order.

    ``dit_weights`` in mlx_sa3 names and layouts, ``conditioner_tensors`` as :class:`mlx_sa3.model.Conditioners`
    names them. Returns the merged copies and the record (:meth:`LoraStack.record`) to store with them. The result
    equals loading the LoRAs at those strengths at run time (sequential composition). The official
    ``merge_loras_into_base_model`` instead adds each LoRA's delta to the base independently.
    """
    base = {DIT: dict(dit_weights), CONDITIONERS: dict(conditioner_tensors)}
    stack = LoraStack()
    for path, strength, _ in _with_strengths(loras):
        adapter = load_lora(path, _shapes(base), base, svd_bases)
        adapter.strength = strength
        stack.add(adapter, base)
    merged = stack.effective(None)
    mx.eval(merged[DIT], merged[CONDITIONERS])
    return {**base[DIT], **merged[DIT]}, {**base[CONDITIONERS], **merged[CONDITIONERS]}, stack.record()


# ------------------------------------------------------------------------------------- SA3Model integration
# The model methods (SA3Model.load_lora and friends) are thin wrappers over these functions, which keep the stack
# on the model as ``model._lora_stack`` and push effective weights to either backend's DiT and to the conditioner.


def _stack(model, create: bool = False) -> LoraStack | None:
    stack = getattr(model, "_lora_stack", None)
    if stack is None and create:
        stack = model._lora_stack = LoraStack()
    return stack


def _refuse_quantized(model) -> None:
    """Merged LoRAs need float weights; a quantized DiT (MLX ``Quantized*`` modules) has packed integers instead."""
    named = getattr(model.dit, "named_modules", None)
    quantized = [name for name, module in (named() if named else []) if type(module).__name__.startswith("Quantized")]
    if quantized:
        raise ValueError(
            f"LoRA on a quantized DiT ({len(quantized)} quantized layers, e.g. {quantized[0]}) is not supported: "
            "load the unquantized checkpoint, or merge the LoRA first (convert.py --lora) and quantize the result"
        )


def _current_dit_weights(model) -> Mapping[str, mx.array]:
    """The DiT's parameters in mlx_sa3 names: the MLX module's own, or for the torch DiT the checkpoint's."""
    if hasattr(model.dit, "update_weights"):  # torch backend: the torch module holds no mlx_sa3-named copy
        source = model.source
        if source is None:
            raise ValueError("LoRAs on the torch backend need a model loaded from a checkpoint (load_model)")
        weights = source.component("dit")
        return weights if source.converted else sanitize(weights)
    from mlx.utils import tree_flatten

    return dict(tree_flatten(model.dit.parameters()))


def _model_base(model, stack: LoraStack) -> dict:
    """Original values of every adaptable tensor: the stack's kept copies first, the model's current ones else."""
    base = {DIT: dict(_current_dit_weights(model)), CONDITIONERS: dict(model.conditioners.tensors)}
    for (target, name), value in stack.base.items():
        base[target][name] = value
    return base


def _svd_bases_for(model) -> dict | None:
    """The bases file a checkpoint's model_config names (``svd_bases_path``, relative to the checkpoint)."""
    source = model.source
    name = source.model_config.get("svd_bases_path") if source is not None else None
    return None if not name else load_svd_bases(Path(source.root) / name)


_PUSH_ELEMENTS = 1 << 26  # weights evaluated and handed over per batch: 256 MB in float32


def push_weights(model, weights: dict) -> None:
    """Hand effective weights to the DiT (either backend) and the conditioner.

    In batches, so that the previous merged weights are released as the new ones arrive: the extra memory of a
    strength change stays one batch instead of a second copy of every adapted tensor.
    """
    torch_dit = hasattr(model.dit, "update_weights")
    batch, size = [], 0
    items = list(weights[DIT].items())
    for i, (name, value) in enumerate(items):
        mx.eval(value)
        batch.append((name, value))
        size += value.size
        if size >= _PUSH_ELEMENTS or i == len(items) - 1:
            if torch_dit:
                model.dit.update_weights(dict(batch))
            else:
                model.dit.load_weights(batch, strict=False)
            batch, size = [], 0
    mx.eval(weights[CONDITIONERS])
    model.conditioners.tensors.update(weights[CONDITIONERS])


def _refresh(model, sigma: float | None = None) -> None:
    stack = _stack(model)
    push_weights(model, stack.effective(sigma))
    stack.applied = stack.state_key(sigma)


def attach(model, loras, interval=None, layer_filter: str = "") -> list[int]:
    """Load LoRA files onto ``model`` after those already loaded; returns their indices.

    ``loras``: paths, ``(path, strength)`` or ``(path, strength, (lo, hi))``. ``interval`` applies to the entries
    without their own: one ``(lo, hi)`` for all or one per entry (see :func:`per_lora_intervals`). All files are
    read and checked before any weight changes.
    """
    _refuse_quantized(model)
    entries = _with_strengths([loras] if isinstance(loras, (str, Path)) else loras)
    defaults = per_lora_intervals(interval, len(entries))
    intervals = [own if own is not None else default for (_, _, own), default in zip(entries, defaults)]
    intervals = [_checked_interval(lo_hi) for lo_hi in intervals]
    stack = _stack(model, create=True)
    base = _model_base(model, stack)
    shapes = _shapes(base)
    bases = {}

    def svd_bases():  # the checkpoint's bases file, read once and only for an -xs LoRA (as officially)
        if "bases" not in bases:
            bases["bases"] = _svd_bases_for(model)
        return bases["bases"]

    adapters = []
    for path, strength, _ in entries:
        adapter = load_lora(path, shapes, base, svd_bases)
        adapter.strength = strength
        adapters.append(adapter)
    indices = []
    for adapter, lo_hi in zip(adapters, intervals):
        indices.append(stack.add(adapter, base))
        stack.set_interval(lo_hi, indices[-1])
        stack.set_layer_filter(layer_filter, indices[-1])
    _refresh(model)
    return indices


def control(model, what: str, value, lora_index: int | None = None) -> None:
    """Set ``strength`` / ``interval`` / ``layer_filter`` of one LoRA (or all) and re-apply the weights."""
    stack = _stack(model) or LoraStack()
    if not stack.adapters:
        stack.select(lora_index)  # an index is out of range; None with nothing loaded does nothing, as officially
        return
    {"strength": stack.set_strength, "interval": stack.set_interval, "layer_filter": stack.set_layer_filter}[what](
        value, lora_index
    )
    _refresh(model)


def detach(model, lora_index: int | None = None) -> None:
    """Unload one LoRA (later ones move down an index) or all; restored tensors are the original arrays."""
    stack = _stack(model)
    if stack is None:
        return
    freed = stack.remove(lora_index)
    push_weights(model, freed)
    if stack.adapters:
        _refresh(model)
    else:
        model._lora_stack = None


def listing(model) -> list[dict]:
    stack = _stack(model)
    return [] if stack is None else [a.describe(i) for i, a in enumerate(stack.adapters)]


def at_sigma(model, t: float | None) -> bool:
    """Sampler hook: switch LoRAs on or off for their sigma intervals at time ``t`` (None: all on, as outside
    sampling); True when the weights changed (the caller must then recompute what it derived from them, e.g. the
    prepared conditioning)."""
    stack = _stack(model)
    if stack is None or not stack.has_intervals:
        return False
    if t is None:  # sampling is over: back to every LoRA active
        sigma = None
    else:
        t = float(t)
        sigma = math.sin(t * math.pi / 2) if model.dit.config.diffusion_objective == "v" else t
    if stack.state_key(sigma) == stack.applied:
        return False
    _refresh(model, sigma)
    return True
