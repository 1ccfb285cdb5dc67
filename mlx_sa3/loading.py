"""Finding checkpoints and reading their tensors, shared by every model family.

Everything that touches the Hub or a checkpoint file goes through here, so that the rules are the same
everywhere: repo ids resolve through ``huggingface_hub`` (its cache, ``HF_HUB_OFFLINE`` and tokens), pickle files
are never opened, and weights are matched strictly against what the model expects.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

import mlx.core as mx
import numpy as np

from .outputs import not_a_file


class CheckpointError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or wrongly shaped tensors, or a bad file."""


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def resolve_source(src: str | os.PathLike, allow_patterns: Iterable[str] | None = None) -> Path:
    """Return a local directory for ``src``: an existing directory, or a Hub repo id downloaded into the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        kind = not_a_file(path) or "a file"
        raise CheckpointError(f"{src} is {kind}; pass the directory that holds model_config.json / config.json")
    text = str(src)
    if text.count("/") != 1 or text.startswith((".", "/")):
        raise FileNotFoundError(f"{src}: no such directory, and it does not look like a Hub repo id (owner/name)")
    return _download(text, allow_patterns)


def _download(repo_id: str, allow_patterns: Iterable[str] | None) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id, allow_patterns=list(allow_patterns) if allow_patterns else None))
    except GatedRepoError as err:
        raise PermissionError(
            f"{repo_id} is gated. Accept its licence at https://huggingface.co/{repo_id} with your account, then "
            f"log in here with `hf auth login` (or set HF_TOKEN) and try again."
        ) from err
    except RepositoryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id}: repository not found on the Hub (or private: log in with `hf auth login` / HF_TOKEN)"
        ) from err
    except LocalEntryNotFoundError as err:
        raise FileNotFoundError(
            f"{repo_id} is not in the local Hugging Face cache and the Hub cannot be reached"
            + (" (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") else "")
            + ". Download it once with network access, or pass a local directory."
        ) from err


def parsed_config(what: str, build):
    """Run a config parser, turning the errors a malformed config produces into one clear CheckpointError."""
    try:
        return build()
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as err:
        raise CheckpointError(f"cannot read the {what} configuration: {type(err).__name__}: {err}") from None


def read_json(path: Path) -> dict:
    """A JSON object from a checkpoint's config file, or a CheckpointError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None
    except (OSError, UnicodeDecodeError) as err:  # a directory in its place, no permission, foreign bytes
        raise CheckpointError(f"{path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, got {type(data).__name__}")
    return data


def refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointError(
            f"{path}: pickle checkpoints are refused (loading one can run arbitrary code); "
            "use the model.safetensors file of the repository"
        )


def load_safetensors(path: Path) -> dict[str, mx.array]:
    """Read every tensor of a safetensors file as MLX arrays (lazily memory-mapped by MLX)."""
    refuse_pickle(path)
    if not path.exists():
        raise CheckpointError(f"{path}: missing")
    try:
        return dict(mx.load(str(path)))
    except Exception as err:  # MLX raises plain RuntimeError/ValueError for truncated or corrupt files
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None


# -- tensors not read yet (the torch backend's load path) --------------------------------------------------------

