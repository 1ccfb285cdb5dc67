"""What every torch-backend module shares: the guarded torch import and array/state conversions."""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import math
import mmap
import platform
import sys
import types
from pathlib import Path

import mlx.core as mx
import numpy as np

from .. import platform as sa3_platform
from ..loading import StoredTensor, TensorRef, WeightNormFold, dtype_name, parse_dtype, read_stored_numpy
from ..platform import blas_threads

INSTALL_HINT = 'pip install "mlx_sa3[torch]"'
_LINUX_HINT = " (on Linux, install a CPU-only build of torch first, or pip pulls a CUDA build of several GB)"


def require_torch(*modules: str):
    """Import torch (and ``modules``, e.g. a diffusers submodule) or raise an ImportError saying how to install them.

    Returns torch, or ``(torch, *modules)`` when modules are named. Every torch import of mlx_sa3 goes through here,
    so ``import mlx_sa3`` never imports torch.
    """
    names = ("torch", *modules)
    try:
        loaded = tuple(_import(name) for name in names)
    except ImportError as err:
        hint = INSTALL_HINT + (_LINUX_HINT if platform.system() == "Linux" else "")
        raise ImportError(
            f"the torch backend needs torch, diffusers and transformers ({err}); install them with {hint}"
        ) from err
    sa3_platform.torch_thread_policy(loaded[0])
    return loaded[0] if not modules else loaded


#: Packages whose ``__init__`` imports every model they hold; the torch backend needs one module of each, so those
#: are imported on their own (measured: 40 MB less resident and ~1 s less start-up for the DiT and SAME modules).
EAGER_PACKAGES = ("diffusers.models.transformers", "diffusers.models.autoencoders")


def _import(name: str):
    package = name.rpartition(".")[0]
    if package in EAGER_PACKAGES and package not in sys.modules:
        try:
            return _import_past_package_init(name, package)
        except Exception:  # a layout this does not know: the plain import (slower start, same modules)
            pass
    return importlib.import_module(name)


def _import_past_package_init(name: str, package: str):
    """Import ``name`` with a bare stand-in for ``package`` that has its path but does not run its ``__init__``.

    The stand-in is removed again afterwards, so a later ``import package`` anywhere runs the real ``__init__``
    (which then finds the module already imported).
    """
    parent, _, child = package.rpartition(".")
    importlib.import_module(parent)
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"{package} is not a package")
    stand_in = types.ModuleType(package)
    stand_in.__path__ = list(spec.submodule_search_locations)
    stand_in.__spec__, stand_in.__package__ = spec, package
    sys.modules[package] = stand_in
    try:
        return importlib.import_module(name)
    finally:
        if sys.modules.get(package) is stand_in:
            del sys.modules[package]
        if getattr(sys.modules[parent], child, None) is stand_in:
            delattr(sys.modules[parent], child)


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


def _state_dict(weights: dict, convert=None, dtype=None) -> dict:
    """Torch tensors of ``weights`` (float32, or the torch ``dtype``), one at a time:
    :class:`~mlx_sa3.loading.TensorRef` values (the strict load path's) through a :class:`MappedReader`, numpy / MLX
    arrays (networks moved from MLX) converted.

    A narrower ``dtype`` casts each tensor as it is read, before ``convert``, and its mapped float32 pages are given
    back at once: the float32 network is never whole in memory. ``convert(key, tensor)`` returns the torch name and
    tensor (renames, row orders, conv layouts) or None to drop it.
    """
    reader, state = MappedReader(), {}
    for key, value in weights.items():
        tensor = _to_torch(reader.read(value) if isinstance(value, TensorRef) else value, dtype)
        item = (key, tensor) if convert is None else convert(key, tensor)
        reader.settle(None if item is None else item[1])
        if item is not None:
            state[item[0]] = item[1]
    return state


def _torch_dtype(mx_dtype):
    torch = require_torch()
    return {mx.float16: torch.float16, mx.bfloat16: torch.bfloat16}.get(mx_dtype, torch.float32)


#: The compute dtypes the torch backend offers: float32, and bfloat16 for CPUs with bf16 matrix units (AMX-BF16,
#: AVX512-BF16: ``platform.has_fast_bf16_matmul``). Not float16: torch's CPU float16 GEMM measured ~282 GFLOP/s on
#: this class of machine against 231 in float32 and 1370 in bfloat16, so it would round for no speed.
COMPUTE_DTYPES = (mx.float32, mx.bfloat16)


def check_dtype(dtype) -> mx.Dtype:
    """The torch backend's compute dtype for ``dtype`` (None: float32); raises ValueError for one it does not offer.

    Pure (no torch import), so callers can check before anything loads.
    """
    parsed = parse_dtype(dtype) or mx.float32
    if parsed not in COMPUTE_DTYPES:
        raise ValueError(
            f"the torch backend computes in float32 or bfloat16, got dtype {dtype_name(parsed)} "
            "(torch's float16 CPU matmuls are no faster than float32; use --backend mlx for float16)"
        )
    return parsed


def compute_threads(dtype):
    """Context for a torch forward in ``dtype`` under mlx_sa3's thread policy (:func:`~mlx_sa3.platform.torch_threads`).

    bfloat16 GEMMs run in torch's own oneDNN kernels on torch's intra-op threads (not in the preloaded OpenBLAS),
    so a bfloat16 forward runs with every thread torch would use by default; float32 keeps the policy.
    """
    torch = require_torch()
    return sa3_platform.torch_threads(torch, None if dtype == torch.float32 else sa3_platform.torch_default_threads)


def onednn_linear(dtype=None):
    """``linear(x, weight, bias)`` through torch's oneDNN kernels (``mkldnn._linear_pointwise``, AVX-512 / AMX on
    x86) for inputs of ``dtype`` (a torch dtype, default float32), or None where this torch and CPU have none that
    reproduces ``F.linear`` in that dtype (checked once per dtype on a small case).

    Why: with OpenBLAS preloaded, torch's float32 GEMMs resolve to it (symbol interposition), which runs the DiT's
    skinny products (~200-450 rows) at ~200 GFLOP/s on two cores; oneDNN runs them at ~300 on torch's threads.
    Per dtype because oneDNN has no bfloat16 inner product on CPUs without AVX-512 (an AVX2-only EPYC raises
    "could not create a primitive descriptor"), where float32 still works.
    """
    return _onednn_linear(require_torch().float32 if dtype is None else dtype)


@functools.cache
def _onednn_linear(dtype):
    torch = require_torch()
    op = getattr(getattr(torch.ops, "mkldnn", None), "_linear_pointwise", None)
    if op is None or not torch.backends.mkldnn.is_available():
        return None

    def linear(x, weight, bias=None):
        return op(x, weight, bias, "none", [], "")

    depth = 64
    try:
        gen = torch.Generator().manual_seed(0)
        x, w, b = (torch.randn(*shape, generator=gen).to(dtype) for shape in ((2, 3, depth), (48, depth), (48,)))
        with torch.inference_mode():
            want = torch.nn.functional.linear(x.float(), w.float(), b.float())
            got = linear(x, w, b).float()
    except (RuntimeError, TypeError):  # an op this build or CPU cannot run: torch's own linear
        return None
    # float32: its accumulation over the depth; a half type: one rounding of the output (fp32 accumulation)
    eps = torch.finfo(dtype).eps
    tol = eps * (depth if dtype == torch.float32 else 2.0)
    ok = bool(torch.allclose(got, want, rtol=tol, atol=tol * float(want.abs().max())))
    return linear if ok else None


@contextlib.contextmanager
def onednn_threads():
    """Context for a forward whose GEMMs are :func:`onednn_linear`'s: torch on its default thread count, the preloaded
    OpenBLAS (if any) on one thread.

    oneDNN and torch's elementwise ops run on torch's OpenMP threads; what still calls the BLAS inside them
    (the blocks of torch's CPU flash attention) must not start OpenBLAS's own threads, which would fight torch's
    for the cores (the reason :func:`~mlx_sa3.platform.torch_thread_policy` keeps torch on one thread otherwise).
    Measured, small DiT step at 10 s: 0.80 s against 1.17 s under the policy, 3.1 s with OpenBLAS left on two.
    """
    torch = require_torch()
    with sa3_platform.torch_threads(torch, sa3_platform.torch_default_threads), blas_threads(1):
        yield


def linear(x, layer):
    """``layer(x)`` for an ``nn.Linear``, in oneDNN where torch has it (:func:`onednn_linear`), else ``F.linear``."""
    op = onednn_linear(x.dtype) or require_torch().nn.functional.linear
    return op(x, layer.weight, layer.bias)


def glu_feed_forward(ff, x, sinusoidal: bool = False):
    """diffusers' GLU feed-forwards (the DiT's SwiGLU, SAME's SiLU or ``sin(pi * gate)`` one): ``proj_in`` rows
    [value | gate], GEMMs through :func:`linear`, the SiLU in place on the gate."""
    torch = require_torch()
    hidden, gate = linear(x, ff.proj_in).chunk(2, dim=-1)
    gate = torch.sin(math.pi * gate) if sinusoidal else torch.nn.functional.silu(gate, inplace=True)
    return linear(hidden * gate, ff.proj_out)


