"""benchmarks/random_checkpoint.py: the Hub layout it computes and the checkpoints it writes (tiny sizes here)."""

import importlib.util
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import mlx_sa3

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "random_checkpoint.py"
_spec = importlib.util.spec_from_file_location("random_checkpoint", SCRIPT)
rc = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rc)


def _header(path: Path) -> dict:
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    header.pop("__metadata__", None)
    return header


def _names_shapes(path: Path, prefix: str = "") -> list:
    return sorted((k, tuple(v["shape"])) for k, v in _header(path).items() if k.startswith(prefix))


def _run(*args, cwd=ROOT):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, *map(str, args)], check=False, cwd=cwd, env=env, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny small- and medium-style checkpoints written by the script's CLI."""
    root = tmp_path_factory.mktemp("random_ckpt")
    dirs = {}
    for variant in rc.VARIANTS:
        proc = _run(SCRIPT, variant, root / variant, "--tiny", "--seed", "1")
        assert proc.returncode == 0, proc.stderr
        dirs[variant] = root / variant
    return dirs


@pytest.mark.parametrize("fixture", ["sa3_small_tiny_s0", "sa3_medium_tiny_s0"])
def test_layout_matches_official_fixture(ref_dir, fixture):
    """The layout computed from an official config is the official file's header, name for name, shape for shape."""
    config = json.loads((ref_dir / fixture / "model_config.json").read_text())
    assert rc.hub_layout(config) == _names_shapes(ref_dir / fixture / "model.safetensors")
    text_dir = ref_dir / fixture / "t5gemma-b-b-ul2"
    text_config = json.loads((text_dir / "config.json").read_text())
    assert rc.t5gemma_layout(text_config) == _names_shapes(text_dir / "model.safetensors", "encoder.")