#: safetensors dtype codes -> numpy (bfloat16: its bits, widened to float32 when read)
SAFETENSORS_NUMPY = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def safetensors_header(path: Path) -> dict[str, dict]:
    """``{name: {"dtype", "shape", "offset", "nbytes"}}`` of a safetensors file (offsets from the file start)."""
    refuse_pickle(path)
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size))
            end = f.seek(0, os.SEEK_END)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
    header.pop("__metadata__", None)
    out = {}
    for name, info in header.items():
        try:
            start, stop = (8 + size + int(o) for o in info["data_offsets"])
            entry = {"dtype": info["dtype"], "shape": tuple(int(n) for n in info["shape"]), "offset": start}
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: bad header entry for {name}") from None
        if (
            entry["dtype"] not in SAFETENSORS_NUMPY
            or stop > end
            or stop - start != np.dtype(SAFETENSORS_NUMPY[entry["dtype"]]).itemsize * int(np.prod(entry["shape"]))
        ):
            raise CheckpointError(f"{path}: {name} has an unsupported dtype or lies outside the file")
        out[name] = {**entry, "nbytes": stop - start}
    return out


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor lies in a safetensors file (``offset`` from the file start) and how it is stored."""

    path: Path
    name: str
    dtype: str  # safetensors code: F32, F16, BF16, ...
    shape: tuple
    offset: int
    nbytes: int


@dataclass(frozen=True)
class WeightNormFold:
    """``g * v / ||v||`` (norm over all but dim 0) of two tensors not read yet (see :func:`fold_weight_norm`)."""

    g: "TensorRef"
    v: "TensorRef"

    @property
    def shape(self) -> tuple:
        return tuple(self.v.shape)


@dataclass(frozen=True)
class TensorRef:
    """A checkpoint tensor that has not been read: where it lies, its shape, and the layout changes asked of it.

    The model sanitizers run on these as on MLX arrays: ``shape``/``ndim``/``size`` answer from the header, and
    ``transpose``/``reshape``/``astype`` (and the weight-norm fold) are recorded in ``ops``; the backend that reads
    the tensor replays them (:func:`read_numpy` here, ``torch_backend.common.read_torch``). So the torch backend
    goes through the same sanitize maps and strict check as MLX without creating MLX arrays of the weights.
    """

    shape: tuple
    base: StoredTensor | WeightNormFold
    ops: tuple = ()

    @classmethod
    def weight_norm(cls, g: "TensorRef", v: "TensorRef") -> "TensorRef":
        fold = WeightNormFold(g, v)
        return cls(fold.shape, fold)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    def _with(self, shape, op) -> "TensorRef":
        return TensorRef(tuple(shape), self.base, self.ops + (op,))

    def transpose(self, *axes) -> "TensorRef":
        axes = tuple(axes[0]) if len(axes) == 1 and not isinstance(axes[0], int) else axes
        axes = axes or tuple(reversed(range(self.ndim)))
        return self._with([self.shape[a] for a in axes], ("transpose", axes))

    def reshape(self, *shape) -> "TensorRef":
        shape = tuple(shape[0]) if len(shape) == 1 and not isinstance(shape[0], int) else shape
        if -1 in shape:
            known = int(np.prod([s for s in shape if s != -1], dtype=np.int64))
            shape = tuple(self.size // max(known, 1) if s == -1 else s for s in shape)
        return self._with(shape, ("reshape", shape))

    def astype(self, dtype) -> "TensorRef":
        return self._with(self.shape, ("astype", dtype))

    def replay(self, out, transpose, cast):
        """``out`` (the base tensor as a backend read it) with the recorded ops applied in order; the backend gives
        ``transpose(out, axes)`` and ``cast(out, mx_dtype)`` (``reshape`` is spelled alike in numpy and torch)."""
        for op, arg in self.ops:
            if op == "transpose":
                out = transpose(out, arg)
            elif op == "reshape":
                out = out.reshape(arg)
            else:
                out = cast(out, arg)
        return out

    def __array__(self, dtype=None, copy=None):
        out = read_numpy(self)
        return out if dtype is None else out.astype(dtype)


def tensor_refs(path: Path) -> dict[str, TensorRef]:
    """Every tensor of a safetensors file as a :class:`TensorRef` (only the header is read)."""
    path = Path(path)
    return {
        name: TensorRef(e["shape"], StoredTensor(path, name, e["dtype"], e["shape"], e["offset"], e["nbytes"]))
        for name, e in safetensors_header(path).items()
    }


def read_stored_numpy(stored: StoredTensor) -> np.ndarray:
    """A stored tensor read into memory as numpy (bfloat16 widened exactly to float32)."""
    raw = np.fromfile(stored.path, dtype=np.uint8, count=stored.nbytes, offset=stored.offset)
    out = raw.view(SAFETENSORS_NUMPY[stored.dtype]).reshape(stored.shape)
    return (out.astype(np.uint32) << 16).view(np.float32) if stored.dtype == "BF16" else out


_NUMPY_FROM_MX = {mx.float32: np.float32, mx.float16: np.float16, mx.bfloat16: np.float32}


def read_numpy(ref: TensorRef) -> np.ndarray:
    """Read a :class:`TensorRef` with numpy and replay its ops (for the small tensors sanitizers inspect)."""
    if isinstance(ref.base, WeightNormFold):
        g, v = (read_numpy(r).astype(np.float32) for r in (ref.base.g, ref.base.v))
        norm = np.sqrt(np.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
        out = g.reshape(norm.shape) * v / norm
    else:
        out = read_stored_numpy(ref.base)
    return ref.replay(out, np.transpose, lambda a, dtype: a.astype(_NUMPY_FROM_MX.get(dtype, np.float32)))


def fold_weight_norm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace every ``X.weight_g`` / ``X.weight_v`` pair by ``X.weight = g * v / ||v||`` (norm over all but dim 0).

    Done once at load time in float32, so the model never pays for weight norm at run time. On
    :class:`TensorRef` values (the torch backend's load path) the fold is recorded and done by the reading backend.
    """
    out = {}
    for key, value in weights.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            stem = key[: -len(".weight_g")]
            v_key = stem + ".weight_v"
            if v_key not in weights:
                raise CheckpointError(f"{key} has no matching {v_key}")
            if isinstance(value, TensorRef):
                out[stem + ".weight"] = TensorRef.weight_norm(value, weights[v_key])
                continue
            v = weights[v_key].astype(mx.float32)
            g = value.astype(mx.float32)
            norm = mx.sqrt(mx.sum(v * v, axis=tuple(range(1, v.ndim)), keepdims=True))
            out[stem + ".weight"] = g.reshape(norm.shape) * v / norm
        else:
            out[key] = value
    orphans = [k for k in weights if k.endswith(".weight_v") and k[:-1] + "g" not in weights]
    if orphans:
        raise CheckpointError(f"weight_v without weight_g: {', '.join(sorted(orphans))}")
    return out