def linear_threads(dtype):
    """Threads of a forward whose GEMMs are :func:`linear`'s: :func:`onednn_threads` where oneDNN has the dtype,
    else the backend's policy (:func:`compute_threads`)."""
    return onednn_threads() if onednn_linear(dtype) else compute_threads(dtype)


class MappedReader:
    """Reads :class:`~mlx_sa3.loading.TensorRef` values into torch.

    A float32 tensor becomes a view of a private (copy-on-write) memory map of its file: no copy, no load time,
    and nothing resident until the network first uses it; a released network gives its pages back at once (no
    allocator keeps them). Other dtypes are read into memory (not through the map) for the cast to float32. A map
    lives as long as a tensor views it. :meth:`settle` gives back the pages of a tensor that was read through the
    map but then copied (row reorders, layout changes), so a load's peak stays near the weights' size.
    """

    def __init__(self):
        self._maps: dict[Path, tuple] = {}  # path -> (mmap, uint8 tensor of the whole file)
        self._pending: list[tuple[Path, int, int]] = []  # (path, offset, nbytes) read as views since settle()

    def read(self, ref: TensorRef):
        torch = require_torch()
        if isinstance(ref.base, WeightNormFold):
            g, v = (self.read(r).float() for r in (ref.base.g, ref.base.v))
            out = torch._weight_norm(v, g, 0)  # what the official torch.nn.utils.weight_norm computes
        else:
            out = self._read_stored(ref.base)
        return ref.replay(out, lambda t, axes: t.permute(axes), lambda t, dtype: t.to(_torch_dtype(dtype)))

    def _read_stored(self, stored: StoredTensor):
        torch = require_torch()
        if stored.dtype != "F32" or stored.offset % 4:
            return torch.from_numpy(read_stored_numpy(stored))
        if stored.path not in self._maps:
            with open(stored.path, "rb") as f:
                mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self._maps[stored.path] = (mapped, torch.frombuffer(mapped, dtype=torch.uint8))
        self._pending.append((stored.path, stored.offset, stored.nbytes))
        data = self._maps[stored.path][1][stored.offset : stored.offset + stored.nbytes]
        return data.view(torch.float32).view(stored.shape)

    def settle(self, kept) -> None:
        """Give back the mapped pages read since the last call that the tensor ``kept`` (or None) does not view."""
        pending, self._pending = self._pending, []
        if not hasattr(mmap, "MADV_DONTNEED"):  # no madvise here (Windows): the pages go when the map does
            return
        page = mmap.PAGESIZE
        for path, offset, nbytes in pending:
            mapped, whole = self._maps[path]
            if kept is not None and kept.untyped_storage().data_ptr() == whole.untyped_storage().data_ptr():
                if kept.storage_offset() * kept.element_size() == offset:
                    continue
            start, stop = -(-offset // page) * page, (offset + nbytes) // page * page  # whole pages inside only
            if stop > start:  # read-only so far: MADV_DONTNEED drops clean copies, the file still has them
                mapped.madvise(mmap.MADV_DONTNEED, start, stop - start)


def _load_state(module, state: dict, deferred: tuple = ()) -> None:
    """Make ``state``'s tensors the parameters of ``module`` (built on the meta device: no init, no copy).

    Afterwards no parameter or buffer may be left unset (on the meta device) except those under the ``deferred``
    prefixes (loaded later); ones the caller computed, or an earlier call set, may be absent from ``state``.
    """
    _, unexpected = module.load_state_dict(state, strict=False, assign=True)
    unset = [
        name
        for name, t in (*module.named_parameters(), *module.named_buffers())
        if t.is_meta and not name.startswith(deferred)
    ]
    if unexpected or unset:
        raise RuntimeError(f"torch parameter mapping is incomplete: unexpected {sorted(unexpected)}, unset {unset}")


def reorder_rows(weight, permutation):
    """``weight`` (torch) with its rows permuted (a numpy permutation from :mod:`mlx_sa3.models.keymaps`)."""
    return weight[require_torch().from_numpy(permutation)]


def gemm_gflops(n: int = 2048, repeats: int = 5, dtype=None) -> float:
    """Best-of-``repeats`` n x n x n matmul rate of torch in ``dtype`` (an MLX dtype or name; default float32), with
    the threads the torch backend runs that dtype with (:func:`compute_threads`)."""
    import time

    torch = require_torch()
    dtype = _torch_dtype(parse_dtype(dtype) or mx.float32)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    with compute_threads(dtype):
        a @ b  # warm-up (thread pools)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9
