"""Quantized DiTs: MLX affine quantization of the DiT's linear layers (int8 or int4, per group of input columns).

Only ``nn.Linear`` layers inside the DiT are quantized, and only those whose input width is a multiple of the group
size (the rest, e.g. the 257-wide inpainting input, keep their dtype). The SAME autoencoder, the conditioners and the
text encoder are never quantized: SAME's differential attention cancels badly at low precision and the others are
small. ``project_in`` stays in its dtype too: it is 0.06 % of the weights and the DiT reads its activation dtype
from it.

A converted checkpoint records what was done in its ``config.json`` under ``"quantization"`` (see
:meth:`QuantizationConfig.to_dict`); a loader rebuilds the quantized module structure from that record with
:func:`apply_quantization` before loading the stored ``weight`` / ``scales`` / ``biases`` tensors (the mlx-lm
pattern).

Error model (affine, ``b`` bits, group ``g``): each group of ``g`` weights is stored as
``scale * q + bias`` with ``scale = (max - min) / (2**b - 1)``, so rounding errs by at most ``scale / 2`` and by
``scale / sqrt(12)`` RMS. For Gaussian-like weights the range of a group of 64 is about 4.8 standard deviations,
giving a relative RMS weight error of about ``4.8 / ((2**b - 1) * sqrt(12))``: 0.54 % for int8, 9.2 % for int4.
A layer's output error relative to its output is about the same; :func:`weight_error` measures it per layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten

BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)  # what MLX's affine kernels support
DEFAULT_GROUP_SIZE = 64
MODE = "affine"
#: DiT layers never quantized, whatever their shape (see the module docstring)
KEEP = ("project_in",)


@dataclass
class QuantizationConfig:
    """What a quantized DiT checkpoint records: bits, group size, mode and the quantized layer paths."""

    bits: int
    group_size: int = DEFAULT_GROUP_SIZE
    mode: str = MODE
    layers: list[str] = field(default_factory=list)

    def __post_init__(self):
        check_settings(self.bits, self.group_size)
        if self.mode != MODE:
            raise ValueError(f"unsupported quantization mode {self.mode!r}; only {MODE!r}")

    def to_dict(self) -> dict:
        return {"bits": self.bits, "group_size": self.group_size, "mode": self.mode, "layers": list(self.layers)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantizationConfig:
        known = {"bits", "group_size", "mode", "layers"}
        return cls(**{k: v for k, v in d.items() if k in known})


def check_settings(bits: int, group_size: int) -> None:
    if bits not in BITS:
        raise ValueError(f"quantization bits must be one of {', '.join(map(str, BITS))}, got {bits}")
    if group_size not in GROUP_SIZES:
        raise ValueError(f"quantization group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")


def quantizable_layers(dit: nn.Module, group_size: int = DEFAULT_GROUP_SIZE) -> list[str]:
    """Paths of the DiT's ``nn.Linear`` layers that fit the group size (input width a multiple of it)."""
    return [
        path
        for path, module in dit.named_modules()
        if type(module) is nn.Linear and module.weight.shape[-1] % group_size == 0 and path not in KEEP
    ]


def _quantize_structure(dit: nn.Module, config: QuantizationConfig) -> None:
    wanted = set(config.layers)
    nn.quantize(dit, config.group_size, config.bits, mode=config.mode, class_predicate=lambda path, _: path in wanted)


def quantize_dit(dit: nn.Module, bits: int = 8, group_size: int = DEFAULT_GROUP_SIZE) -> QuantizationConfig:
    """Quantize a loaded DiT in place; returns the record to store with its weights."""
    check_settings(bits, group_size)
    config = QuantizationConfig(bits, group_size, MODE, quantizable_layers(dit, group_size))
    _quantize_structure(dit, config)
    mx.eval(dit.parameters())
    return config


