"""`python -m mlx_sa3.generate` end to end with the in-process demo model."""

import os
import subprocess
import sys
from pathlib import Path

from mlx_sa3 import generate
from mlx_sa3.audio import open_writer

import numpy as np
import pytest
import soundfile as sf

SR = 44100
# subprocesses import this checkout, whatever is installed
REPO_ENV = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def run(*args):
    return generate.main(["--model", "demo", "--quiet", "--steps", "2", *map(str, args)])


def read(path):
    data, sr = sf.read(path, dtype="float32", always_2d=True)
    assert sr == SR
    return data


@pytest.fixture
def source_clip(tmp_path):
    t = np.arange(2 * SR) / SR
    path = tmp_path / "source.wav"
    sf.write(path, (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), SR)  # mono on purpose
    return path


def test_real_entry_point_writes_exact_length(tmp_path):
    out = tmp_path / "t2a.wav"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mlx_sa3.generate",
            "--model",
            "demo",
            "-p",
            "warm pad",
            "--duration",
            "1.7",
            "--seed",
            "1",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=REPO_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    assert read(out).shape == (round(1.7 * SR), 2)
    assert f"wrote {out}" in proc.stdout and "sampling" in proc.stdout and "decoding" in proc.stdout
    assert "noise" in proc.stderr  # the demo model says its output is noise


def test_help_shows_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "examples:" in text and "--inpaint-start" in text and "--model demo" in text


@pytest.mark.parametrize(
    "extra, duration",
    [
        (["--sampler", "euler", "--format", "flac"], 1.25),
        (["--sampler", "dpmpp"], 2.0),
        (["--init-audio", "{clip}", "--init-noise-level", "0.6"], 2.0),
        (
            [
                "--inpaint-audio",
                "{clip}",
                "--inpaint-start",
                "0.2",
                "--inpaint-end",
                "0.5",
                "--inpaint-start",
                "1.0",
                "--inpaint-end",
                "1.4",
            ],
            2.0,
        ),
        (["--inpaint-audio", "{clip}"], 3.5),  # continuation
        (["--init-audio", "{clip}", "--inpaint-audio", "{clip}", "--inpaint-start", "0.5", "--inpaint-end", "1"], 2.0),
        (["--cfg-scale", "3", "--negative-prompt", "noise"], 1.0),
        (["--backend", "torch", "--inpaint-audio", "{clip}", "--inpaint-start", "0.5", "--inpaint-end", "1"], 2.0),
    ],
)
def test_every_mode_writes_a_real_file(tmp_path, source_clip, extra, duration, capsys):
    if "torch" in extra:
        pytest.importorskip("torch")
        pytest.importorskip("diffusers")
    out = tmp_path / "out.wav"
    extra = [e.replace("{clip}", str(source_clip)) for e in extra]
    assert run("-p", "a melody", "--duration", duration, "-o", out, *extra) == 0
    if "flac" in extra:
        assert sf.info(out).format == "FLAC"
    assert read(out).shape == (round(duration * SR), 2)
    assert sorted(os.listdir(tmp_path)) == ["out.wav", "source.wav"]


def test_batch_writes_one_file_each(tmp_path):
    assert run("-p", "x", "--duration", 1, "--batch", 2, "-o", tmp_path / "b.wav") == 0
    assert sorted(os.listdir(tmp_path)) == ["b-1.wav", "b-2.wav"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "", "--duration", "2"], "non-empty prompt"),
        (["-p", "x", "--duration", "0"], "positive number"),
        (["-p", "x", "--duration", "1000"], "at most 47.554 s"),
        (
            [
                "-p",
                "x",
                "--inpaint-audio",
                "{clip}",
                "--inpaint-start",
                "1.5",
                "--inpaint-end",
                "0.5",
                "--duration",
                "2",
            ],
            "start < end",
        ),
        (
            ["-p", "x", "--inpaint-audio", "{clip}", "--inpaint-start", "0.5", "--inpaint-end", "9", "--duration", "2"],
            "outside",
        ),
        (["-p", "x", "--inpaint-audio", "{clip}", "--inpaint-start", "0.5", "--duration", "2"], "--inpaint-end"),
        (["-p", "x", "--init-audio", "{bad}", "--duration", "2"], "not a readable audio file"),
        (["-p", "x", "--init-audio", "{missing}", "--duration", "2"], "no such file"),
        (["-p", "x", "--sampler", "heun", "--duration", "2"], "unknown sampler"),
        (["-p", "x", "--batch", "99999999999999999999", "--duration", "2"], "batch size must be 1..1024"),
        (["-p", "x", "--batch", "0", "--duration", "2"], "batch size must be 1..1024, got 0"),
    ],
)
def test_bad_input_clear_message_no_file(tmp_path, source_clip, capsys, args, message):
    bad = tmp_path / "bad.wav"
    bad.write_text("not audio")
    subst = {"{clip}": str(source_clip), "{bad}": str(bad), "{missing}": str(tmp_path / "missing.wav")}
    args = [subst.get(a, a) for a in args]
    out = tmp_path / "out.wav"
    assert run(*args, "-o", out) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == sorted(["bad.wav", "source.wav"])


