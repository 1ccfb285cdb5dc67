"""Weight storage narrower than the compute dtype: linear weights held in bfloat16, widened per layer at call time.

The Hub checkpoints are float32 and on the CPU MLX computes in float32 (its half-precision matmuls are slow), so the
small DiT's weights would be resident as 1.75 GiB of float32. With ``weights_dtype="bfloat16"`` the weight matrices
of the DiT's and the T5Gemma encoder's ``nn.Linear`` layers are rounded to bfloat16 once, as they are read, and each
layer widens its own weight back to the activations' dtype inside its call (bfloat16 -> float32 is exact), so the
arithmetic stays float32 and only one layer's float32 weight exists at a time. Biases, norm gains, convolutions and
the DiT's ``project_in`` (it carries the DiT's compute dtype) keep the compute dtype; the SAME decoder is never
touched. Rounding to bfloat16 (8 significant bits, round to nearest) changes each weight by a relative error of at
most 2^-8 (about 2^-9 RMS); the consequences for the outputs are derived in docs/ARCHITECTURE.md ("Weight storage").

This is an opt-in precision trade (the official code computes with the float32 weights). It only narrows a float32
compute dtype: with half-precision compute (the GPU default) the weights are already held in that dtype.

Loading never holds a whole float32 network (:func:`load_cast`): tensors are cast as they are read and evaluated
in groups, so the load peak is about the stored size.
"""

from __future__ import annotations

from typing import Callable

import mlx.core as mx
from mlx import nn
from mlx.utils import tree_flatten, tree_map_with_path

from .loading import dtype_name, parse_dtype
from .platform import trim_heap

#: storage dtypes the CLI offers (the library also accepts float16: exact to widen, but a software conversion on
#: x86 CPUs, about 4x slower than bfloat16's)
WEIGHTS_DTYPES = ("float32", "bfloat16")
#: bytes of cast tensors evaluated together while loading (bounds the load's transient float32 copies)
LOAD_GROUP_BYTES = 64 * 2**20


class WidenedLinear(nn.Module):
    """``nn.Linear`` with its weight stored in a narrower dtype, widened to the input's dtype inside each call.

    Parameter names (``weight``, ``bias``) are nn.Linear's, so strict checks, ``load_weights`` and LoRA merging see
    the same tree.
    """

    def __init__(self, weight: mx.array, bias: mx.array | None = None):
        super().__init__()
        self.weight = weight
        if bias is not None:
            self.bias = bias

    @classmethod
    def from_linear(cls, linear: nn.Linear, storage_dtype: mx.Dtype) -> "WidenedLinear":
        return cls(linear.weight.astype(storage_dtype), linear.get("bias"))

    def __call__(self, x: mx.array) -> mx.array:
        weight = self["weight"].astype(x.dtype)
        if "bias" in self:
            return mx.addmm(self["bias"], x, weight.T)
        return x @ weight.T


def for_calls(layer: nn.Module, dtype: mx.Dtype) -> nn.Module:
    """``layer`` for several calls on ``dtype`` inputs (e.g. token chunks): a :class:`WidenedLinear` with its weight
    widened once (lazily), not in every call; any other layer as it is. The results are the layer's own."""
    if isinstance(layer, WidenedLinear):
        return WidenedLinear(layer["weight"].astype(dtype), layer.get("bias"))
    return layer


def row_blocks(layer: nn.Module, dtype: mx.Dtype, parts: int) -> tuple[nn.Module, ...] | None:
    """``layer``'s output rows in ``parts`` equal blocks, each a layer for several calls on ``dtype`` inputs (see
    :func:`for_calls`: a narrow weight widened once per block), or None when ``layer`` is not a plain or widened
    linear (e.g. a quantized one) or its rows do not split evenly. Block ``i`` computes output columns
    ``[i n, (i + 1) n)`` of ``layer`` exactly (the same dot products)."""
    if type(layer) not in (nn.Linear, WidenedLinear) or layer["weight"].shape[0] % parts:
        return None
    weight, bias = layer["weight"], layer.get("bias")
    n = weight.shape[0] // parts
    rows = [slice(i * n, (i + 1) * n) for i in range(parts)]
    return tuple(WidenedLinear(weight[r].astype(dtype), None if bias is None else bias[r]) for r in rows)


