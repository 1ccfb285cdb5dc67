"""What every torch-backend module shares: the guarded torch import and array/state conversions."""

from __future__ import annotations

import importlib
import platform

import mlx.core as mx
import numpy as np

from .. import platform as sa3_platform

INSTALL_HINT = 'pip install "mlx_sa3[torch]"'
_LINUX_HINT = " (on Linux, install a CPU-only build of torch first, or pip pulls a CUDA build of several GB)"


def require_torch(*modules: str):
    """Import torch (and ``modules``, e.g. a diffusers submodule) or raise an ImportError saying how to install them.

    Returns torch, or ``(torch, *modules)`` when modules are named. Every torch import of mlx_sa3 goes through here,
    so ``import mlx_sa3`` never imports torch.
    """
    names = ("torch", *modules)
    try:
        loaded = tuple(importlib.import_module(name) for name in names)
    except ImportError as err:
        hint = INSTALL_HINT + (_LINUX_HINT if platform.system() == "Linux" else "")
        raise ImportError(
            f"the torch backend needs torch, diffusers and transformers ({err}); install them with {hint}"
        ) from err
    sa3_platform.torch_thread_policy(loaded[0])
    return loaded[0] if not modules else loaded


def describe_torch() -> str:
    """The torch backend for ``python -m mlx_sa3.info``: version and threads under mlx_sa3's policy, or why not."""
    try:
        torch = require_torch()
    except ImportError:
        return f"not installed (the torch backend needs: {INSTALL_HINT})"
    except Exception as err:  # a broken install must not stop the report
        return f"installed but fails to import ({type(err).__name__}: {err})"
    return f"{torch.__version__} (threads: {torch.get_num_threads()})"


# ----------------------------------------------------------------------------------------------------- conversions


def _to_torch(x, dtype=None):
    """numpy / MLX / torch -> torch tensor (float32 unless ``dtype`` says otherwise)."""
    torch = require_torch()
    dtype = dtype or torch.float32
    if isinstance(x, torch.Tensor):
        return x.to(dtype)
    if isinstance(x, mx.array) and x.dtype == mx.bfloat16:
        x = x.astype(mx.float32)  # numpy has no bfloat16
    return torch.from_numpy(np.array(x)).to(dtype)


def _to_mx(t) -> mx.array:
    return mx.array(t.detach().numpy())


def _state_dict(weights: dict) -> dict:
    return {k: _to_torch(v) for k, v in weights.items()}


def _load_state(module, state: dict, computed: tuple = ()) -> None:
    """Make ``state``'s tensors the parameters of ``module`` (built on the meta device: no init, no copy).

    Every tensor must land, and only the ``computed`` ones (set up by the caller) may be absent from ``state``.
    """
    missing, unexpected = module.load_state_dict(state, strict=False, assign=True)
    stray = sorted(set(missing) - set(computed))
    unset = [name for name, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if stray or unexpected or unset:
        raise RuntimeError(
            f"torch parameter mapping is incomplete: missing {stray}, unexpected {sorted(unexpected)}, "
            f"uninitialised {unset}"
        )


def reorder_rows(weight, permutation):
    """``weight`` (torch) with its rows permuted (a numpy permutation from :mod:`mlx_sa3.models.keymaps`)."""
    return weight[require_torch().from_numpy(permutation)]
