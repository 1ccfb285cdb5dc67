"""mlx_sa3.convert: converted checkpoints reproduce the official numbers, the real medium key structure maps
completely, and every refusal (pickle, damaged file, mismatched tensors, existing output, interruption) is clean."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from mlx_sa3 import convert as cv
from mlx_sa3.loading import CheckpointError, open_source
from mlx_sa3.model import load_model
from mlx_sa3.same import load_autoencoder

import mlx.core as mx
import numpy as np
import pytest

from .conftest import EPS, REF, SAME_TO_DIFFUSERS, half_tol, rel_err

SA3_FIXTURES = ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"]
SAME_FIXTURES = ["same_s_tiny_s0", "same_l_tiny_s0"]
TOL_F32 = 1e-4
# float16 / bfloat16 storage rounds every DiT / text-encoder weight by up to half an eps of the dtype; the outputs
# (computed in float32 from those weights) move by a few eps of it. The autoencoder stays float32 and matches tightly.
TOL_F16 = half_tol("float16")
TOL_BF16 = half_tol("bfloat16")
REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mlx_sa3.convert", *map(str, args)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if p.name.startswith(".")]


def copy_fixture(name: str, dst: Path) -> Path:
    shutil.copytree(REF / name, dst)
    for path in dst.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)  # the fixtures are read-only
    dst.chmod(0o755)
    return dst


def rewrite_weights(directory: Path, edit) -> None:
    """Rewrite ``directory/model.safetensors`` after ``edit(tensors)`` (a dict of MLX arrays) changed it."""
    path = directory / "model.safetensors"
    tensors = {k: mx.array(v) for k, v in mx.load(str(path)).items()}
    mx.eval(tensors)
    edit(tensors)
    cv.write_safetensors(path, tensors)


# -------------------------------------------------------------------------------------------- parity from the files


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """Every fixture converted in float32 and float16 (the SA3 ones also in bfloat16)."""
    root = tmp_path_factory.mktemp("converted")
    out = {}
    for name in SA3_FIXTURES + SAME_FIXTURES:
        for dtype in ("float32", "float16", "bfloat16") if name in SA3_FIXTURES else ("float32", "float16"):
            out[name, dtype] = cv.convert(REF / name, root / f"{name}-{dtype}", dtype=dtype)
    return out


def test_cli_entry_points_convert(tmp_path):
    proc = subprocess.run(
        [sys.executable, "convert.py", REF / "sa3_small_tiny_s0", tmp_path / "a"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "model.model.transformer.rotary_pos_emb.inv_freq" in proc.stdout  # the drop list is printed
    assert "decoder" in proc.stdout
    proc = run_cli(REF / "same_l_tiny_s0", tmp_path / "b", "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    assert open_source(tmp_path / "a").converted and open_source(tmp_path / "b").converted


@pytest.mark.parametrize("name", SA3_FIXTURES)
def test_converted_layout(converted, name):
    out = converted[name, "float16"]
    meta = json.loads((out / "config.json").read_text())
    assert meta["format"] == "mlx_sa3" and meta["version"] == 1 and meta["kind"] == "sa3"
    assert meta["dtype"] == "float16"
    assert meta["model_config"] == json.loads((REF / name / "model_config.json").read_text())
    assert meta["source"] == {"src": str((REF / name).resolve()), "revision": None}
    assert meta["components"] == cv.COMPONENT_FILES
    for name_, expected in [
        ("dit", mx.float16),
        ("text_encoder", mx.float16),
        ("autoencoder", mx.float32),
        ("conditioners", mx.float32),
    ]:
        dtypes = {v.dtype for v in mx.load(str(out / meta["components"][name_])).values()}
        assert dtypes == {expected}, name_
    te = out / "text_encoder"
    assert {"config.json", "tokenizer.model", "tokenizer_config.json"} <= {p.name for p in te.iterdir()}
    assert not (te / "model.safetensors").exists()
    # every dropped tensor is a RoPE buffer, the empty noise factor or the T5Gemma decoder half
    assert meta["dropped"], "nothing reported as dropped"
    for key in meta["dropped"]:
        assert re.search(r"inv_freq$|noise_scaling_factor$|model\.safetensors:decoder\.", key), key
    assert sum(":decoder." in k for k in meta["dropped"]) == sum(
        1 for k in mx.load(str(REF / name / "t5gemma-b-b-ul2/model.safetensors")) if k.startswith("decoder.")
    )


def test_written_files_read_back_with_safetensors(converted):
    from safetensors.numpy import load_file

    out = converted["sa3_medium_tiny_s0", "float32"]
    ours = load_file(str(out / "dit.safetensors"))
    theirs = mx.load(str(out / "dit.safetensors"))
    assert set(ours) == set(theirs)
    for key, value in ours.items():
        np.testing.assert_array_equal(value, np.asarray(theirs[key]))


def model_errors(model, name: str) -> dict:
    """Relative errors of a loaded SA3 model against the fixture's io.npz and prompt embedding (mask must match)."""
    errors = dit_errors(model, np.load(REF / name / "io.npz"))
    pipe = np.load(REF / name / "pipeline.npz")
    emb, mask = model.encode_text(list(pipe["prompts"]))
    errors["prompt_embedding"] = rel_err(emb, pipe["prompt_embedding"])
    np.testing.assert_array_equal(np.asarray(mask), pipe["prompt_mask"].astype(bool))
    return errors