@pytest.mark.parametrize(
    "args, message",
    [
        (["--inpaint-start", "0.5", "--inpaint-end", "9", "--duration", "2"], "outside the 2 s output"),
        (["--duration", "1.5"], "does not extend it"),  # the clip is 2 s: nothing to continue, no region
        (["--duration", "1", "--duration", "3", "-p", "y"], "duration 1 s does not extend it"),  # per item
    ],
)
def test_inpainting_errors_are_found_before_the_model_loads(tmp_path, source_clip, capsys, monkeypatch, args, message):
    # A full-size model takes seconds to load: what the audio and the regions decide is checked first.
    from mlx_sa3 import StableAudio3

    monkeypatch.setattr(StableAudio3, "from_pretrained", lambda *a, **k: pytest.fail("the model must not load"))
    out = tmp_path / "out.wav"
    assert run("-p", "x", "--inpaint-audio", source_clip, *args, "-o", out) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["source.wav"]


def test_dash_is_not_a_file_name(tmp_path, capsys, monkeypatch):
    # `-o -` reads as standard output in every other tool; it wrote a file named "-".
    monkeypatch.chdir(tmp_path)
    assert run("-p", "x", "--duration", "1", "-o", "-") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: -o -: ") and "standard output" in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []
    assert run("-p", "x", "--duration", "1", "-o", "./-") == 0 and os.listdir(tmp_path) == ["-"]  # spelled out


def test_cfg_on_distilled_checkpoint_warns(tmp_path, capsys):
    assert run("-p", "x", "--duration", 1, "--cfg-scale", 2, "-o", tmp_path / "w.wav") == 0
    assert "warning:" in capsys.readouterr().err


def test_non_finite_sampling_reported(tmp_path, capsys, monkeypatch):
    from mlx_sa3 import sampling

    monkeypatch.setattr(sampling, "euler_update", lambda x, v, t, t_next: x * float("nan"))
    assert run("-p", "x", "--duration", 1, "--sampler", "euler", "-o", tmp_path / "n.wav") == 2
    assert "non-finite" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_interrupt_mid_stream_leaves_no_file(tmp_path, capsys, monkeypatch):
    """Ctrl-C while pieces are being written: exit 130, nothing at the output path, no temporary left."""
    writes = []

    class InterruptingWriter:
        def __init__(self, *args, **kwargs):
            self.inner = open_writer(*args, **kwargs)
            self.closed = False

        def write(self, block):
            writes.append(len(block))
            if len(writes) == 2:
                raise KeyboardInterrupt
            self.inner.write(block)

        def close(self):
            self.closed = True
            self.inner.close()

    monkeypatch.setattr("mlx_sa3.pipeline.open_writer", InterruptingWriter)
    kwdefaults = {"chunk_latents": 8, "callback": None, "raw": False}
    monkeypatch.setattr("mlx_sa3.pipeline.StableAudio3._events.__kwdefaults__", kwdefaults)
    out = tmp_path / "i.wav"
    assert run("-p", "x", "--duration", 4, "-o", out) == 130
    assert len(writes) == 2
    assert "interrupted" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []
