"""LoRA on the command line: ``python -m mlx_sa3.generate --lora`` and ``python convert.py --lora`` (merged export).

The generation tests run the tiny fixture checkpoint end to end and read the written files back. The export test
converts the fixture with two LoRAs merged in and checks the converted model, loaded without any LoRA, against the
official stacked-LoRA outputs in lora.npz at the parity tolerance of tests/test_lora.py.
"""

import hashlib
import json
import os
import shutil

import mlx_sa3
from mlx_sa3 import generate, lora
from mlx_sa3.convert import main as convert_main

import numpy as np
import pytest
import soundfile as sf

from .conftest import REF
from .test_lora import assert_matches, lora_file, outputs

FIXTURE = "sa3_small_tiny_s0"


def run_generate(out, *extra):
    argv = ["--model", str(REF / FIXTURE), "-p", "warm pad", "--duration", "1", "--steps", "2", "--seed", "7"]
    return generate.main([*argv, "--quiet", "--dtype", "float32", "-o", str(out), *map(str, extra)])


def read(path):
    data, _ = sf.read(path, dtype="float32", always_2d=True)
    return data


@pytest.fixture(scope="module")
def base_audio(tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base.wav"
    assert run_generate(out) == 0
    return read(out)


def test_generate_with_lora_changes_output_and_is_deterministic(tmp_path, base_audio):
    first, second = tmp_path / "a.wav", tmp_path / "b.wav"
    assert run_generate(first, "--lora", lora_file(FIXTURE, "lora_r4")) == 0
    assert run_generate(second, "--lora", lora_file(FIXTURE, "lora_r4")) == 0
    with_lora = read(first)
    np.testing.assert_array_equal(with_lora, read(second))  # same seed, same file: the same samples
    assert with_lora.shape == base_audio.shape
    assert np.max(np.abs(with_lora - base_audio)) > 1e-3 * np.max(np.abs(base_audio))


def test_strength_zero_equals_no_lora(tmp_path, base_audio):
    """Bit-identical: at strength 0 no adapter acts, and the DiT gets back its original arrays (not recomputed)."""
    out = tmp_path / "s0.wav"
    assert run_generate(out, "--lora", lora_file(FIXTURE, "lora_r4"), "--lora-strength", "0") == 0
    np.testing.assert_array_equal(read(out), base_audio)


def test_interval_is_applied(tmp_path, base_audio):
    """A sigma interval no step reaches leaves the DiT unadapted (bit-identical to no LoRA); without it the same
    file changes the output. This file adapts DiT layers only: the interval never gates the seconds conditioner
    (official), so a LoRA adapting it would still act there."""
    inside, outside = tmp_path / "inside.wav", tmp_path / "outside.wav"
    dit_only = lora_file(FIXTURE, "dora_rows_filtered")
    assert run_generate(inside, "--lora", dit_only, "--lora-interval", "0,1") == 0
    assert run_generate(outside, "--lora", dit_only, "--lora-interval", "2,3") == 0
    np.testing.assert_array_equal(read(outside), base_audio)
    assert np.max(np.abs(read(inside) - base_audio)) > 1e-3 * np.max(np.abs(base_audio))


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--lora-strength", "0.5"], "without --lora"),
        (["--lora", "{lora}", "--lora-strength", "1", "--lora-strength", "2"], "2 --lora-strength for 1 --lora"),
        (["--lora", "{lora}", "--lora", "{lora}", "--lora", "{lora}"] + ["--lora-interval", "0,1"] * 2, "give one"),
        (["--lora", "{lora}", "--lora-interval", "0.9,0.1"], "LO <= HI"),
        (["--lora", "{lora}", "--lora-interval", "half"], "expected LO,HI"),
        (["--lora", "{missing}"], "no such LoRA file"),
        (["--lora", "{folder}"], "is a directory, not a LoRA file"),
        (["--lora", "{fifo}"], "is a FIFO (named pipe), not a LoRA file"),
        (["--lora", "{pickle}"], "pickle"),
        (["--lora", "{zip}"], "pickle"),
        (["--lora", "{truncated}"], "truncated"),
    ],
)
def test_bad_lora_arguments_refused_before_loading(tmp_path, capsys, extra, message):
    good = lora_file(FIXTURE, "lora_r4")
    (tmp_path / "old.ckpt").write_bytes(b"\x80\x04junk")
    (tmp_path / "zip.safetensors").write_bytes(b"PK\x03\x04junk")
    (tmp_path / "cut.safetensors").write_bytes(good.read_bytes()[:2000])
    (tmp_path / "folder.safetensors").mkdir()
    os.mkfifo(tmp_path / "pipe.safetensors")
    names = {
        "lora": good,
        "missing": tmp_path / "absent.safetensors",
        "folder": tmp_path / "folder.safetensors",
        "fifo": tmp_path / "pipe.safetensors",
        "pickle": tmp_path / "old.ckpt",
        "zip": tmp_path / "zip.safetensors",
        "truncated": tmp_path / "cut.safetensors",
    }
    extra = [e.format(**names) for e in extra]
    out = tmp_path / "never.wav"
    # a model that does not exist: these errors must come before any loading
    code = generate.main(["--model", str(tmp_path / "no-model"), "-p", "x", "--quiet", "-o", str(out), *extra])
    err = capsys.readouterr().err
    assert code == 2 and not out.exists()
    assert message in err and err.startswith("error: ") and err.count("\n") == 1, err


