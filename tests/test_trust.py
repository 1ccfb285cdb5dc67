"""Issue 11 end to end: every defect found on a fresh machine, through the real CLI (in-process or a subprocess) and
the library, with the demo model. Each test failed before the fix; the unit tests of the pieces are in
test_outputs.py and test_inputs.py.

Everything happens in tmp_path: a FIFO and a directory stand in for /dev/null (never touched), RLIMIT_FSIZE and a
private tmpfs for a full or read-only disk, real signals go to a real CLI subprocess.
"""

import json
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

from mlx_sa3 import generate, outputs

import numpy as np
import pytest
import soundfile as sf

from tests import conftest

SR = 44100
REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
LOADED = "note: the demo model"  # printed right after the model loads: its absence means nothing was loaded


def cli(*args):
    return generate.main(["--model", "demo", "--quiet", "--steps", "1", "-p", "x", *map(str, args)])


def cli_process(*args, env=None, **kw):
    command = [sys.executable, "-m", "mlx_sa3.generate", "--model", "demo", "--quiet", "-p", "x", *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env or ENV, timeout=300, **kw)


def one_error_line(text: str) -> str:
    lines = [line for line in text.splitlines() if not line.startswith(("warning:", "note:"))]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in text, text
    return lines[0]


def leftovers(directory: Path) -> list:
    return [p.name for p in directory.iterdir() if outputs.TEMP_PATTERN.match(p.name)]


@pytest.fixture(scope="module")
def pipe():
    from mlx_sa3.pipeline import StableAudio3

    return StableAudio3.from_pretrained("demo")


# -- files never damaged ----------------------------------------------------------------------------------------


def test_fifo_target_is_refused_before_any_work(tmp_path, capsys):
    fifo = tmp_path / "null.wav"  # stands in for -o /dev/null: a node that is not a regular file
    os.mkfifo(fifo)
    assert cli("--duration", 1, "-o", fifo) == 2
    err = capsys.readouterr().err
    assert "FIFO" in one_error_line(err) and LOADED not in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and os.listdir(tmp_path) == ["null.wav"]


def test_directory_target_is_refused(tmp_path, capsys):
    folder = tmp_path / "out.wav"
    folder.mkdir()
    assert cli("--duration", 1, "-o", folder) == 2
    assert "is a directory" in one_error_line(capsys.readouterr().err)
    assert cli("--duration", 1, "-o", str(tmp_path) + os.sep) == 2
    assert "is a directory" in one_error_line(capsys.readouterr().err)
    assert folder.is_dir() and os.listdir(tmp_path) == ["out.wav"]


def test_existing_output_needs_overwrite_cli(tmp_path, capsys):
    out = tmp_path / "out.wav"
    out.write_bytes(b"precious")
    assert cli("--duration", 1, "-o", out) == 2
    err = capsys.readouterr().err
    assert "already exists" in one_error_line(err) and "--overwrite" in err and LOADED not in err
    assert out.read_bytes() == b"precious"
    assert cli("--duration", 1, "--overwrite", "-o", out) == 0
    assert sf.info(str(out)).frames == SR and leftovers(tmp_path) == []


def test_existing_output_needs_overwrite_library(pipe, tmp_path):
    out = tmp_path / "out.wav"
    out.write_bytes(b"precious")
    with pytest.raises(outputs.OutputError, match="already exists"):
        pipe.generate_to_file(out, "x", duration=1.0, steps=1)
    assert out.read_bytes() == b"precious"
    result = pipe.generate_to_file(out, "x", duration=1.0, steps=1, overwrite=True)
    assert result.paths == [out] and sf.info(str(out)).frames == SR


def test_batch_with_one_existing_file_writes_none(pipe, tmp_path):
    (tmp_path / "b-2.wav").write_bytes(b"mine")
    with pytest.raises(outputs.OutputError, match="b-2.wav already exists"):
        pipe.generate_to_file(tmp_path / "b.wav", "x", duration=1.0, steps=1, batch_size=2)
    assert sorted(os.listdir(tmp_path)) == ["b-2.wav"]


def test_outputs_get_the_umask_permissions(pipe, tmp_path):
    old = os.umask(0o022)
    try:
        pipe.generate_to_file(tmp_path / "a.wav", "x", duration=1.0, steps=1)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "a.wav").st_mode) == 0o644  # was 0600 (mkstemp)


def test_a_254_character_name_works(tmp_path):
    out = tmp_path / ("n" * 250 + ".wav")
    assert cli("--duration", 1, "-o", out) == 0
    assert sf.info(str(out)).frames == SR and os.listdir(tmp_path) == [out.name]


# -- one line, exit 2 -------------------------------------------------------------------------------------------


def test_seed_minus_one_is_random_and_2_63_is_refused(tmp_path, capsys):
    seeds = []
    for name in ("a.wav", "b.wav"):
        assert cli("--duration", 0.5, "--seed", -1, "-o", tmp_path / name) == 0
        line = capsys.readouterr().out
        seeds.append(int(line.split("(seed ")[1].split(";")[0]))
    assert all(0 <= s < 2**31 for s in seeds) and seeds[0] != seeds[1]
    assert cli("--duration", 1, "--seed", 2**63, "-o", tmp_path / "c.wav") == 2
    err = capsys.readouterr().err
    assert "out of range" in one_error_line(err) and LOADED not in err
    assert cli("--duration", 1, "--seed", 2**63 - 1, "-o", tmp_path / "d.wav") == 0


def test_file_size_limit_is_one_line_and_leaves_nothing(tmp_path):
    """A disk that fills up during the write (RLIMIT_FSIZE: the kernel refuses to grow the file)."""
    limit = 400_000  # the demo model's tokenizer and every other file stay far below; 2 s of float WAV is 705 kB

    def limited():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills the writer instead of EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "big.wav"
    proc = cli_process("--duration", 2, "--steps", 1, "-o", out, preexec_fn=limited)
    assert proc.returncode == 2, proc.stderr
    assert (
        one_error_line(proc.stderr)
        == f"error: cannot write {out}: file too large (a file size limit is set: ulimit -f)"
    )
    assert os.listdir(tmp_path) == []


def private_tmpfs(tmp_path: Path, options: str) -> tuple:
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs Linux, root and unshare for a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    prefix = ("unshare", "-m", "sh", "-c", f'mount -t tmpfs -o {options} tmpfs "{mnt}" && exec "$@"', "sh")
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()}")
    return prefix, mnt


def run_in(prefix, *args):
    command = [*prefix, sys.executable, "-m", "mlx_sa3.generate", "--model", "demo", "--quiet", "-p", "x", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=300)


def test_disk_full_says_no_space_left_on_device(tmp_path):
    prefix, mnt = private_tmpfs(tmp_path, "size=256k")
    proc = run_in(prefix, "--duration", "2", "--steps", "1", "-o", str(mnt / "out.wav"))
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr) == f"error: cannot write {mnt / 'out.wav'}: no space left on device"


def test_read_only_file_system_is_refused_before_loading(tmp_path):
    prefix, mnt = private_tmpfs(tmp_path, "ro,size=256k")
    proc = run_in(prefix, "--duration", "1", "-o", str(mnt / "out.wav"))
    assert proc.returncode == 2, proc.stderr
    assert one_error_line(proc.stderr) == f"error: cannot write to {mnt}: read-only file system"
    assert LOADED not in proc.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_to_the_cli_exit_128_plus_signal_and_leave_nothing(tmp_path, signum):
    out = tmp_path / "long.wav"
    command = [sys.executable, "-m", "mlx_sa3.generate", "--model", "demo", "--quiet", "-p", "x"]
    proc = subprocess.Popen(
        [*command, "--duration", "40", "--steps", "100000", "-o", str(out)],  # minutes of sampling: never finishes
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    deadline, seen = time.monotonic() + 120, []
    while proc.poll() is None and time.monotonic() < deadline:
        now = leftovers(tmp_path)
        if now and now == seen:
            break  # the same temporary file twice 0.2 s apart: the output file, mid-generation (not the probe)
        seen = now
        time.sleep(0.2)
    assert seen and proc.poll() is None, "the CLI never started writing"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert one_error_line(err) == f"error: terminated by {signal.Signals(signum).name}; no output written"
    assert os.listdir(tmp_path) == []


def test_stale_partial_of_a_dead_run_is_removed_by_the_next_run(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".sa3-{dead.pid}-0123abcd.partial"  # what a SIGKILLed run leaves
    stale.write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    assert cli("--duration", 0.5, "-o", tmp_path / "next.wav") == 0
    assert os.listdir(tmp_path) == ["next.wav"]


# -- inputs -----------------------------------------------------------------------------------------------------


def test_a_duration_shorter_than_one_sample_is_refused(tmp_path, capsys):
    assert cli("--duration", 0.00001, "-o", tmp_path / "z.wav") == 2
    err = capsys.readouterr().err
    assert "less than one sample" in one_error_line(err) and LOADED not in err
    assert os.listdir(tmp_path) == []


def test_the_maximum_duration_message_has_real_digits(tmp_path, capsys):
    assert cli("--duration", 47.6, "-o", tmp_path / "z.wav") == 2
    err = capsys.readouterr().err
    assert one_error_line(err) == "error: duration 47.6 s is too long: this model makes at most 47.554 s"
    assert LOADED not in err


def test_nan_in_the_input_audio_names_the_input(tmp_path, capsys):
    clip = tmp_path / "in.wav"
    audio = np.zeros((SR, 2), np.float32)
    audio[100, 0] = np.nan
    sf.write(clip, audio, SR, subtype="FLOAT")
    assert cli("--duration", 1, "--init-audio", clip, "-o", tmp_path / "o.wav") == 2
    line = one_error_line(capsys.readouterr().err)
    assert str(clip) in line and "(input file)" in line and "NaN" in line and "float32" not in line
    assert sorted(os.listdir(tmp_path)) == ["in.wav"]


@pytest.mark.parametrize(
    "config",
    [
        {"model_type": "diffusion_cond"},  # KeyError: 'model'
        {"model_type": "diffusion_cond", "model": {}},  # KeyError: 'pretransform'
        {"model_type": "diffusion_cond", "model": 5},  # AttributeError
        [],  # AttributeError
    ],
)
def test_a_config_missing_its_parts_is_one_line(tmp_path, capsys, config):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model_config.json").write_text(json.dumps(config))
    assert (
        generate.main(
            ["--model", str(model), "--backend", "mlx", "-p", "x", "--duration", "1", "-o", str(tmp_path / "o.wav")]
        )
        == 2
    )
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if text.startswith("error")]
    assert str(model) in line and ("cannot read the" in line or "must hold a JSON object" in line), line
    assert "Traceback" not in err
    assert not (tmp_path / "o.wav").exists()


@pytest.mark.parametrize(
    "key, value, words",
    [
        ("depth", "x", "DiT depth must be an integer"),  # was TypeError in range()
        ("embed_dim", 0, "DiT embed_dim must be at least 1"),  # was ZeroDivisionError
        ("num_memory_tokens", -3, "DiT num_memory_tokens must be at least 0"),  # was MLX's "[full] Negative dimensions"
        ("num_heads", 5, "embed_dim 96 is not a multiple of num_heads 5"),
        ("sample_rate", 0, "sample_rate must be at least 1"),  # was ZeroDivisionError
        ("sample_size", -5, "sample_size must be at least 1"),  # was "at most -0.001 s"
    ],
)
def test_impossible_numbers_in_a_config_are_one_line(tmp_path, capsys, key, value, words):
    model = tmp_path / "model"
    source = conftest.REF / "sa3_small_tiny_s0"  # through the module: only this test needs the fixtures
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("*.npz", "lora"))
    config = json.loads((model / "model_config.json").read_text())
    target = config if key.startswith("sample_") else config["model"]["diffusion"]["config"]
    target[key] = value
    (model / "model_config.json").write_text(json.dumps(config))
    args = ["--model", str(model), "--backend", "mlx", "-p", "x", "--duration", "1", "-o", str(tmp_path / "o.wav")]
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if text.startswith("error")]
    assert words in line and "Traceback" not in err, line


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c["encoder"].update(num_attention_heads=0), "num_attention_heads must be at least 1"),  # 1/0
        (lambda c: c["encoder"].update(hidden_size=None), "hidden_size must be an integer"),  # was TypeError
        (lambda c: c["encoder"].update(vocab_size=-1), "vocab_size must be at least 1"),  # was MLX's "[bits]"
        (lambda c: c.pop("encoder"), "cannot read the T5Gemma configuration"),  # was TypeError: missing arguments
    ],
)
def test_impossible_text_encoder_configs_are_one_line(tmp_path, capsys, edit, words):
    source = conftest.REF / "sa3_small_tiny_s0"  # through the module: only these tests need the fixtures
    _check_config_edit(source, tmp_path, capsys, ["t5gemma-b-b-ul2", "config.json"], edit, words)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(latent_dim=0), "SAME latent_dim must be at least 1"),  # was ZeroDivisionError
        (lambda c: c["encoder"]["config"].update(channels=0), "SAME width must be at least 1"),  # modulo by zero
        (lambda c: c["decoder"]["config"].update(transformer_depths=["x"]), "SAME depth must be an integer"),
    ],
)
def test_impossible_autoencoder_configs_are_one_line(tmp_path, capsys, edit, words):
    def pretransform(config):
        edit(config["model"]["pretransform"]["config"])

    _check_config_edit(conftest.REF / "sa3_small_tiny_s0", tmp_path, capsys, ["model_config.json"], pretransform, words)


def _check_config_edit(source, tmp_path, capsys, parts, edit, words):
    """A copy of ``source`` with one config file edited: the CLI refuses it in one line naming it."""
    model = tmp_path / "model"
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("*.npz", "lora"))
    path = model.joinpath(*parts)
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    args = ["--model", str(model), "--backend", "mlx", "-p", "x", "--duration", "1", "-o", str(tmp_path / "o.wav")]
    assert generate.main(args) == 2
    err = capsys.readouterr().err
    (line,) = [text for text in err.splitlines() if text.startswith("error")]
    assert (str(path) in line or str(model) in line) and words in line and "Traceback" not in err, line


def test_nan_in_the_weights_names_the_checkpoint(pipe, tmp_path):
    from mlx_sa3.sampling import NonFiniteError

    import mlx.core as mx
    from mlx.utils import tree_flatten

    dit = pipe.model.dit
    name, value = next((n, v) for n, v in tree_flatten(dit.parameters()) if v.ndim == 2)
    saved = np.array(value)
    dit.load_weights([(name, mx.full(value.shape, np.nan, value.dtype))], strict=False)
    try:
        with pytest.raises(
            NonFiniteError, match=rf"the checkpoint holds NaN/inf weights \(DiT: 1 tensors, e.g. {name}\)"
        ):
            pipe.generate_to_file(tmp_path / "n.wav", "x", duration=1.0, steps=1)
    finally:
        dit.load_weights([(name, mx.array(saved))], strict=False)
    assert os.listdir(tmp_path) == []


def test_nan_from_sampling_with_finite_weights_blames_the_sampling(pipe, tmp_path, monkeypatch):
    from mlx_sa3.sampling import NonFiniteError

    import mlx.core as mx

    monkeypatch.setattr(pipe.model.dit, "step", lambda x, t, prepared, **kw: mx.full(x.shape, float("nan")))
    with pytest.raises(NonFiniteError, match="with finite inputs and weights"):
        pipe.generate_to_file(tmp_path / "n.wav", "x", duration=1.0, steps=1)


def test_non_finite_decoded_audio_is_reported_not_clamped(pipe, monkeypatch):
    from mlx_sa3.sampling import NonFiniteError

    import mlx.core as mx

    ae = pipe.model.autoencoder
    monkeypatch.setattr(
        ae, "decode_stream", lambda z, chunk_latents=None, **_: iter([mx.full((1, 2, 4096 * 4), np.inf)])
    )
    with pytest.raises(NonFiniteError, match="^decoding produced non-finite values"):
        pipe.generate("x", duration=0.5, steps=1)


def test_a_bad_blas_request_is_warned_once(tmp_path):
    env = {**ENV, "MLX_SA3_BLAS": str(tmp_path / "no-such-blas.so")}
    env.pop("MLX_SA3_NO_OPENBLAS", None)
    proc = cli_process("--duration", 0, "-o", tmp_path / "o.wav", env=env)
    assert proc.returncode == 2
    assert proc.stderr.count("warning: MLX_SA3_BLAS=") == 1 and "no-such-blas.so does not exist" in proc.stderr
    info = subprocess.run(
        [sys.executable, "-m", "mlx_sa3.info", "--size", "64"], capture_output=True, text=True, env=env, timeout=120
    )
    assert info.returncode == 0 and info.stderr.count("warning: MLX_SA3_BLAS=") == 1
    assert "torch:" in info.stdout


def test_info_reports_the_torch_backend():
    from mlx_sa3 import backend

    text = backend.describe_torch()
    try:
        import torch
    except ImportError:
        assert text.startswith("not installed")
    else:
        assert text.startswith(torch.__version__) and f"threads: {torch.get_num_threads()}" in text


def test_torch_backend_argument_errors_come_before_loading_torch(tmp_path):
    code = (
        "import sys; from mlx_sa3 import generate\n"
        "rc = generate.main(sys.argv[1:])\n"
        "print(rc, 'torch' in sys.modules, 'diffusers' in sys.modules)\n"
    )
    bad = [
        ["--seed", str(2**63)],
        ["--duration", "0.00001"],
        ["--steps", "0"],
        ["--init-noise-level", "0"],
        ["--sampler", "heun"],
        ["--inpaint-audio", str(tmp_path / "missing.wav"), "--inpaint-start", "1", "--inpaint-end", "2"],
        ["--dtype", "float16"],  # the torch backend computes in float32 or bfloat16
    ]
    for args in bad:
        argv = ["--model", "demo", "--backend", "torch", "-p", "x", "-o", str(tmp_path / "o.wav"), *args]
        proc = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=ENV, timeout=120)
        assert proc.stdout.split() == ["2", "False", "False"], (args, proc.stdout, proc.stderr)
        one_error_line(proc.stderr)


@pytest.mark.parametrize("size", ["0", "-5", "100000", "x"])
def test_info_refuses_a_gemm_size_it_cannot_measure(size):
    """0 printed a rate of 0, -5 ended in a traceback and 100000 (three 40 GB matrices) crashed the process."""
    proc = subprocess.run(
        [sys.executable, "-m", "mlx_sa3.info", "--size", size], capture_output=True, text=True, env=ENV, timeout=120
    )
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout
    wanted = f"error: argument --size: '{size}' is not a whole number from 1 to 16384"
    assert proc.stderr == f"{wanted} (see python -m mlx_sa3.info --help)\n"
