"""mlx_sa3.cpu_kernels: the OPENBLAS_CORETYPE choice from CPU flags and the OpenBLAS version."""

from mlx_sa3.cpu_kernels import choose_openblas_coretype, cpu_flags, openblas_version_from_path, parse_version

import pytest

HASWELL = {"sse4_2", "avx", "avx2", "fma", "f16c"}
SKYLAKEX = HASWELL | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"}
COOPERLAKE = SKYLAKEX | {"avx512_bf16", "avx512_vnni"}
SAPPHIRE = COOPERLAKE | {"amx_bf16", "amx_int8", "amx_tile", "avx512_fp16"}


@pytest.mark.parametrize(
    ("flags", "version", "expected"),
    [
        (SAPPHIRE, "0.3.21", "Cooperlake"),
        (SAPPHIRE, "0.3.28", "Cooperlake"),  # AMX adds nothing to FP32 GEMM
        (COOPERLAKE, "0.3.21", "Cooperlake"),
        (SKYLAKEX, "0.3.21", "SkylakeX"),
        (SKYLAKEX, "0.3.10", "SkylakeX"),
        (SKYLAKEX, "0.3.9", "Haswell"),  # early AVX-512 kernels: not trusted
        (SKYLAKEX, None, "Haswell"),  # unknown release: not trusted either
        (SKYLAKEX - {"avx512vl"}, "0.3.21", "Haswell"),  # Xeon Phi style AVX-512 without VL/BW
        (HASWELL, "0.3.21", "Haswell"),
        (HASWELL - {"fma"}, "0.3.21", "Sandybridge"),
        ({"sse4_2", "avx"}, None, "Sandybridge"),
        ({"sse2", "sse4_2"}, "0.3.21", None),
        (set(), "0.3.21", None),  # not x86 (or no /proc/cpuinfo): leave OpenBLAS alone
        ({"fp", "asimd", "sve"}, "0.3.21", None),  # aarch64 flags
    ],
)
def test_choice(flags, version, expected):
    assert choose_openblas_coretype(flags, version) == expected


def test_flags_are_case_insensitive():
    assert choose_openblas_coretype({f.upper() for f in SKYLAKEX}, "0.3.21") == "SkylakeX"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.3.21", (0, 3, 21)),
        ("OpenBLAS 0.3.21 NO_LAPACKE DYNAMIC_ARCH NO_AFFINITY SkylakeX MAX_THREADS=64", (0, 3, 21)),
        ("libopenblasp-r0.3.21.so", (0, 3, 21)),
        ("libopenblas.so.0", None),
        (None, None),
        ("", None),
    ],
)
def test_parse_version(text, expected):
    assert parse_version(text) == expected


def test_version_from_the_library_file_name(tmp_path):
    real = tmp_path / "libopenblasp-r0.3.21.so"
    real.write_bytes(b"")
    link = tmp_path / "libopenblas.so.0"
    link.symlink_to(real.name)
    assert openblas_version_from_path(str(link)) == "0.3.21"
    plain = tmp_path / "libblas.so.3"
    plain.write_bytes(b"")
    assert openblas_version_from_path(str(plain)) is None


def test_cpu_flags_reader(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: X\nflags\t\t: fpu avx2 fma avx\n\nprocessor\t: 1\nflags\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx2", "fma", "avx"}
    assert cpu_flags(str(tmp_path / "missing")) == set()