def dit_errors(model, io) -> dict:
    zero_local = np.zeros_like(io["local_add_cond"])
    args = (io["x"], io["t"], io["cross_attn_cond"], io["global_cond"])
    return {
        "v_plain": rel_err(model.dit(*args, zero_local), io["v_plain"]),
        "v_inpaint": rel_err(model.dit(*args, io["local_add_cond"]), io["v_inpaint"]),
        "v_null_context": rel_err(
            model.dit(io["x"], io["t"], np.zeros_like(io["cross_attn_cond"]), io["global_cond"], zero_local),
            io["v_null_context"],
        ),
        "v_cfg3_apg1": rel_err(model.dit(*args, zero_local, cfg_scale=3.0, apg_scale=1.0), io["v_cfg3_apg1"]),
        "seconds_embedding": rel_err(model.encode_seconds(io["seconds"]), io["seconds_embedding"]),
    }


@pytest.mark.parametrize("dtype,tol", [("float32", TOL_F32), ("float16", TOL_F16), ("bfloat16", TOL_BF16)])
@pytest.mark.parametrize("name", SA3_FIXTURES)
def test_converted_sa3_reproduces_official(converted, name, dtype, tol):
    model = load_model(converted[name, dtype], dtype="float32")
    assert model.source.converted
    errors = model_errors(model, name)
    bad = {k: v for k, v in errors.items() if not v <= tol}
    assert not bad, f"{name} {dtype}: {bad}"
    if dtype != "float32":  # the half-precision file really is different from the float32 one
        assert errors["v_plain"] > 1e-6


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("name", SAME_FIXTURES)
def test_converted_same_reproduces_official(converted, name, dtype):
    io = np.load(REF / name / "io.npz")
    ae = load_autoencoder(converted[name, dtype])
    # --dtype never touches the autoencoder: float32 tolerances in both cases
    assert rel_err(ae.encode(io["encode_in_audio"]), io["encode_out_latents"]) <= TOL_F32
    assert rel_err(ae.decode(io["decode_in_latents"]), io["decode_out_audio"]) <= TOL_F32


@pytest.mark.parametrize("name,same_fixture", zip(SA3_FIXTURES, SAME_FIXTURES))
def test_converted_sa3_autoencoder_equals_original(converted, name, same_fixture):
    """The SA3 fixtures carry their own SAME weights (no io.npz): the converted one must match the original."""
    io = np.load(REF / same_fixture / "io.npz")
    original = load_autoencoder(REF / name)
    ae = load_autoencoder(converted[name, "float16"])
    # the same weights (folded differently by the converter) through the same layers: a few float32 roundings each
    tol = 8 * EPS["float32"] * np.sqrt(original.config.encoder.depth + original.config.decoder.depth)
    for method, data in (("encode", io["encode_in_audio"]), ("decode", io["decode_in_latents"])):
        assert rel_err(getattr(ae, method)(data), getattr(original, method)(data)) <= tol, method


# -------------------------------------------------------------------------------------------- the real medium layout


def medium_model_config() -> dict:
    """sa3_medium_tiny_s0's config with the real stable-audio-3-medium sizes (shapes in hub-manifest-medium.txt)."""
    config = json.loads((REF / "sa3_medium_tiny_s0" / "model_config.json").read_text())
    model = config["model"]
    model["io_channels"] = 256
    model["diffusion"]["config"].update(
        io_channels=256, embed_dim=1536, depth=24, num_heads=24, local_add_cond_dim=257, num_memory_tokens=64
    )
    ae = model["pretransform"]["config"]
    ae["latent_dim"] = 256
    for part in ("encoder", "decoder"):
        ae[part]["config"].update(channels=768, transformer_depths=[12], latent_dim=256, dim_heads=64)
    ae["bottleneck"]["config"]["dim"] = 256
    return config


