"""Every example script runs end to end on the demo model and writes what it says."""

import os
import subprocess
import sys
from pathlib import Path

import soundfile as sf

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# subprocesses import this checkout, whatever is installed
REPO_ENV = {**os.environ, "PYTHONPATH": str(EXAMPLES.parent)}


def run(script, *args, cwd):
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *map(str, args)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env=REPO_ENV,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_examples_write_audio(tmp_path):
    run("text_to_audio.py", "a bell", "--duration", 2, "-o", "t2a.wav", cwd=tmp_path)
    assert sf.info(tmp_path / "t2a.wav").frames == 2 * 44100
    run("audio_to_audio.py", "t2a.wav", "a gong", "-o", "a2a.wav", cwd=tmp_path)
    assert sf.info(tmp_path / "a2a.wav").frames == 2 * 44100
    run("inpaint.py", "t2a.wav", "a gong", "--region", 0.5, 1, "--region", 1.2, 1.5, "-o", "inp.wav", cwd=tmp_path)
    assert sf.info(tmp_path / "inp.wav").frames == 2 * 44100
    run("continuation.py", "t2a.wav", "a gong", "--duration", 3.5, "-o", "cont.wav", cwd=tmp_path)
    assert sf.info(tmp_path / "cont.wav").frames == round(3.5 * 44100)
    out = run("app_streaming.py", cwd=tmp_path)
    assert out.count("8.00 s of audio") == 2
