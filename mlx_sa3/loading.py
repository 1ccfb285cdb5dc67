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


class CheckpointError(ValueError):
    """A checkpoint does not match the model: missing, unexpected or wrongly shaped tensors, or a bad file."""


PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")


def resolve_source(src: str | os.PathLike, allow_patterns: Iterable[str] | None = None) -> Path:
    """Return a local directory for ``src``: an existing directory, or a Hub repo id downloaded into the HF cache."""
    path = Path(src).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise CheckpointError(f"{src} is a file; pass the directory that holds model_config.json / config.json")
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


def read_json(path: Path) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


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


def fold_weight_norm(weights: dict[str, mx.array]) -> dict[str, mx.array]:
    """Replace every ``X.weight_g`` / ``X.weight_v`` pair by ``X.weight = g * v / ||v||`` (norm over all but dim 0).

    Done once at load time in float32, so the model never pays for weight norm at run time.
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


def component_weights(source: "Source", name: str, sanitize, module, what: str) -> dict:
    """A component's tensors in mlx_sa3 naming, strictly checked (converted checkpoints are not sanitized again)."""
    return sanitize_checked(source.component(name), None if source.converted else sanitize, module, what)


def to_mx(x, dtype=mx.float32) -> mx.array:
    """Accept numpy or MLX input (or anything numpy converts) and return an MLX array, cast to ``dtype`` if given."""
    if not isinstance(x, mx.array):
        arr = np.ascontiguousarray(x)  # MLX cannot take negative-stride views
        if arr.dtype == np.float64:  # float64 has no Metal support: never let it into the model
            arr = arr.astype(np.float32)
        x = mx.array(arr)
    return x if dtype is None else x.astype(dtype)


BACKENDS = ("mlx", "torch")


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def parse_dtype(dtype) -> mx.Dtype | None:
    """``None`` / "float16" / mx.float16 -> mx dtype (None stays None: the caller picks its default)."""
    if dtype is None or isinstance(dtype, mx.Dtype):
        return dtype
    if str(dtype) not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[str(dtype)]


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

    def component(self, name: str) -> dict[str, mx.array]:
        """Tensors of one component: Hub names with the component prefix removed, or converted names as stored."""
        if self.converted:
            files = self.meta.get("components", {})
            if name not in files:
                raise CheckpointError(f"{self.root}: converted checkpoint has no {name} component")
            return load_safetensors(self.root / files[name])
        if self.layout == "same":
            if name != "autoencoder":
                raise CheckpointError(f"{self.root} is a SAME autoencoder repo; it has no {name}")
            return load_safetensors(self.root / "model.safetensors")
        if name == "text_encoder":
            return load_safetensors(self.text_encoder_dir() / "model.safetensors")
        prefix = SA3_PREFIXES[name]
        tensors = self._sa3_tensors()
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    def text_encoder_dir(self) -> Path:
        """Directory with the T5Gemma config, tokenizer and (for Hub layouts) weights."""
        return self.root / (CONVERTED_TEXT_ENCODER_DIR if self.converted else TEXT_ENCODER_SUBFOLDER)

    def _sa3_tensors(self) -> dict[str, mx.array]:
        if "_tensors" not in self.meta:
            self.meta["_tensors"] = load_safetensors(self.root / "model.safetensors")
        return self.meta["_tensors"]


def open_source(src, allow_patterns: Iterable[str] | None = None) -> Source:
    """Locate ``src`` (directory or repo id) and tell which layout it is in."""
    root = resolve_source(src, allow_patterns)
    meta_path = root / "config.json"
    if meta_path.exists():
        meta = read_json(meta_path)
        if meta.get("format") == CONVERTED_FORMAT:
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