def manifest_shapes() -> dict[str, tuple]:
    shapes = {}
    for line in (REF / "hub-manifest-medium.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, _ = line.split("\t")
            shapes[name] = tuple(json.loads(shape))
    return shapes


def lazy_manifest_tensors() -> dict[str, mx.array]:
    """Zeros of every manifest shape (lazy: nothing is allocated) with the true values in the RoPE buffers,
    which the sanitizers check."""
    tensors = {}
    for name, shape in manifest_shapes().items():
        if name.endswith("inv_freq"):
            dims = 2 * shape[0]
            tensors[name] = mx.array(1.0 / 10000.0 ** (np.arange(0, dims, 2) / dims), dtype=mx.float32)
        else:
            tensors[name] = mx.zeros(shape, dtype=mx.float32)
    return tensors


def test_real_medium_key_structure_maps_completely():
    shapes = manifest_shapes()
    assert len(shapes) == 997
    text_dir = REF / "sa3_medium_tiny_s0" / "t5gemma-b-b-ul2"
    components = cv.plan_components(lazy_manifest_tensors(), medium_model_config(), text_dir, mx.float16)
    by_name = {c.name: c for c in components}
    dropped = [k for c in components if c.name != "text_encoder" for k in c.dropped]
    assert sorted(dropped) == sorted(k for k in shapes if k.endswith("inv_freq") or k.endswith("noise_scaling_factor"))
    n_out = sum(len(by_name[n].tensors) for n in ("dit", "autoencoder", "conditioners"))
    n_weight_norm = sum(k.endswith(".weight_v") for k in shapes)
    assert n_out == len(shapes) - len(dropped) - n_weight_norm  # every other tensor is mapped one to one
    n_params = {n: sum(v.size for v in by_name[n].tensors.values()) for n in ("dit", "autoencoder", "conditioners")}
    assert n_params["dit"] == 1_453_170_176  # spec §1.3
    assert n_params["conditioners"] == 768 + 768 * 256 + 768  # padding embedding, seconds Linear with bias
    assert by_name["dit"].tensors["preprocess_conv.weight"].dtype == mx.float16
    assert {v.dtype for v in by_name["autoencoder"].tensors.values()} == {mx.float32}


def test_real_medium_layout_rejects_a_missing_block_tensor():
    tensors = lazy_manifest_tensors()
    del tensors["model.model.transformer.layers.23.cross_attn.to_kv.weight"]
    with pytest.raises(CheckpointError, match=r"missing 1: (transformer\.)?layers\.23\.cross_attn\.to_kv\.weight"):
        cv.plan_components(tensors, medium_model_config(), REF / "sa3_medium_tiny_s0" / "t5gemma-b-b-ul2", mx.float32)


# -------------------------------------------------------------------------------------------- streaming writer


def test_streaming_writer_round_trip(tmp_path):
    from safetensors import safe_open

    base = mx.random.normal((3, 5), key=mx.random.key(1))
    tensors = {
        "f32.transposed": base.T,  # non-contiguous view
        "f16": base.astype(mx.float16),
        "bf16": base.astype(mx.bfloat16),
        "empty": mx.zeros((1, 0, 1)),
        "int": mx.arange(7, dtype=mx.int32),
    }
    expected = {
        k: np.asarray(v.astype(mx.float32)) if v.dtype == mx.bfloat16 else np.asarray(v) for k, v in tensors.items()
    }
    path = tmp_path / "t.safetensors"
    size = cv.write_safetensors(path, tensors, metadata={"format": "mlx_sa3"})
    assert tensors == {} and size == path.stat().st_size
    loaded = mx.load(str(path))
    for key, value in expected.items():
        np.testing.assert_array_equal(np.asarray(loaded[key].astype(mx.float32)), value.astype(np.float32))
    assert loaded["bf16"].dtype == mx.bfloat16
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"format": "mlx_sa3"}
        assert f.get_slice("bf16").get_dtype() == "BF16"
        np.testing.assert_array_equal(f.get_tensor("f32.transposed"), expected["f32.transposed"])
    assert cv.read_safetensors_header(path)["empty"]["shape"] == [1, 0, 1]


# -------------------------------------------------------------------------------------------- refusals