def check_strict(expected: Mapping[str, tuple], got: Mapping[str, mx.array], what: str) -> None:
    """Raise one CheckpointError naming every missing, unexpected and wrongly shaped tensor."""
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(
        f"{k} (checkpoint {tuple(got[k].shape)}, model {tuple(expected[k])})"
        for k in set(expected) & set(got)
        if tuple(got[k].shape) != tuple(expected[k])
    )
    problems = []
    if missing:
        problems.append(f"missing {len(missing)}: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)}: {', '.join(unexpected)}")
    if wrong:
        problems.append(f"wrong shape {len(wrong)}: {', '.join(wrong)}")
    if problems:
        raise CheckpointError(f"{what} does not match the model; " + "; ".join(problems))


def expected_shapes(module) -> dict[str, tuple]:
    """Parameter shapes of an MLX module (MLX initialises lazily: even a full-size module costs nothing here)."""
    from mlx.utils import tree_flatten

    return {k: tuple(v.shape) for k, v in tree_flatten(module.parameters())}


def sanitize_checked(weights: dict, sanitize, module, what: str) -> dict:
    """The one strict load path: ``sanitize`` (None: names are already mlx_sa3's), then a strict check naming every
    missing, unexpected and wrongly shaped tensor against the MLX ``module``. Returns the sanitized dict."""
    out = weights if sanitize is None else sanitize(weights)
    check_strict(expected_shapes(module), out, what)
    return out


def component_weights(source: "Source", name: str, sanitize, module, what: str, refs: bool = False) -> dict:
    """A component's tensors in mlx_sa3 naming, strictly checked (converted checkpoints are not sanitized again).

    With ``refs`` the values are :class:`TensorRef` (nothing but headers read; the torch backend reads them).
    """
    tensors = source.component(name, refs=refs)
    return sanitize_checked(tensors, None if source.converted else sanitize, module, what)


def check_float_audio(x, what: str = "audio") -> None:
    """Refuse integer (PCM) or bool arrays where float samples in [-1, 1] are meant: a cast would keep 32767x full
    scale. numpy, MLX, torch and anything numpy converts."""
    if isinstance(x, mx.array):
        floating = mx.issubdtype(x.dtype, mx.floating)
    elif callable(getattr(x, "is_floating_point", None)):  # a torch tensor, without importing torch
        floating = x.is_floating_point()
    else:
        floating = np.asarray(x).dtype.kind == "f"
    if not floating:
        raise ValueError(
            f"{what} must be floating point in [-1, 1]; integer PCM must be scaled first "
            "(mlx_sa3.load_audio_input and read_audio do it)"
        )


def to_mx(x, dtype=mx.float32) -> mx.array:
    """Accept numpy or MLX input (or anything numpy converts) and return an MLX array, cast to ``dtype`` if given."""
    if not isinstance(x, mx.array):
        arr = np.ascontiguousarray(x)  # MLX cannot take negative-stride views
        if arr.dtype == np.float64:  # float64 has no Metal support: never let it into the model
            arr = arr.astype(np.float32)
        x = mx.array(arr)
    return x if dtype is None else x.astype(dtype)


BACKENDS = ("mlx", "torch")


def check_backend(backend: str, also: tuple = ()) -> None:
    """``backend`` must be one of BACKENDS; ``also``: other names the caller resolved before, listed in the message."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join((*also, *BACKENDS))}")


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(dtype) -> mx.Dtype | None:
    """``None`` / "float16" / mx.float16 -> mx dtype (None stays None: the caller picks its default)."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


def dtype_name(dtype) -> str:
    """``mx.float32`` / ``torch.bfloat16`` / "float16" -> "float32" / "bfloat16" / "float16" (for messages)."""
    return str(dtype).rpartition(".")[2]