def apply_quantization(dit: nn.Module, record: dict | QuantizationConfig) -> QuantizationConfig:
    """Loader side: turn the recorded layers of a freshly built DiT into quantized layers, before its weights load.

    Raises ValueError when the record names a layer the DiT does not have as an ``nn.Linear`` of a fitting shape
    (a checkpoint for another architecture), so loading fails before any tensor is read.
    """
    config = record if isinstance(record, QuantizationConfig) else QuantizationConfig.from_dict(record)
    linears = {path: m for path, m in dit.named_modules() if type(m) is nn.Linear}
    bad = [p for p in config.layers if p not in linears or linears[p].weight.shape[-1] % config.group_size]
    if bad:
        raise ValueError(f"quantization record names layers this DiT cannot quantize: {', '.join(sorted(bad))}")
    _quantize_structure(dit, config)
    return config


def quantize_weights(weights: dict[str, mx.array], config: QuantizationConfig) -> dict[str, mx.array]:
    """Converter side: sanitized DiT tensors -> the tensors of the quantized DiT (``X.weight`` of every recorded
    layer X becomes ``X.weight`` (packed uint32), ``X.scales`` and ``X.biases``; everything else is unchanged).

    Works per tensor, so a streaming converter can call it one layer at a time.
    """
    layers = set(config.layers)
    out = {}
    for key, value in weights.items():
        if key.endswith(".weight") and key[: -len(".weight")] in layers:
            stem = key[: -len(".weight")]
            packed, scales, biases = mx.quantize(value, config.group_size, config.bits, mode=config.mode)
            out[key], out[stem + ".scales"], out[stem + ".biases"] = packed, scales, biases
        else:
            out[key] = value
    return out


def dequantize_weights(weights: dict[str, mx.array], config: QuantizationConfig, dtype=mx.float32) -> dict:
    """Quantized DiT tensors -> plain ``X.weight`` tensors in ``dtype`` (the inverse layout of
    :func:`quantize_weights`; values are the rounded ones). Used where quantized matmuls are slow (MLX's CPU kernels
    run at a few GFLOP/s) or absent (the torch backend)."""
    layers = set(config.layers)
    out = {}
    for key, value in weights.items():
        stem, _, leaf = key.rpartition(".")
        if stem not in layers or leaf not in ("weight", "scales", "biases"):
            out[key] = value
        elif leaf == "weight":
            args = (value, weights[stem + ".scales"], weights[stem + ".biases"])
            full = mx.dequantize(*args, group_size=config.group_size, bits=config.bits, mode=config.mode)
            out[key] = full.astype(dtype)
    return out


def quantized_bytes(dit: nn.Module) -> int:
    """Bytes of all DiT parameters as held (packed weights, scales and biases included)."""
    return sum(v.nbytes for _, v in tree_flatten(dit.parameters()))


def weight_error(dit_fp: nn.Module, config: QuantizationConfig) -> dict[str, float]:
    """Relative RMS error ``||dequant(quant(W)) - W|| / ||W||`` of every recorded layer of an unquantized DiT."""
    modules = dict(dit_fp.named_modules())
    errors = {}
    for path in config.layers:
        w = modules[path].weight.astype(mx.float32)
        q = mx.quantize(w, config.group_size, config.bits, mode=config.mode)
        back = mx.dequantize(*q, group_size=config.group_size, bits=config.bits, mode=config.mode)
        errors[path] = float(mx.sqrt(mx.sum((back - w) ** 2) / mx.sum(w * w)).item())
    return errors


def expected_relative_error(bits: int, group_size: int) -> float:
    """RMS relative weight error of affine rounding for Gaussian weights (module docstring): range / (levels sqrt 12).

    The range of ``group_size`` standard normals is taken as 2 * sqrt(2 ln g) (its large-g expectation is a little
    below that, so this errs on the high side).
    """
    group_range = 2 * math.sqrt(2 * math.log(group_size))
    return group_range / ((2**bits - 1) * math.sqrt(12))