def storage_dtype(compute_dtype, weights_dtype) -> mx.Dtype:
    """The dtype linear weights are held in, given the compute dtype and the requested ``weights_dtype``.

    ``None`` (default) or the compute dtype itself: the compute dtype (plain layers, today's behaviour). A half
    ``weights_dtype`` with float32 compute: that dtype, widened per layer. With half compute the weights already
    are half: a half request keeps them in the compute dtype (no second rounding, no per-call cast); a wider
    request is refused.
    """
    compute = parse_dtype(compute_dtype) or mx.float32
    wanted = parse_dtype(weights_dtype)
    if wanted is None or wanted == compute:
        return compute
    if compute != mx.float32:
        if wanted == mx.float32:
            raise ValueError(
                f"weights_dtype float32 is wider than the compute dtype {dtype_name(compute)}: weights are held in the "
                "compute dtype when it is half precision"
            )
        return compute
    return wanted


def linear_paths(module: nn.Module, keep: tuple[str, ...] = ()) -> list[str]:
    """Paths of the plain ``nn.Linear`` layers of ``module`` (quantized or already widened ones are not), minus
    ``keep``."""
    return [path for path, m in module.named_modules() if type(m) is nn.Linear and path not in keep]


def narrow_linears(module: nn.Module, dtype: mx.Dtype, keep: tuple[str, ...] = ()) -> list[str]:
    """Swap the plain ``nn.Linear`` layers of ``module`` (except ``keep``) for :class:`WidenedLinear` holding
    ``dtype`` weights, in place (the mlx-lm ``nn.quantize`` pattern); returns the swapped paths.

    On a freshly built module this costs nothing (the weights are lazy initialisers, replaced by the checkpoint's).
    """
    paths = set(linear_paths(module, keep))

    def swap(path, m):
        return WidenedLinear.from_linear(m, dtype) if path in paths else m

    module.update_modules(tree_map_with_path(swap, module.leaf_modules(), is_leaf=nn.Module.is_module))
    return sorted(paths)


def stored_dtypes(module: nn.Module) -> dict[str, mx.Dtype]:
    """Every parameter's dtype as ``module`` holds it (the targets :func:`load_cast` casts to)."""
    return {k: v.dtype for k, v in tree_flatten(module.parameters())}


def load_cast(module: nn.Module, weights: dict, cast: Callable[[str, mx.array], mx.array], group_bytes=None) -> None:
    """Load ``weights`` into ``module`` group by group, each tensor cast (``cast(key, tensor)``) as it is read.

    ``weights`` is emptied as it goes and every group is evaluated before the next is read, so the source tensors
    (e.g. a checkpoint's float32, lazily read by ``mx.load``) of at most one group exist next to the cast ones.
    The caller has checked the names and shapes (the strict load path); loading is not strict again.
    """
    budget = LOAD_GROUP_BYTES if group_bytes is None else group_bytes
    group, size = [], 0
    for key in list(weights):
        value = cast(key, weights.pop(key))
        group.append((key, value))
        size += value.nbytes
        if size >= budget:
            _load_group(module, group)
            group, size = [], 0
    if group:
        _load_group(module, group)
    mx.clear_cache()  # the source groups' buffers are not needed again: hand them back
    trim_heap()


def _load_group(module: nn.Module, group: list) -> None:
    module.load_weights(group, strict=False)
    mx.eval([v for _, v in group])


def cast_to(targets: dict[str, mx.Dtype]) -> Callable[[str, mx.array], mx.array]:
    """A :func:`load_cast` cast: floating tensors to the dtype ``targets`` gives their name; others unchanged
    (packed quantized weights are uint32)."""

    def cast(key: str, value: mx.array) -> mx.array:
        if not mx.issubdtype(value.dtype, mx.floating) or key not in targets:
            return value
        return value.astype(targets[key])

    return cast
