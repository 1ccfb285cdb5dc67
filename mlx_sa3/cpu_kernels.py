"""Which OpenBLAS kernel set to ask for on this CPU (``OPENBLAS_CORETYPE``), decided from the CPU flags.

A DYNAMIC_ARCH OpenBLAS picks its kernels by CPU model at load time. Releases older than the CPU fall back to old
generic kernels on models they do not know (Debian's 0.3.21 on Sapphire-Rapids-class Xeons in some environments:
20-40 GFLOP/s instead of 140-300), and a workplace may pin an old core type on purpose. The kernels an x86 CPU can
run follow from its instruction-set flags, so the choice here is made from those, never from the model number:

========================  =======================================  ===================
flags (all present)       kernel set                               OpenBLAS release
========================  =======================================  ===================
avx512f/bw/vl/dq/cd       ``SkylakeX`` (AVX-512 FP32/FP64 GEMM)     >= 0.3.10
 + avx512_bf16            ``Cooperlake`` (SkylakeX + BF16 GEMM)     >= 0.3.10
avx2 + fma                ``Haswell``                              any
avx                       ``Sandybridge``                          any
========================  =======================================  ===================

Older or unknown releases never get an AVX-512 kernel set (early 0.3.x AVX-512 kernels had wrong-result bugs);
they get ``Haswell`` at most. ``SapphireRapids`` (AMX) is not chosen: its FP32 GEMM is the Cooperlake one and it
only exists from 0.3.22. The caller must leave a user's own ``OPENBLAS_CORETYPE`` alone and set the variable only
around loading the library (OpenBLAS reads it once, at load), so other OpenBLAS copies, e.g. numpy's, are not
affected.
"""

from __future__ import annotations

import os
import re

AVX512_BASE = frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})
FIRST_SAFE_AVX512 = (0, 3, 10)


def parse_version(text: str | None) -> tuple[int, ...] | None:
    """(0, 3, 21) from "0.3.21", "OpenBLAS 0.3.21 DYNAMIC_ARCH ..." or "libopenblasp-r0.3.21.so"; None if absent."""
    if not text:
        return None
    match = re.search(r"(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(g) for g in match.groups()) if match else None


def choose_openblas_coretype(cpu_flags: set[str], openblas_version: str | None) -> str | None:
    """The OPENBLAS_CORETYPE that runs this CPU's best safe FP32 kernels, or None to leave OpenBLAS's choice.

    ``cpu_flags`` are the ``flags`` of /proc/cpuinfo (x86; any other architecture gives None),
    ``openblas_version`` the library's version string (None when unknown).
    """
    flags = {f.lower() for f in cpu_flags}
    version = parse_version(openblas_version)
    if AVX512_BASE <= flags and version is not None and version >= FIRST_SAFE_AVX512:
        return "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    if "avx" in flags:
        return "Sandybridge"
    return None


def _cpuinfo_value(field: str, cpuinfo: str) -> str | None:
    """The value of ``field`` for the first CPU in /proc/cpuinfo (None where it has none)."""
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """The instruction-set flags the kernel reports for the first CPU (empty where /proc/cpuinfo has none)."""
    return set((_cpuinfo_value("flags", cpuinfo) or "").split())


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str | None:
    """The first CPU's model name as the kernel reports it (None where /proc/cpuinfo has none)."""
    return _cpuinfo_value("model name", cpuinfo)


def openblas_version_from_path(path: str) -> str | None:
    """The version in an OpenBLAS library's real file name (Debian: libopenblasp-r0.3.21.so), without loading it.

    Loading it to ask would fix its kernels before OPENBLAS_CORETYPE could be set.
    """
    version = parse_version(os.path.basename(os.path.realpath(path)))
    return ".".join(map(str, version)) if version else None