def test_refuses_pickle_checkpoint(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(REF / "same_s_tiny_s0" / "model_config.json", src)
    (src / "model.ckpt").write_bytes(b"not to be unpickled")
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2
    assert "pickle" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(src / "model.ckpt", tmp_path / "out")
    assert proc.returncode == 2 and "pickle" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_refuses_damaged_safetensors(tmp_path, damage):
    src = copy_fixture("sa3_small_tiny_s0", tmp_path / "src")
    path = src / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000] if damage == "truncated" else b"\x07" * 64)
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr
    assert ("truncated" if damage == "truncated" else "not a safetensors") in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists() and not leftovers(tmp_path)


@pytest.mark.parametrize(
    "edit,message",
    [
        (
            lambda t: t.pop("model.model.transformer.layers.1.cross_attn.to_out.weight"),
            r"DiT checkpoint does not match the model; missing 1: "
            r"(transformer\.)?layers\.1\.cross_attn\.to_out\.weight",
        ),
        (
            lambda t: t.update({"pretransform.model.encoder.layers.2.bias": mx.zeros((5,))}),
            r"wrong shape 1: to_latent\.bias \(checkpoint \(5,\), model \(24,\)\)",
        ),
        (
            lambda t: t.update({"model.model.transformer.extra.weight": mx.zeros((2,))}),
            r"unexpected 1: (transformer\.)?extra\.weight",
        ),
        (lambda t: t.update({"ema.something": mx.zeros((2,))}), r"outside the DiT.*: ema\.something"),
        (lambda t: t.pop("conditioner.conditioners.prompt.padding_embedding"), r"missing 1: prompt\.padding_embedding"),
    ],
    ids=["missing", "wrong_shape", "unknown", "stray", "missing_conditioner"],
)
def test_refuses_mismatched_tensors(tmp_path, edit, message):
    src = copy_fixture("sa3_small_tiny_s0", tmp_path / "src")
    rewrite_weights(src, edit)
    with pytest.raises(CheckpointError, match=message):
        cv.convert(src, tmp_path / "out")
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_refuses_bad_configs(tmp_path):
    src = copy_fixture("same_s_tiny_s0", tmp_path / "src")
    config = json.loads((src / "model_config.json").read_text())
    (src / "model_config.json").write_text(json.dumps({**config, "model_type": "lm"}))
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2 and "unsupported model_type 'lm'" in proc.stderr
    (src / "model_config.json").write_text("{not json")
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2 and "not valid JSON" in proc.stderr
    del config["model"]["bottleneck"]
    (src / "model_config.json").write_text(json.dumps(config))
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2 and "cannot read the SAME autoencoder configuration" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()


def test_refuses_incomplete_diffusers_and_converted_sources(tmp_path, converted):
    src = tmp_path / "diffusers"
    src.mkdir()
    (src / "model_index.json").write_text('{"_class_name": "StableAudio3Pipeline"}')
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2 and "transformer/config.json: missing" in proc.stderr, proc.stderr
    proc = run_cli(converted["same_s_tiny_s0", "float32"], tmp_path / "out")
    assert proc.returncode == 2 and "already an mlx_sa3 checkpoint" in proc.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda meta: meta.pop("model_config"), "no model_config object"),  # was KeyError: 'model_config'
        (lambda meta: meta.update(components=5), "components must map names"),  # was TypeError
        (lambda meta: meta["components"].update(dit="../elsewhere.safetensors"), "components must map names"),
        (lambda meta: meta["components"].update(dit="/etc/passwd"), "components must map names"),
    ],
)
def test_a_converted_config_that_was_edited_is_one_line(tmp_path, converted, edit, words):
    model = tmp_path / "model"
    shutil.copytree(converted["sa3_small_tiny_s0", "float32"], model)
    meta = json.loads((model / "config.json").read_text())
    edit(meta)
    (model / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=words):
        open_source(model)
    assert open_source(converted["sa3_small_tiny_s0", "float32"]).converted  # the untouched one still opens