# Prefixes of each component inside a full SA3 ``model.safetensors`` (official ConditionedDiffusionModelWrapper).
SA3_PREFIXES = {
    "dit": "model.model.",
    "autoencoder": "pretransform.model.",
    "conditioners": "conditioner.conditioners.",
}
CONVERTED_FORMAT = "mlx_sa3"
TEXT_ENCODER_SUBFOLDER = "t5gemma-b-b-ul2"
CONVERTED_TEXT_ENCODER_DIR = "text_encoder"  # T5Gemma config.json + tokenizer files of a converted checkpoint


@dataclass
class Source:
    """A checkpoint on disk in one of the layouts mlx_sa3 reads.

    ``layout`` is "sa3" (full Hub repo: model_config.json + model.safetensors + t5gemma subfolder), "same"
    (SAME-only Hub repo) or "converted" (written by convert.py; tensors already in mlx_sa3 naming).
    ``model_config`` is always the original Hub ``model_config.json`` content.
    """

    root: Path
    layout: str
    model_config: dict
    meta: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict, repr=False)  # parsed configs (mlx_sa3.checkpoint.checkpoint_config)

    @property
    def converted(self) -> bool:
        return self.layout == "converted"

    @property
    def autoencoder_only(self) -> bool:
        """A SAME autoencoder alone: its Hub repo, or convert.py's conversion of one."""
        return self.model_config.get("model_type") == "autoencoder"

    def component(self, name: str, refs: bool = False) -> dict[str, mx.array]:
        """Tensors of one component: Hub names with the component prefix removed, or converted names as stored.

        MLX arrays (lazy), or with ``refs`` :class:`TensorRef` values (only the headers are read).
        """
        read = tensor_refs if refs else load_safetensors
        if self.converted:
            files = self.meta.get("components", {})
            if name not in files:
                raise CheckpointError(f"{self.root}: converted checkpoint has no {name} component")
            return read(self.root / files[name])
        if self.layout == "same":
            if name != "autoencoder":
                raise CheckpointError(f"{self.root} is a SAME autoencoder repo; it has no {name}")
            return read(self.root / "model.safetensors")
        if name == "text_encoder":
            return read(self.text_encoder_dir() / "model.safetensors")
        prefix = SA3_PREFIXES[name]
        tensors = self._sa3_tensors(read)
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    def text_encoder_dir(self) -> Path:
        """Directory with the T5Gemma config, tokenizer and (for Hub layouts) weights."""
        return self.root / (CONVERTED_TEXT_ENCODER_DIR if self.converted else TEXT_ENCODER_SUBFOLDER)

    def _sa3_tensors(self, read=load_safetensors) -> dict[str, mx.array]:
        # Read the (lazy, memory-mapped) file each time rather than caching the arrays: a cached dict would keep
        # every loaded component's buffers alive after the model released it. Tensors placed in meta["_tensors"]
        # (tests inject edited ones there) are used as given.
        if "_tensors" in self.meta:
            return self.meta["_tensors"]
        return read(self.root / "model.safetensors")


def _check_converted_meta(path: Path, meta: dict) -> None:
    """A converted checkpoint's config.json: its model_config and its component files (relative, inside the folder)."""
    if not isinstance(meta.get("model_config"), dict):
        raise CheckpointError(f"{path}: no model_config object; convert the checkpoint again")
    components = meta.get("components", {})
    plain = isinstance(components, dict) and all(
        isinstance(name, str) and isinstance(file, str) and _inside(file) for name, file in components.items()
    )
    if not plain:
        raise CheckpointError(f"{path}: components must map names to file names in its folder; convert it again")


def _inside(file: str) -> bool:
    parts = Path(file).parts
    return bool(parts) and not Path(file).is_absolute() and ".." not in parts


def open_source(src, allow_patterns: Iterable[str] | None = None) -> Source:
    """Locate ``src`` (directory or repo id) and tell which layout it is in."""
    root = resolve_source(src, allow_patterns)
    meta_path = root / "config.json"
    if meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("format") == CONVERTED_FORMAT:
            _check_converted_meta(meta_path, meta)
            return Source(root, "converted", meta["model_config"], meta)
    for pickle_file in (root / f"model{s}" for s in PICKLE_SUFFIXES):
        if pickle_file.exists() and not (root / "model.safetensors").exists():
            refuse_pickle(pickle_file)
    config = read_json(root / "model_config.json")
    model_type = config.get("model_type")
    if model_type == "autoencoder":
        return Source(root, "same", config)
    if model_type in ("diffusion_cond", "diffusion_cond_inpaint"):
        return Source(root, "sa3", config)
    raise CheckpointError(f"{root}/model_config.json: unsupported model_type {model_type!r}")
