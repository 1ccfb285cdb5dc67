"""Streaming safetensors I/O of the converter: header validation, sharded folders, a tensor-at-a-time writer."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from ..loading import PICKLE_SUFFIXES, CheckpointError, load_safetensors, read_json, refuse_pickle

_ST_DTYPES = {  # MLX dtype -> (safetensors name, bytes per element)
    mx.float32: ("F32", 4),
    mx.float16: ("F16", 2),
    mx.bfloat16: ("BF16", 2),
    mx.float64: ("F64", 8),
    mx.int64: ("I64", 8),
    mx.int32: ("I32", 4),
    mx.int16: ("I16", 2),
    mx.int8: ("I8", 1),
    mx.uint64: ("U64", 8),
    mx.uint32: ("U32", 4),
    mx.uint16: ("U16", 2),
    mx.uint8: ("U8", 1),
    mx.bool_: ("BOOL", 1),
}
_ST_ITEMSIZE = {name: size for name, size in _ST_DTYPES.values()} | {"F8_E4M3": 1, "F8_E5M2": 1}
_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit; a larger value means a corrupt file


# --------------------------------------------------------------------------------------------- safetensors files


def read_safetensors_header(path: Path) -> dict[str, dict]:
    """Parse and validate a safetensors header without reading tensor data.

    Raises CheckpointError for a file that is truncated, has a corrupt header or inconsistent offsets, so that a
    damaged download is reported before any conversion work (MLX would only notice when a tensor is read).
    """
    refuse_pickle(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(prefix, "little")
        if header_len > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{path}: truncated or not a safetensors file (header of {header_len} bytes in a {size}-byte file)"
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{path}: corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    header.pop("__metadata__", None)
    data_bytes = size - 8 - header_len
    for name, info in header.items():
        try:
            begin, end = info["data_offsets"]
            expected = math.prod(info["shape"]) * _ST_ITEMSIZE[info["dtype"]]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt safetensors header entry for {name!r}") from None
        if end > data_bytes:
            raise CheckpointError(
                f"{path}: truncated: tensor {name} ends at byte {end} of the data section, "
                f"which holds only {data_bytes} bytes"
            )
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: corrupt safetensors header: {name} {info['dtype']} {info['shape']} "
                f"needs {expected} bytes, offsets give {end - begin}"
            )
    return header


def write_safetensors(
    path: Path,
    tensors: dict[str, mx.array],
    metadata: dict[str, str] | None = None,
    on_tensor: Callable[[str], None] | None = None,
) -> int:
    """Write ``tensors`` to ``path`` one at a time and return the file size. ``tensors`` is emptied.

    ``mx.save_safetensors`` evaluates every array before writing; here the header is built from the (lazy) arrays'
    shapes and dtypes, then each array is evaluated, written and dropped in turn, so a lazily loaded or lazily
    computed checkpoint never sits in memory as a whole. ``on_tensor`` is called with each name before it is written.
    """
    names = sorted(tensors)
    header: dict[str, dict] = {}
    offset = 0
    for name in names:
        value = tensors[name]
        if value.dtype not in _ST_DTYPES:
            raise CheckpointError(f"{name}: dtype {value.dtype} cannot be stored in safetensors")
        st_name, itemsize = _ST_DTYPES[value.dtype]
        nbytes = value.size * itemsize
        header[name] = {"dtype": st_name, "shape": list(value.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header = {"__metadata__": dict(metadata), **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the safetensors convention: data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            if on_tensor is not None:
                on_tensor(name)
            _write_tensor(f, name, tensors.pop(name), header[name]["data_offsets"])
        f.flush()
        os.fsync(f.fileno())
    return 8 + len(blob) + offset


def _write_tensor(f, name: str, value: mx.array, offsets: list[int]) -> None:
    value = mx.contiguous(value)
    if value.dtype == mx.bfloat16:  # numpy has no bfloat16: write its bits
        value = value.view(mx.uint16)
    mx.eval(value)
    data = np.ascontiguousarray(np.asarray(value))
    if data.nbytes != offsets[1] - offsets[0]:
        raise CheckpointError(f"{name}: wrote {data.nbytes} bytes, header promises {offsets[1] - offsets[0]}")
    f.write(data.data if data.size else b"")
    del value, data
    mx.clear_cache()  # hand the buffer back now instead of growing MLX's cache with every tensor size


def load_folder_weights(folder: Path, filename: str) -> dict[str, mx.array]:
    """Every tensor of ``folder/filename``, or of the shards listed in ``folder/filename.index.json``.

    Headers are validated first; the tensors stay lazy. transformers and diffusers shard large checkpoints this way.
    """
    index_path = folder / f"{filename}.index.json"
    if not (folder / filename).exists() and not index_path.exists():
        for pickle_file in (folder / (Path(filename).stem + suffix) for suffix in PICKLE_SUFFIXES):
            if pickle_file.exists():
                refuse_pickle(pickle_file)
    if (folder / filename).exists() or not index_path.exists():
        read_safetensors_header(folder / filename)
        return load_safetensors(folder / filename)
    weight_map = read_json(index_path).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index_path}: no weight_map")
    tensors: dict[str, mx.array] = {}
    for shard in sorted(set(weight_map.values())):
        read_safetensors_header(folder / shard)
        tensors |= load_safetensors(folder / shard)
    if set(tensors) != set(weight_map):
        raise CheckpointError(f"{index_path}: the shards do not hold exactly the tensors the index lists")
    return tensors


def verify_safetensors(path: Path, expected: dict[str, tuple[tuple, mx.Dtype]]) -> None:
    """Check a written file with both readers: the ``safetensors`` library and ``mx.load`` (names, shapes, dtypes)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        st = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    loaded = load_safetensors(path)  # lazy: nothing is read
    got = {k: (tuple(v.shape), v.dtype) for k, v in loaded.items()}
    if st != {k: shape for k, (shape, _) in expected.items()} or got != expected:
        raise CheckpointError(f"{path}: verification failed, the written file does not match what was converted")