def test_existing_output_needs_force(tmp_path):
    """--force replaces only an earlier conversion (its marker); an unrelated folder is refused and kept whole."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    (out / "sub").mkdir()
    proc = run_cli(REF / "same_s_tiny_s0", out)
    assert proc.returncode == 2 and "--force" in proc.stderr
    proc = run_cli(REF / "same_s_tiny_s0", out, "--force")
    assert proc.returncode == 2 and "not a directory written by mlx_sa3" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
    assert (out / "keep.txt").read_text() == "x" and (out / "sub").is_dir()
    # an earlier conversion is replaced by --force
    converted = tmp_path / "converted"
    assert run_cli(REF / "same_s_tiny_s0", converted).returncode == 0
    assert (converted / ".mlx_sa3-conversion").is_file()
    (converted / "stale.txt").write_text("from the earlier conversion")
    proc = run_cli(REF / "same_s_tiny_s0", converted, "--force")
    assert proc.returncode == 0, proc.stderr
    assert not (converted / "stale.txt").exists() and open_source(converted).converted
    assert not leftovers(tmp_path)


def test_force_onto_a_regular_file_is_refused(tmp_path):
    target = tmp_path / "model"
    target.write_text("precious")
    proc = run_cli(REF / "same_s_tiny_s0", target, "--force")
    assert proc.returncode == 2 and "never replaces anything else" in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert target.is_file() and target.read_text() == "precious"
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("where", ["under_a_file", "unwritable"])
def test_an_output_that_cannot_be_written_is_refused_before_converting(tmp_path, capsys, monkeypatch, where):
    # It was found after the source was read, merged and quantized, as a raw "[Errno 20] Not a directory: ..."
    from mlx_sa3.converter import core

    monkeypatch.setattr(core, "plan_source", lambda *a, **k: pytest.fail("nothing may be converted"))
    (tmp_path / "file").write_text("mine")
    if where == "unwritable":
        from mlx_sa3 import outputs

        def refuse(directory):
            raise outputs.OutputError(f"cannot write to {directory}: permission denied")

        monkeypatch.setattr(core, "probe_writable", refuse)  # root ignores modes: the probe is what decides
    out = tmp_path / "file" / "out" if where == "under_a_file" else tmp_path / "out"
    assert core.main([str(REF / "same_s_tiny_s0"), str(out)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: cannot ") and "Errno" not in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"] and (tmp_path / "file").read_text() == "mine"


def test_stale_conversion_directory_of_a_dead_run_is_removed(tmp_path):
    import os
    import time

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".sa3-{dead.pid}-0123abcd.converting"  # what a SIGKILLed conversion leaves
    (stale / "text_encoder").mkdir(parents=True)
    (stale / "dit.safetensors").write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    proc = run_cli(REF / "same_s_tiny_s0", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_interruption_leaves_nothing(tmp_path, monkeypatch):
    from mlx_sa3.converter import safetensors_io

    real = safetensors_io._write_tensor
    calls = []

    def interrupt_on_fifth(*args):
        calls.append(args[1])
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(safetensors_io, "_write_tensor", interrupt_on_fifth)
    with pytest.raises(KeyboardInterrupt):
        cv.convert(REF / "sa3_small_tiny_s0", tmp_path / "out")
    assert len(calls) == 5
    assert list(tmp_path.iterdir()) == []
    # an interrupted --force run keeps the previous output
    monkeypatch.setattr(cv, "_write_tensor", real)
    cv.convert(REF / "same_s_tiny_s0", tmp_path / "out")
    before = (tmp_path / "out" / "autoencoder.safetensors").read_bytes()
    calls.clear()
    monkeypatch.setattr(safetensors_io, "_write_tensor", interrupt_on_fifth)
    assert cv.main([str(REF / "sa3_small_tiny_s0"), str(tmp_path / "out"), "--force"]) == 130
    assert (tmp_path / "out" / "autoencoder.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_hub_cache_revision_is_recorded(tmp_path):
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "models--stabilityai--SAME-S" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for item in (REF / "same_s_tiny_s0").iterdir():
        os.symlink(item, snapshot / item.name)  # the Hub cache stores snapshot files as symlinks too
    out = cv.convert(snapshot, tmp_path / "out")
    meta = json.loads((out / "config.json").read_text())
    assert meta["source"]["revision"] == commit and meta["kind"] == "same"
    assert meta["dropped"] and all(k.endswith(("inv_freq", "noise_scaling_factor")) for k in meta["dropped"])


# -------------------------------------------------------------------------------------------- diffusers layout
# The test builds each diffusers folder itself, with diffusers' own modules and save_pretrained, from the official
# fixture weights through the official -> diffusers key map below (written independently of convert.py's).

DIT_TO_DIFFUSERS = [
    (r"^transformer\.project_(in|out)\.", r"proj_\1."),
    (r"^transformer\.layers\.(\d+)\.", r"transformer_blocks.\1."),
    (r"^transformer\.", ""),
    (r"\.ff\.ff\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.ff\.2\.", ".ff.proj_out."),
]
# Buffers diffusers does not store (SAME RoPE, empty noise factor) or stores at its own width (DiT RoPE).
NOT_IN_DIFFUSERS = r"rope\.inv_freq$|noise_scaling_factor$|rotary_pos_emb\.inv_freq$"


def to_diffusers(tensors: dict, prefix: str, renames, differential: bool) -> dict:
    import torch

    out = {}
    for key, value in tensors.items():
        if not key.startswith(prefix) or re.search(NOT_IN_DIFFUSERS, key):
            continue
        name = key[len(prefix) :]
        for pattern, replacement in renames:
            name = re.sub(pattern, replacement, name)
        if differential and name.endswith("attn.to_qkv.weight"):  # official [q|k|v|q2|k2] -> [q1|q2|k1|k2|v]
            q, k, v, q2, k2 = np.split(value, 5)
            value = np.concatenate([q, q2, k, k2, v])
        out[name] = torch.from_numpy(np.ascontiguousarray(value))
    return out


def load_strict(module, state: dict) -> None:
    own = {k: v for k, v in module.state_dict().items() if re.search(NOT_IN_DIFFUSERS, k)}
    module.load_state_dict({**own, **state}, strict=True)


def save_diffusers_pipeline(name: str, same_fixture: str, dst: Path, stochastic: bool = True) -> Path:
    """The SA3 fixture ``name`` as a diffusers StableAudio3Pipeline folder, its SAME taken from ``same_fixture``."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    pytest.importorskip("transformers")
    from diffusers import (
        AutoencoderSAME,
        FlowMatchEulerDiscreteScheduler,
        StableAudio3DiTModel,
        StableAudio3DurationEmbedder,
        StableAudio3Pipeline,
    )
    from transformers import AutoConfig, AutoTokenizer, T5GemmaEncoderModel

    config = json.loads((REF / name / "model_config.json").read_text())
    dit_cfg = config["model"]["diffusion"]["config"]
    differential = dit_cfg["attn_kwargs"]["differential"]
    tensors = {k: np.asarray(v) for k, v in mx.load(str(REF / name / "model.safetensors")).items()}
    transformer = StableAudio3DiTModel(
        **{
            k: dit_cfg[k]
            for k in (
                "io_channels",
                "patch_size",
                "embed_dim",
                "depth",
                "num_heads",
                "cond_token_dim",
                "global_cond_dim",
                "local_add_cond_dim",
                "timestep_features_dim",
                "num_memory_tokens",
            )
        },
        ff_mult=dit_cfg["ff_kwargs"]["mult"],
        use_differential_attention=differential,
    )
    state = to_diffusers(tensors, "model.model.", DIT_TO_DIFFUSERS, differential)
    state["prompt_padding_embedding"] = torch.from_numpy(tensors["conditioner.conditioners.prompt.padding_embedding"])
    load_strict(transformer, state)

    duration = StableAudio3DurationEmbedder(output_dim=768, fourier_dim=256, min_val=0.0, max_val=384.0)
    seconds = "conditioner.conditioners.seconds_total.embedder.embedding.1."
    load_strict(
        duration,
        {f"linear.{p}": torch.from_numpy(tensors[seconds + p]) for p in ("weight", "bias")} | {"freqs": duration.freqs},
    )

    same_config = json.loads((REF / same_fixture / "model_config.json").read_text())["model"]
    same_prefix = "pretransform.model." if "diffusion" in same_config else ""
    same_config = same_config["pretransform"]["config"] if same_prefix else same_config
    enc, dec = same_config["encoder"]["config"], same_config["decoder"]["config"]
    vae = AutoencoderSAME(
        audio_channels=2,
        patch_size=256,
        encoder_channels=enc["channels"],
        encoder_c_mults=enc["c_mults"],
        encoder_strides=enc["strides"],
        encoder_transformer_depths=enc["transformer_depths"],
        latent_dim=same_config["latent_dim"],
        use_differential_attention=enc["differential"],
        dim_heads=enc["dim_heads"],
        ff_mult=enc["ff_mult"],
        sliding_window=enc["sliding_window"][0],
        encoder_sinusoidal_blocks=[0],
        decoder_sinusoidal_blocks=dec["sinusoidal_blocks"],
        sampling_rate=44100,
    )
    same_tensors = {k: np.asarray(v) for k, v in mx.load(str(REF / same_fixture / "model.safetensors")).items()}
    load_strict(vae, to_diffusers(same_tensors, same_prefix, SAME_TO_DIFFUSERS, enc["differential"]))

    t5_dir = REF / name / "t5gemma-b-b-ul2"
    t5_config = AutoConfig.from_pretrained(t5_dir)
    t5_config.is_encoder_decoder = False
    text_encoder = T5GemmaEncoderModel(t5_config)
    t5_tensors = {k: np.asarray(v) for k, v in mx.load(str(t5_dir / "model.safetensors")).items()}
    load_strict(text_encoder, {k: torch.from_numpy(v) for k, v in t5_tensors.items() if k.startswith("encoder.")})
    prompt_max_length = config["model"]["conditioning"]["configs"][0]["config"]["max_length"]
    tokenizer = AutoTokenizer.from_pretrained(t5_dir, model_max_length=prompt_max_length)

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1, shift=1.0, stochastic_sampling=stochastic)
    StableAudio3Pipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        duration_embedder=duration,
        transformer=transformer,
        scheduler=scheduler,
    ).save_pretrained(dst)
    shutil.copy(t5_dir / "tokenizer.model", dst / "tokenizer")  # transformers 5 writes only tokenizer.json
    return dst


# The small fixture's own SAME is a SAME-S, which diffusers cannot represent: pair its DiT with the SAME-L fixture.
DIFFUSERS_CASES = {"sa3_small_tiny_s0": "same_l_tiny_s0", "sa3_medium_tiny_s0": "sa3_medium_tiny_s0"}


@pytest.fixture(scope="module")
def diffusers_folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers")
    return {name: save_diffusers_pipeline(name, same, root / name) for name, same in DIFFUSERS_CASES.items()}


@pytest.fixture(scope="module")
def diffusers_converted(diffusers_folders, tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers-converted")
    return {name: cv.convert(src, root / name) for name, src in diffusers_folders.items()}


def read_component(out: Path, name: str) -> dict:
    return {k: np.asarray(v) for k, v in mx.load(str(out / cv.COMPONENT_FILES[name])).items()}


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_diffusers_converts_to_the_same_files(converted, diffusers_converted, name):
    """Every tensor converted from the diffusers folder equals the one converted from the original repo."""
    same_source = converted[DIFFUSERS_CASES[name], "float32"] if DIFFUSERS_CASES[name] != name else None
    for component in ("dit", "conditioners", "text_encoder", "autoencoder"):
        original = converted[name, "float32"] if component != "autoencoder" or same_source is None else same_source
        ours, theirs = read_component(diffusers_converted[name], component), read_component(original, component)
        assert set(ours) == set(theirs), component
        for key in ours:
            np.testing.assert_array_equal(ours[key], theirs[key], err_msg=f"{component} {key}")


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_diffusers_converted_reproduces_official(diffusers_converted, name):
    model = load_model(diffusers_converted[name], dtype="float32")
    errors = model_errors(model, name)
    same_io = np.load(REF / "same_l_tiny_s0" / "io.npz")
    reference = load_autoencoder(REF / DIFFUSERS_CASES[name]) if name == "sa3_medium_tiny_s0" else None
    for method, data, expected in (
        ("encode", "encode_in_audio", "encode_out_latents"),
        ("decode", "decode_in_latents", "decode_out_audio"),
    ):
        got = getattr(model.autoencoder, method)(same_io[data])
        want = same_io[expected] if reference is None else getattr(reference, method)(same_io[data])
        errors[f"same_{method}"] = rel_err(got, want)
    bad = {k: v for k, v in errors.items() if not v <= TOL_F32}
    assert not bad, f"{name}: {bad}"


@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_diffusers_config_is_rebuilt(diffusers_converted, name):
    from mlx_sa3.dit import DiTConfig
    from mlx_sa3.model import SA3Config
    from mlx_sa3.same import SAMEConfig

    meta = json.loads((diffusers_converted[name] / "config.json").read_text())
    ours = meta["model_config"]
    official = json.loads((REF / name / "model_config.json").read_text())
    same_official = json.loads((REF / DIFFUSERS_CASES[name] / "model_config.json").read_text())["model"]
    assert DiTConfig.from_model_config(ours) == DiTConfig.from_model_config(official)
    assert SAMEConfig.from_dict(ours["model"]) == SAMEConfig.from_dict(same_official)
    sa3_ours, sa3_official = SA3Config.from_dict(ours), SA3Config.from_dict(official)
    for field_name in (
        "sample_rate",
        "io_channels",
        "diffusion_objective",
        "cross_attention_cond_ids",
        "global_cond_ids",
        "prompt_max_length",
        "seconds_min",
        "seconds_max",
        "cond_dim",
    ):
        assert getattr(sa3_ours, field_name) == getattr(sa3_official, field_name), field_name
    assert ours["sample_size"] == cv.DEFAULT_SAMPLE_SIZE  # not recorded by diffusers: the documented assumption
    assert meta["kind"] == "sa3" and any("sample_size" in note for note in meta["notes"])
    assert sorted(meta["dropped"]) == [
        f"duration_embedder/{cv.DIFFUSERS_WEIGHTS}:freqs",
        f"transformer/{cv.DIFFUSERS_WEIGHTS}:rotary_pos_emb.inv_freq",
    ]
    tokenizer_config = json.loads((diffusers_converted[name] / "text_encoder/tokenizer_config.json").read_text())
    assert tokenizer_config["add_bos_token"] is False and tokenizer_config["add_eos_token"] is False


def copy_diffusers(folder: Path, dst: Path) -> Path:
    shutil.copytree(folder, dst)
    return dst


def rewrite_folder_weights(path: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path))


def test_diffusers_base_scheduler_gives_rectified_flow(diffusers_folders, tmp_path):
    src = copy_diffusers(diffusers_folders["sa3_small_tiny_s0"], tmp_path / "src")
    path = src / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "stochastic_sampling": False}))
    checkpoint = cv.open_checkpoint(src)
    assert checkpoint.model_config["model"]["diffusion"]["diffusion_objective"] == "rectified_flow"


@pytest.mark.parametrize(
    "folder,edit,message",
    [
        (
            "transformer",
            lambda t: t.pop("transformer_blocks.1.cross_attn.to_out.weight"),
            r"DiT checkpoint does not match the model; missing 1: "
            r"(transformer\.)?layers\.1\.cross_attn\.to_out\.weight",
        ),
        ("transformer", lambda t: t.update({"extra.weight": np.zeros(2, np.float32)}), r"unexpected 1: extra\.weight"),
        ("transformer", lambda t: t.pop("prompt_padding_embedding"), r"missing 1: prompt\.padding_embedding"),
        (
            "vae",
            lambda t: t.update({"encoder.proj.bias": np.zeros(5, np.float32)}),
            r"wrong shape 1: to_latent\.bias \(checkpoint \(5,\), model \(24,\)\)",
        ),
        (
            "vae",
            lambda t: t.update({"decoder.blocks.0.mapping.weight_v": np.zeros((512, 64, 3), np.float32)}),
            r"kernel-3 mapping \(SAME-S\).*cannot hold a SAME-S",
        ),
        ("duration_embedder", lambda t: t.update({"freqs": t["freqs"] * 2}), r"not the official expo"),
        (
            "text_encoder",
            lambda t: t.update({"decoder.norm.weight": np.zeros(768, np.float32)}),
            r"T5Gemma encoder checkpoint does not match the model; unexpected 1: decoder\.norm\.weight",
        ),
    ],
    ids=["missing", "unknown", "missing_padding", "wrong_shape", "same_s", "freqs", "text_encoder_decoder"],
)
def test_diffusers_refuses_mismatched_tensors(diffusers_folders, tmp_path, folder, edit, message):
    src = copy_diffusers(diffusers_folders["sa3_small_tiny_s0"], tmp_path / "src")
    filename = "model.safetensors" if folder == "text_encoder" else cv.DIFFUSERS_WEIGHTS
    rewrite_folder_weights(src / folder / filename, edit)
    proc = run_cli(src, tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert re.search(message, proc.stderr), proc.stderr
    assert not (tmp_path / "out").exists() and not leftovers(tmp_path)


def test_diffusers_refuses_unusable_folders(diffusers_folders, tmp_path):
    src = copy_diffusers(diffusers_folders["sa3_small_tiny_s0"], tmp_path / "src")
    (src / "tokenizer" / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match="no sentencepiece tokenizer.model"):
        cv.convert(src, tmp_path / "out")
    index = json.loads((src / "model_index.json").read_text())
    (src / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="not a Stable Audio 3 pipeline"):
        cv.convert(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [None, "float32"])
def test_a_same_checkpoint_is_not_loaded_as_a_model(converted, dtype):
    """A SAME repo and its conversion are both refused by load_model, and by the CLI in one line before any work."""
    src = REF / "same_s_tiny_s0" if dtype is None else converted["same_s_tiny_s0", dtype]
    with pytest.raises(CheckpointError, match="is a SAME autoencoder checkpoint, not a Stable Audio 3 model"):
        load_model(src, lazy=True)
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_sa3.generate", "--model", src, "--backend", "mlx", "-p", "x", "-o", "x.wav"],
        cwd=converted["same_s_tiny_s0", "float32"].parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "is a SAME autoencoder checkpoint" in proc.stderr
