"""Tensor-name maps between the official (Hub) layout, mlx_sa3's module names and diffusers', in one place.

The MLX sanitizers (``dit.sanitize``, ``same.sanitize``, ``t5gemma.sanitize``) map official names to mlx_sa3 names.
Here: diffusers -> official (the converter's diffusers import), mlx_sa3 -> diffusers (the torch backend, which runs
diffusers' modules), and the fused self-attention row orders of both layouts, as row permutations that work on
any array type (``weight[perm]`` in torch, ``mx.take(weight, perm, 0)`` in MLX).
"""

from __future__ import annotations

import re

import numpy as np

# Fused differential self-attention projections: the checkpoint stores [q|k|v|q2|k2], diffusers [q1|q2|k1|k2|v].
OFFICIAL_QKV = ("q", "k", "v", "q2", "k2")
DIFFUSERS_QKV = ("q", "q2", "k", "k2", "v")


def _qkv_permutation(rows: int, source: tuple, target: tuple) -> np.ndarray:
    chunk = rows // len(source)
    return np.concatenate([np.arange(chunk) + source.index(name) * chunk for name in target])


def official_to_diffusers_qkv(rows: int) -> np.ndarray:
    """Row permutation taking a fused ``[q|k|v|q2|k2]`` weight of ``rows`` rows to diffusers' order."""
    return _qkv_permutation(rows, OFFICIAL_QKV, DIFFUSERS_QKV)


def diffusers_to_official_qkv(rows: int) -> np.ndarray:
    """Row permutation taking a diffusers ``[q1|q2|k1|k2|v]`` weight back to the official order."""
    return _qkv_permutation(rows, DIFFUSERS_QKV, OFFICIAL_QKV)


# -- diffusers -> official Hub names (the converter's diffusers import)

DIT_FROM_DIFFUSERS = [
    (re.compile(r"^proj_(in|out)\."), r"transformer.project_\1."),
    (re.compile(r"^(memory_tokens$|global_cond_embedder\.|rotary_pos_emb\.)"), r"transformer.\1"),
    (re.compile(r"^transformer_blocks\.(\d+)\."), r"transformer.layers.\1."),
    (re.compile(r"\.ff\.proj_in\."), ".ff.ff.0.proj."),
    (re.compile(r"\.ff\.proj_out\."), ".ff.ff.2."),
]
# diffusers' AutoencoderSAME: encoder = blocks + proj, decoder = proj + blocks; the official Sequentials number
# their modules with the parameter-free transposes in between.
SAME_FROM_DIFFUSERS = [
    (re.compile(r"^encoder\.blocks\.0\."), "encoder.layers.0."),
    (re.compile(r"^encoder\.proj\."), "encoder.layers.2."),
    (re.compile(r"^decoder\.proj\."), "decoder.layers.1."),
    (re.compile(r"^decoder\.blocks\.0\."), "decoder.layers.3."),
    (re.compile(r"\.norm_attn\."), ".pre_norm."),
    (re.compile(r"\.norm_ff\."), ".ff_norm."),
    (re.compile(r"\.attn\."), ".self_attn."),
    (re.compile(r"\.ff\.proj_in\."), ".ff.ff.0.proj."),
    (re.compile(r"\.ff\.proj_out\."), ".ff.ff.2."),
    (re.compile(r"^bottleneck\.scale$"), "bottleneck.scaling_factor"),
]


def rename(key: str, renames) -> str:
    for pattern, replacement in renames:
        key = pattern.sub(replacement, key)
    return key


# -- mlx_sa3 names -> diffusers module names (the torch backend)

_SAME_TO_DIFFUSERS_BLOCKS = (
    (".attn_norm.", ".norm_attn."),
    (".ff_norm.", ".norm_ff."),
    (".attn.qkv.", ".attn.to_qkv."),
    (".attn.out.", ".attn.to_out."),
)
_DIT_MLP_NAMES = ("to_timestep_embed", "to_cond_embed", "to_global_embed", "global_cond_embedder", "to_local_embed")


def same_key_to_diffusers(key: str) -> str:
    """An mlx_sa3 SAME parameter name -> the name inside diffusers' ``TransformerBlock`` (containers keep theirs)."""
    for old, new in _SAME_TO_DIFFUSERS_BLOCKS:
        key = key.replace(old, new)
    return key


def dit_key_to_diffusers(key: str) -> str:
    """An mlx_sa3 DiT parameter name -> the ``StableAudio3DiTModel`` name."""
    key = key.replace("layers.", "transformer_blocks.", 1) if key.startswith("layers.") else key
    key = {"project_in.weight": "proj_in.weight", "project_out.weight": "proj_out.weight"}.get(key, key)
    for name in _DIT_MLP_NAMES:
        key = key.replace(f"{name}.fc1.", f"{name}.0.").replace(f"{name}.fc2.", f"{name}.2.")
    if key.endswith("norm.weight"):
        key = key[: -len("weight")] + "gamma"
    return key
