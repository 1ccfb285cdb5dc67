"""Where non-finite numbers come from: the input audio, the checkpoint's weights, or the sampling itself.

Input audio is refused at the door (:func:`mlx_sa3.audio.check_finite`). When sampling or decoding still produces
NaN/inf, :func:`explain_non_finite` looks at the weights of every component (a one-off scan, only on failure) and
says which checkpoint tensor is broken; with finite weights the sampling is to blame, and reduced precision or
strong guidance are the usual causes.
"""

from __future__ import annotations

import numpy as np


def _mlx_tensors(module) -> list:
    from mlx.utils import tree_flatten

    return tree_flatten(module.parameters())


def _torch_tensors(module) -> list:
    return list(module.state_dict().items())


def _tensors(component, depth: int = 2) -> list:
    """(name, tensor) pairs of an MLX or torch module, or of the modules a wrapper object holds (one level down)."""
    from mlx import nn

    if isinstance(component, nn.Module):
        return _mlx_tensors(component)
    if hasattr(component, "state_dict") and hasattr(component, "named_parameters"):
        return _torch_tensors(component)
    if isinstance(component, dict):
        return [(str(k), v) for k, v in component.items() if hasattr(v, "shape")]
    if depth == 0 or not hasattr(component, "__dict__"):
        return []
    found = []
    for name, value in vars(component).items():
        found += [(f"{name}.{key}", t) for key, t in _tensors(value, depth - 1)]
    return found


def _is_finite(tensor) -> bool:
    if hasattr(tensor, "detach"):  # torch: check in place, no copy to numpy (and no torch import here)
        if tensor.is_meta:  # not read yet (the torch SAME encoder until its first encode): no values to check
            return True
        return not tensor.is_floating_point() or bool(tensor.isfinite().all())
    import mlx.core as mx

    if isinstance(tensor, mx.array):
        return not mx.issubdtype(tensor.dtype, mx.floating) or bool(mx.all(mx.isfinite(tensor)).item())
    array = np.asarray(tensor)
    return array.dtype.kind != "f" or bool(np.isfinite(array).all())


def non_finite_tensors(component) -> list[str]:
    """Names of the floating-point tensors of ``component`` (MLX or torch module, wrapper, or dict) with NaN/inf."""
    return [name for name, tensor in _tensors(component) if not _is_finite(tensor)]


#: the components of an SA3Model, in the order data flows through them, with the names messages use
COMPONENTS = (
    ("dit", "DiT"),
    ("autoencoder", "SAME autoencoder"),
    ("text_encoder", "text encoder"),
    ("conditioners", "conditioners"),
)


def broken_weights(model) -> dict[str, list[str]]:
    """{component description: non-finite tensor names} for an SA3Model (or anything with those attributes).

    A lazy SA3Model's networks that are not resident (one-shot use) are loaded one at a time for the scan and
    released again, so a failing generation never holds more networks than a working one.
    """
    from .model import COMPONENTS as NETWORKS

    resident = set(getattr(model, "loaded", NETWORKS))
    release = getattr(model, "release", None)
    broken = {}
    for attr, described in COMPONENTS:
        component = getattr(model, attr, None)
        if attr == "conditioners" and component is not None:
            component = getattr(component, "tensors", component)
        names = non_finite_tensors(component) if component is not None else []
        del component
        if release is not None and attr in NETWORKS and attr not in resident:
            release(attr)
        if names:
            broken[described] = names
    return broken


def explain_non_finite(model, where: str = "sampling", source=None, dtype=None) -> str:
    """One line saying why ``where`` ("sampling", "decoding") produced NaN/inf: the checkpoint or the sampling.

    ``source`` names the checkpoint in the message (a path or repo id); ``dtype`` the DiT precision in use.
    """
    broken = broken_weights(model)
    if broken:
        parts = [f"{described}: {len(names)} tensors, e.g. {names[0]}" for described, names in broken.items()]
        origin = f" {source}" if source is not None else ""
        return (
            f"{where} produced non-finite values because the checkpoint{origin} holds NaN/inf weights "
            f"({'; '.join(parts)}); re-download or re-convert it"
        )
    from .loading import dtype_name

    advice = (
        "try a smaller --cfg-scale or another seed"
        if dtype is not None and dtype_name(dtype) == "float32"
        else "try --dtype float32 or a smaller --cfg-scale"
    )
    return f"{where} produced non-finite values with finite inputs and weights; {advice}"