def test_lora_spec_parsing(tmp_path):
    assert lora.parse_lora_spec("a.safetensors") == ("a.safetensors", 1.0)
    assert lora.parse_lora_spec("a.safetensors:0.8") == ("a.safetensors", 0.8)
    assert lora.parse_lora_spec("dir:v2/a.safetensors") == ("dir:v2/a.safetensors", 1.0)
    assert lora.parse_lora_spec("dir:v2/a.safetensors:-0.5") == ("dir:v2/a.safetensors", -0.5)
    assert lora.parse_lora_spec("C:\\loras\\a.safetensors") == ("C:\\loras\\a.safetensors", 1.0)
    with pytest.raises(ValueError, match="finite"):
        lora.parse_lora_spec("a.safetensors:nan")
    # a typo in the strength of a file that exists is named as such, not as a missing file
    (tmp_path / "b.safetensors").touch()
    with pytest.raises(ValueError, match="strength 'x8' is not a number"):
        lora.parse_lora_spec(f"{tmp_path}/b.safetensors:x8")
    # while a file whose name has ':' and a non-numeric tail is still the whole path
    (tmp_path / "c.safetensors:v2").touch()
    assert lora.parse_lora_spec(f"{tmp_path}/c.safetensors:v2") == (f"{tmp_path}/c.safetensors:v2", 1.0)


@pytest.mark.parametrize("backend", ["mlx", "torch"])
def test_merged_export_reproduces_lora_outputs(tmp_path_factory, backend):
    if backend == "torch":
        pytest.importorskip("torch")
    work = tmp_path_factory.mktemp("export")
    folder = work / "loras:v1"  # a ':' in the path: only a trailing ':<number>' is a strength
    folder.mkdir()
    files = [shutil.copy(lora_file(FIXTURE, name), folder) for name in ("lora_r4", "bora")]
    out = work / "merged"
    assert convert_main([str(REF / FIXTURE), str(out), "--lora", f"{files[0]}:0.8", "--lora", f"{files[1]}:0.4"]) == 0

    record = json.loads((out / "config.json").read_text())["loras"]
    expected = [("lora_r4.safetensors", "lora", 4, 8.0, 0.8), ("bora.safetensors", "bora", 4, 8.0, 0.4)]
    assert [(r["file"], r["adapter_type"], r["rank"], r["alpha"], r["strength"]) for r in record] == expected
    assert [r["sha256"] for r in record] == [hashlib.sha256(open(f, "rb").read()).hexdigest() for f in files]

    model = mlx_sa3.load_model(out, dtype="float32", backend=backend)
    assert model.loras == []
    ref = dict(np.load(REF / FIXTURE / "lora.npz"))
    io = dict(np.load(REF / FIXTURE / "io.npz"))
    assert_matches(outputs(model, io), ref, "stack_lora_bora")


def test_export_refuses_bad_lora_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "merged"
    code = convert_main([str(REF / FIXTURE), str(out), "--lora", str(tmp_path / "absent.safetensors:0.5")])
    err = capsys.readouterr().err
    assert code == 2 and "absent.safetensors: no such LoRA file" in err and err.count("\n") == 1
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_export_refuses_lora_for_another_model(tmp_path, capsys):
    out = tmp_path / "merged"
    medium = REF / "sa3_medium_tiny_s0" / "lora" / "lora_r4.safetensors"
    code = convert_main([str(REF / FIXTURE), str(out), "--lora", str(medium)])
    err = capsys.readouterr().err
    assert code == 2 and "lora_r4.safetensors: tensor model.transformer." in err
    assert list(tmp_path.iterdir()) == []


def test_release_keeps_a_lora_adapted_dit(ref_dir):
    """One-shot release must not drop LoRA weights: a reloaded DiT would be the base model without a word."""
    model = mlx_sa3.load_model(ref_dir / "sa3_small_tiny_s0", lazy=True)
    model.load_lora([ref_dir / "sa3_small_tiny_s0" / "lora" / "lora_r4.safetensors"])
    adapted = model.dit
    model.release("dit")
    assert model.dit is adapted
    model.unload_lora()
    model.release("dit")
    assert "dit" not in model.loaded