def test_medium_layout_matches_hub_manifest(ref_dir):
    manifest = []
    for line in (ref_dir / "hub-manifest-medium.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape, _ = line.split("\t")
            manifest.append((name, tuple(json.loads(shape))))
    assert len(manifest) == 997
    assert rc.hub_layout(rc.model_config("medium")) == sorted(manifest)


def test_full_size_configs_parse_to_the_real_sizes():
    from mlx_sa3.dit import DiTConfig
    from mlx_sa3.model import SA3Config
    from mlx_sa3.same import SAMEConfig

    for variant, dit, same in (("small", DiTConfig.small(), "same-s"), ("medium", DiTConfig.medium(), "same-l")):
        config = rc.model_config(variant)
        assert DiTConfig.from_model_config(config) == dit
        parsed, preset = SAMEConfig.from_dict(config["model"], config["sample_rate"]), SAMEConfig.preset(same)
        for part in ("encoder", "decoder"):
            if preset.encoder.sliding_window is not None:  # chunk_size plays no part with a sliding window
                getattr(parsed, part).chunk_size = getattr(preset, part).chunk_size
        assert parsed == preset
        assert SA3Config.from_dict(config).prompt_max_length == 256
    # the DiT of the small model has 459,130,880 parameters (spec 1.3)
    small_dit = [s for n, s in rc.hub_layout(rc.model_config("small")) if n.startswith("model.model.")]
    assert sum(int(np.prod(s)) for s in small_dit) - 16 == 459_130_880  # less the RoPE buffer


def test_checkpoint_files_and_determinism(tiny, tmp_path):
    small = tiny["small"]
    config = json.loads((small / "model_config.json").read_text())
    assert _names_shapes(small / "model.safetensors") == rc.hub_layout(config)
    assert {v["dtype"] for v in _header(small / "model.safetensors").values()} == {"F32"}
    text_dir = small / rc.TEXT_SUBFOLDER
    assert {p.name for p in text_dir.iterdir()} == {
        "config.json",
        "model.safetensors",
        "tokenizer.model",
        "tokenizer_config.json",
    }
    assert json.loads((text_dir / "tokenizer_config.json").read_text())["padding_side"] == "right"
    again = tmp_path / "again"
    assert _run(SCRIPT, "small", again, "--tiny", "--seed", "1").returncode == 0
    assert (again / "model.safetensors").read_bytes() == (small / "model.safetensors").read_bytes()
    other = tmp_path / "other"
    assert _run(SCRIPT, "small", other, "--tiny", "--seed", "2").returncode == 0
    assert (other / "model.safetensors").read_bytes() != (small / "model.safetensors").read_bytes()


def test_values_follow_the_init_rules(tiny):
    import mlx.core as mx

    tensors = mx.load(str(tiny["medium"] / "model.safetensors"))
    gamma = np.array(tensors["model.model.transformer.layers.0.pre_norm.gamma"])
    assert np.all(gamma == 1)
    assert np.all(np.array(tensors["model.model.transformer.layers.1.ff.ff.0.proj.bias"]) == 0)
    w = np.array(tensors["model.model.transformer.layers.1.ff.ff.0.proj.weight"])
    assert abs(w.std() - 0.02) < 0.02 * 5 / np.sqrt(w.size)  # 5 sigma of the sample std
    inv_freq = np.array(tensors["model.model.transformer.rotary_pos_emb.inv_freq"])
    np.testing.assert_array_equal(inv_freq, rc._rope_frequencies(inv_freq.size))


@pytest.mark.parametrize("variant", rc.VARIANTS)
def test_loads_and_generates_finite_audio(tiny, variant):
    from mlx_sa3 import StableAudio3

    model = mlx_sa3.load_model(tiny[variant])
    assert model.dit.config.differential == (variant == "medium")
    autoencoder = mlx_sa3.load_autoencoder(tiny[variant])
    assert autoencoder.latent_dim == 16
    out = StableAudio3.from_pretrained(tiny[variant]).generate("rain on a roof", duration=2.0, steps=2, seed=0)
    audio = np.asarray(out.audio)
    assert audio.shape == (1, 2, 88200) and np.all(np.isfinite(audio)) and audio.std() > 0


def test_convert_and_generate_cli(tiny, tmp_path):
    converted = tmp_path / "converted"
    proc = _run(ROOT / "convert.py", tiny["medium"], converted)
    assert proc.returncode == 0, proc.stderr
    wav = tmp_path / "out.wav"
    proc = _run(
        "-m",
        "mlx_sa3.generate",
        "--model",
        converted,
        "-p",
        "drums",
        "--duration",
        "1",
        "--steps",
        "2",
        "--seed",
        "0",
        "--quiet",
        "-o",
        wav,
    )
    assert proc.returncode == 0, proc.stderr
    audio = mlx_sa3.read_audio(wav)
    assert audio.shape == (2, 44100) and np.all(np.isfinite(audio))


def test_torch_backend_loads_it(tiny):
    pytest.importorskip("torch")
    model = mlx_sa3.load_model(tiny["small"], backend="torch")
    cond = model.conditioning(["a"], [1.0], length=12)
    noise = np.random.default_rng(0).standard_normal((1, 16, 12)).astype(np.float32)
    assert np.all(np.isfinite(np.asarray(model.sample(noise, cond, steps=2, sampler="euler"))))


def test_refuses_a_non_empty_target(tiny):
    before = sorted(p.name for p in tiny["small"].iterdir())
    proc = _run(SCRIPT, "small", tiny["small"], "--tiny")
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "not empty" in proc.stderr and "Traceback" not in proc.stderr
    assert sorted(p.name for p in tiny["small"].iterdir()) == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seed", "-1"], "'-1' is not a whole number >= 0"),  # numpy refused it only once writing had begun
        (["--seed", "x"], "'x' is not a whole number >= 0"),
        (["--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_usage_errors_are_one_line_and_write_nothing(tmp_path, args, message):
    proc = _run(SCRIPT, "small", tmp_path / "out", "--tiny", *args)
    assert proc.returncode == 2 and message in proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []
