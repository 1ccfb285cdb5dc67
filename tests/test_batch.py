"""Per-item batches (mlx_sa3.items) and the job runner (python -m mlx_sa3.batch), with the in-process demo model."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from mlx_sa3 import GenerationRequest, StableAudio3, batch
from mlx_sa3.backend import resolve_backend

import numpy as np
import pytest
import soundfile as sf

from tests import conftest
from tests.conftest import rel_err

SR = 44100
REPO = Path(__file__).resolve().parents[1]
REPO_ENV = {**os.environ, "PYTHONPATH": str(REPO)}
TOL = 1e-4  # the issue's tolerance for a batched item against the same item alone (float32)


@pytest.fixture(scope="module", params=["mlx", "torch"])
def pipe(request):
    if request.param == "torch":
        pytest.importorskip("torch")
    return StableAudio3.from_pretrained("demo", dtype="float32", backend=request.param)


# -- per-item batches -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["pingpong", "euler"])
def test_per_item_equals_solo(pipe, sampler):
    prompts, durations, seeds = ["rain", "thunder", "wind"], [2.0, 3.5, 2.0], [1, 2, 3]
    out = pipe.generate(prompts, duration=durations, seed=seeds, steps=4, sampler=sampler)
    assert out.seeds == seeds
    assert out.audio.shape == (3, 2, round(3.5 * SR))  # padded to the longest, as the official batched generate
    assert out.timings["dit_batches"] == 2  # grouped by length: the two 2 s items share one DiT batch
    for i, (p, d, s) in enumerate(zip(prompts, durations, seeds)):
        solo = pipe.generate(p, duration=d, seed=s, steps=4, sampler=sampler).audio[0]
        assert out.items[i].shape == (2, round(d * SR)) and out.items[i].dtype == np.float32
        assert rel_err(out.items[i], solo) <= TOL
        assert not out.audio[i, :, solo.shape[-1] :].any()


def test_adding_an_item_leaves_the_others_unchanged(pipe):
    two = pipe.generate(["rain", "thunder"], duration=2.0, seed=[1, 2], steps=3)
    three = pipe.generate(["rain", "thunder", "birds"], duration=2.0, seed=[1, 2, 9], steps=3)
    for i in range(2):
        assert rel_err(three.items[i], two.items[i]) <= TOL
    assert rel_err(three.items[2], three.items[0]) > 0.1  # other prompt and seed: another clip


def test_per_item_to_files_exact_lengths(tmp_path):
    pipe = StableAudio3.from_pretrained("demo")
    out = pipe.generate_to_file(tmp_path / "clip.wav", ["rain", "thunder"], duration=[1.0, 2.5], seed=[4, 5], steps=2)
    assert [p.name for p in out.paths] == ["clip-1.wav", "clip-2.wav"]
    for path, d, s, p in zip(out.paths, [1.0, 2.5], [4, 5], ["rain", "thunder"]):
        data, sr = sf.read(path, dtype="float32", always_2d=True)
        assert sr == SR and data.shape == (round(d * SR), 2)
        solo = pipe.generate(p, duration=d, seed=s, steps=2).audio[0]
        assert rel_err(data.T, solo) <= TOL
    assert sorted(os.listdir(tmp_path)) == ["clip-1.wav", "clip-2.wav"]


def test_per_item_errors_name_the_item():
    pipe = StableAudio3.from_pretrained("demo")
    with pytest.raises(ValueError, match="item 2: duration"):
        pipe.generate(["a", "b"], duration=[1.0, -1.0], seed=[1, 2], steps=1)
    with pytest.raises(ValueError, match="got 3 seeds for 2 items"):
        pipe.generate(["a", "b"], duration=1.0, seed=[1, 2, 3], steps=1)


def test_per_item_request_object(pipe):
    from mlx_sa3.pipeline import GenerationRequest

    request = GenerationRequest(["rain", "thunder"], duration=[1.0, 1.5], seed=[3, 4], steps=2)
    out = pipe.generate(request=request)
    assert [a.shape[-1] for a in out.items] == [SR, round(1.5 * SR)] and out.seeds == [3, 4]
    assert rel_err(out.items[1], pipe.generate("thunder", duration=1.5, seed=4, steps=2).audio[0]) <= TOL


# -- CLI: repeatable -p / --duration / --seed ------------------------------------------------------------------------


def cli(*args):
    from mlx_sa3 import generate

    return generate.main(["--model", "demo", "--quiet", "--steps", "2", *map(str, args)])


def test_cli_one_file_per_prompt(tmp_path, capsys):
    args = ["-p", "rain", "-p", "thunder", "--duration", 1, "--duration", 1.5, "--seed", 1, "--seed", 2]
    assert cli(*args, "-o", tmp_path / "sfx.wav") == 0
    assert "seeds 1, 2" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path)) == ["sfx-1.wav", "sfx-2.wav"]
    assert cli("-p", "thunder", "--duration", 1.5, "--seed", 2, "-o", tmp_path / "solo.wav") == 0
    first, second, solo = (sf.read(tmp_path / n, dtype="float32")[0] for n in ("sfx-1.wav", "sfx-2.wav", "solo.wav"))
    assert first.shape == (SR, 2) and second.shape == (round(1.5 * SR), 2)
    assert rel_err(second, solo) <= TOL


def test_cli_existing_item_file_refused_before_loading(tmp_path, capsys, monkeypatch):
    (tmp_path / "x-2.wav").write_bytes(b"mine")
    monkeypatch.setattr(StableAudio3, "from_pretrained", lambda *a, **k: pytest.fail("the model must not load"))
    assert cli("-p", "a", "-p", "b", "--duration", 1, "-o", tmp_path / "x.wav") == 2
    assert "x-2.wav already exists" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["x-2.wav"] and (tmp_path / "x-2.wav").read_bytes() == b"mine"


def test_cli_single_value_broadcasts(tmp_path):
    assert cli("-p", "rain", "-p", "thunder", "--duration", 1, "--seed", 5, "-o", tmp_path / "b.flac") == 0
    assert [sf.info(tmp_path / f"b-{i}.flac").frames for i in (1, 2)] == [SR, SR]


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", "a", "-p", "b", "--duration", 1, "--duration", 2, "--duration", 3], "2 -p, 3 --duration"),
        (["-p", "a", "-p", "b", "--seed", 1, "--seed", 2, "--seed", 3], "2 -p, 3 --seed"),
        (["-p", "a", "-p", "b", "--duration", 1, "--batch", 2], "--batch makes variations"),
        (["-p", "a", "-p", "b", "--duration", 1, "--duration", 1000], "too long"),
        (["-p", "a", "-p", "", "--duration", 1], "non-empty prompt"),
    ],
)
def test_cli_mismatched_counts_refused_before_loading(tmp_path, capsys, monkeypatch, args, message):
    def no_load(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(StableAudio3, "from_pretrained", no_load)
    assert cli(*args, "-o", tmp_path / "x.wav") == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert os.listdir(tmp_path) == []


def _riff_chunks(data: bytes) -> list[bytes]:
    chunks, pos = [], 12
    while pos + 8 <= len(data):
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        chunks.append(data[pos : pos + 4])
        pos += 8 + size + (size & 1)
    return chunks


def test_wav_has_no_peak_chunk_and_equal_audio_gives_equal_bytes(tmp_path):
    from mlx_sa3.audio import write_audio

    audio = np.random.default_rng(0).uniform(-0.5, 0.5, (2, 1000)).astype(np.float32)
    sf.write(tmp_path / "plain.wav", audio.T, SR, subtype="FLOAT")  # libsndfile's default: a PEAK chunk
    assert b"PEAK" in _riff_chunks((tmp_path / "plain.wav").read_bytes())
    first = write_audio(tmp_path / "a.wav", audio).read_bytes()
    time.sleep(1.1)  # the PEAK chunk's stamp has a resolution of one second
    second = write_audio(tmp_path / "b.wav", audio).read_bytes()
    chunks = _riff_chunks(first)
    assert first[:4] == b"RIFF" and b"data" in chunks and b"PEAK" not in chunks
    assert first == second
    assert sf.read(tmp_path / "a.wav", dtype="float32")[0].T.tobytes() == audio.tobytes()


# -- job runner -------------------------------------------------------------------------------------------------------


def write_jobs(path: Path, jobs) -> Path:
    path.write_text("".join((j if isinstance(j, str) else json.dumps(j)) + "\n" for j in jobs))
    return path


def run_cli(*args, env=None, launcher=(), model="demo", backend="mlx"):
    """The batch CLI in a subprocess; on MLX unless ``backend`` says otherwise (None: the default, auto), since
    auto's torch pays its import in every run."""
    chosen = () if backend is None else ("--backend", backend)
    cmd = [*launcher, sys.executable, "-m", "mlx_sa3.batch", *map(str, args), "--model", str(model), "--quiet", *chosen]
    return subprocess.run(cmd, env=env or REPO_ENV, capture_output=True, text=True, timeout=600, check=False)


def manifest(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "manifest.jsonl").read_text().splitlines()]


def jobs_set(count=6, duration=2.0, steps=3):
    return [
        {
            "prompt": f"sound number {i}",
            "duration": duration + (i % 2),
            "seed": 10 + i,
            "steps": steps,
            "name": f"clip{i:02d}",
        }
        for i in range(count)
    ]


def test_invalid_lines_all_listed_before_anything(tmp_path):
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [
            {"prompt": "rain", "duration": 2, "name": "rain"},
            "{not json",
            {"prompt": "x", "duraton": 2},
            {"prompt": "y", "duration": 99, "seed": -1, "init_audio": "missing.wav"},
            {"prompt": "z", "duration": 1, "name": "rain"},
            {"prompt": "w", "duration": 1, "inpaint_regions": [[0, 1]], "negative_prompt": "n"},
        ],
    )
    out = tmp_path / "out"
    proc = run_cli(jobs, out)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    expected = [
        (2, None),  # the whole line: no field named
        (3, "duraton"),
        (3, "duration"),
        (4, "duration"),
        (4, "seed"),
        (4, "init_audio"),
        (5, "name"),
        (6, "inpaint_regions"),
        (6, "negative_prompt"),
    ]
    assert len(lines) == len(expected)
    for line, (number, field) in zip(lines, expected):
        assert line.startswith(
            f"error: {jobs}:{number}: {field}: " if field else f"error: {jobs}:{number}: not valid JSON"
        )
    assert "Traceback" not in proc.stderr
    assert not out.exists()  # checked before any generation (and before the model loads)


def test_names_that_differ_only_in_case_are_refused(tmp_path):
    # rain.wav and Rain.wav are one file on macOS's default file system: the second job would replace the first.
    jobs = write_jobs(
        tmp_path / "jobs.jsonl",
        [{"prompt": "rain", "duration": 1, "name": "rain"}, {"prompt": "snow", "duration": 1, "name": "Rain"}],
    )
    jobs_found, problems = batch.parse_jobs(jobs)
    assert [j.name for j in jobs_found] == ["rain"]
    assert [(p.line, p.field) for p in problems] == [(2, "name")]
    assert "'Rain'" in problems[0].reason and "line 1" in problems[0].reason and "case" in problems[0].reason


def test_audio_inputs_are_checked_before_anything(tmp_path):
    # What would fail a job at generation time is found while parsing: unreadable audio, more than two channels,
    # inpaint audio that the duration does not extend (no regions given), a region outside the output.
    sf.write(tmp_path / "two.wav", np.zeros((2 * SR, 2), np.float32), SR)
    sf.write(tmp_path / "six.wav", np.zeros((SR, 6), np.float32), SR)
    (tmp_path / "bad.wav").write_text("not audio")
    lines = [
        {"prompt": "a", "duration": 1, "init_audio": "bad.wav"},
        {"prompt": "b", "duration": 1, "init_audio": "six.wav"},
        {"prompt": "c", "duration": 1.5, "inpaint_audio": "two.wav"},
        {"prompt": "d", "duration": 3, "inpaint_audio": "two.wav"},  # continues the clip: fine
        {"prompt": "e", "duration": 3, "inpaint_audio": "two.wav", "inpaint_regions": [[0.5, 1]]},  # fine
        {"prompt": "f", "duration": 1, "inpaint_audio": "bad.wav", "inpaint_regions": [[0.5, 1]]},
        {"prompt": "g", "duration": 1, "inpaint_audio": "two.wav", "inpaint_regions": [[0.5, 1.5]]},
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    found, problems = batch.parse_jobs(jobs)
    assert [j.line for j in found] == [4, 5]
    assert [(p.line, p.field) for p in problems] == [
        (1, "init_audio"),
        (2, "init_audio"),
        (3, "inpaint_audio"),
        (6, "inpaint_audio"),
        (7, "inpaint_regions"),
    ]
    reasons = [p.reason for p in problems]
    assert "not a readable audio file" in reasons[0] and "6 channels" in reasons[1]
    assert "does not extend it" in reasons[2] and "not a readable audio file" in reasons[3]
    assert reasons[4] == "inpaint region (0.5, 1.5) lies outside the 1 s output"
    out = tmp_path / "out"
    proc = run_cli(jobs, out)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 5 and "Traceback" not in proc.stderr
    assert not out.exists()


def test_a_byte_order_mark_is_not_a_json_error(tmp_path):
    path = tmp_path / "jobs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"prompt": "rain", "duration": 1, "name": "rain"}).encode() + b"\n")
    jobs, problems = batch.parse_jobs(path)
    assert problems == [] and [j.name for j in jobs] == ["rain"]


def test_an_output_folder_that_cannot_be_made_is_one_line(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(1))
    (tmp_path / "file").write_text("mine")
    proc = run_cli(jobs, tmp_path / "file" / "out")
    assert proc.returncode == 2 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: cannot write to the output folder {tmp_path / 'file' / 'out'}: ")
    assert (tmp_path / "file").read_text() == "mine"


def test_the_weights_fingerprint_ignores_hidden_files(tmp_path):
    # macOS writes ._name AppleDouble files beside every file copied to an exFAT or network volume; a .cache folder
    # is a tool's. Neither is a weight: a resume after copying the checkpoint must not read as "other weights".
    src = conftest.REF / "sa3_small_tiny_s0"  # through the module: only this test needs the fixtures
    model = tmp_path / "model"
    shutil.copytree(src, model, ignore=shutil.ignore_patterns("*.npz", "lora"))
    before = batch.model_identity(model)
    (model / "._model.safetensors").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    (model / ".cache").mkdir()
    (model / ".cache" / "model.safetensors").write_bytes(b"partial download")
    assert batch.model_identity(model)["weights_hash"] == before["weights_hash"]
    with open(model / "model.safetensors", "r+b") as f:  # a real change still shows
        f.seek(-4, os.SEEK_END)
        f.write(b"\x01\x02\x03\x04")
    assert batch.model_identity(model)["weights_hash"] != before["weights_hash"]


def test_parse_jobs_defaults_are_deterministic(tmp_path):
    path = write_jobs(tmp_path / "jobs.jsonl", [{"prompt": "Rain, on a roof!", "duration": 1.5}])
    (a,), problems = batch.parse_jobs(path)
    (b,), _ = batch.parse_jobs(path)
    assert problems == [] and a.name == b.name and a.seed == b.seed
    assert a.name.startswith("rain-on-a-roof-") and a.file == f"{a.name}.wav"
    assert a.settings["steps"] == batch.DEFAULT_STEPS and a.settings["cfg_scale"] == 1.0


def test_grouping_and_split():
    jobs = [
        batch.Job(
            i,
            f"j{i}",
            {
                "duration": d,
                "steps": 8,
                "sampler": None,
                "cfg_scale": 1.0,
                "init_audio": None,
                "init_noise_level": None,
                "inpaint_audio": None,
                "inpaint_regions": None,
                "negative_prompt": None,
                "seed": i,
                "prompt": "p",
            },
            f"j{i}.wav",
        )
        for i, d in enumerate([2, 2, 5, 2, 5, 2, 2])
    ]
    groups = batch.group_jobs(jobs, 2)
    assert [[j.name for j in g] for g in groups] == [["j0", "j1"], ["j3", "j5"], ["j6"], ["j2", "j4"]]
    split = batch.split_batches(groups, 2)
    assert sorted(j.name for r in split for g in r for j in g) == sorted(j.name for j in jobs)
    assert split == batch.split_batches(groups, 2)  # deterministic
    loads = [sum(j.cost for g in r for j in g) for r in split]
    assert max(loads) - min(loads) <= max(j.cost for j in jobs) * 2


def test_runs_and_skips_done_jobs(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(4))
    out = tmp_path / "out"
    proc = run_cli(jobs, out, "--max-batch", "2")
    assert proc.returncode == 0, proc.stderr
    assert "4 done, 0 skipped, 0 failed" in proc.stdout
    entries = manifest(out)
    assert [e["name"] for e in entries] == [f"clip{i:02d}" for i in range(4)]
    for e in entries:
        data, _ = sf.read(out / e["file"], dtype="float32", always_2d=True)
        assert e["status"] == "done" and e["bytes"] == (out / e["file"]).stat().st_size
        assert data.shape == (round(e["settings"]["duration"] * SR), 2)
        assert e["model"]["id"] == "demo" and len(e["model"]["weights_hash"]) == 64
        assert e["batch"]["size"] == 2  # equal durations paired
    again = run_cli(jobs, out, "--max-batch", "2")
    assert again.returncode == 0 and "0 done, 4 skipped" in again.stdout


def test_audio_jobs_run_with_the_pipelines_defaults(tmp_path):
    # init_audio without init_noise_level takes the pipeline's default (it raised KeyError in the parser).
    rng = np.random.default_rng(0)
    source = tmp_path / "in.wav"
    sf.write(source, rng.uniform(-0.5, 0.5, (SR, 2)).astype(np.float32), SR, subtype="FLOAT")
    lines = [
        {"prompt": "jazz", "duration": 1.0, "seed": 3, "steps": 3, "init_audio": "in.wav", "name": "a2a"},
        {"prompt": "more", "duration": 1.5, "seed": 4, "steps": 3, "inpaint_audio": "in.wav", "name": "cont"},
    ]
    jobs = write_jobs(tmp_path / "jobs.jsonl", lines)
    (a2a, cont), problems = batch.parse_jobs(jobs)
    assert problems == [] and a2a.settings["init_noise_level"] == GenerationRequest.init_noise_level
    out = tmp_path / "out"
    proc = run_cli(jobs, out)
    assert proc.returncode == 0 and "2 done" in proc.stdout, proc.stderr
    pipe = StableAudio3.from_pretrained("demo", dtype="float32", backend="mlx")
    expected = {
        "a2a": pipe.generate("jazz", duration=1.0, seed=3, steps=3, init_audio=str(source)),
        "cont": pipe.generate("more", duration=1.5, seed=4, steps=3, inpaint_audio=str(source)),
    }
    for name, want in expected.items():
        data, _ = sf.read(out / f"{name}.wav", dtype="float32", always_2d=True)
        assert rel_err(data.T, want.audio[0]) <= TOL


def test_the_default_backend_is_auto_and_the_manifest_names_the_one_that_ran(tmp_path):
    assert batch.build_parser().parse_args(["jobs.jsonl", "out"]).backend == "auto"
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(1))
    out = tmp_path / "out"
    proc = run_cli(jobs, out, backend=None)
    assert proc.returncode == 0, proc.stderr
    (entry,) = manifest(out)
    assert entry["backend"] == resolve_backend("auto")[0]  # what ran, not "auto" (same environment as the child)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])  # SIGHUP: the terminal closed (it killed the run)
def test_killed_run_resumes_without_touching_finished_files(tmp_path, signum):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(24, duration=4.0, steps=8))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mlx_sa3.batch", str(jobs), str(out), "--model", "demo", "--quiet"]
    proc = subprocess.Popen(cmd, env=REPO_ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        path = out / "manifest.jsonl"
        if path.exists() and len(path.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err  # as every entry point: 128 + the signal
    finished = {e["name"]: e for e in manifest(out)}
    assert 3 <= len(finished) < 24
    assert not [p for p in os.listdir(out) if p.endswith(".partial")]
    wavs = sorted(p for p in os.listdir(out) if p.endswith(".wav"))
    assert wavs == sorted(e["file"] for e in finished.values())  # nothing half-written at an output path
    before = {f: (os.stat(out / f).st_ino, os.stat(out / f).st_mtime_ns) for f in wavs}

    proc = run_cli(jobs, out)
    assert proc.returncode == 0, proc.stderr
    assert f"{24 - len(finished)} done, {len(finished)} skipped, 0 failed" in proc.stdout
    assert {f: (os.stat(out / f).st_ino, os.stat(out / f).st_mtime_ns) for f in wavs} == before
    assert len(manifest(out)) == 24 and all(e["status"] == "done" for e in manifest(out))


def test_interrupted_while_loading_is_one_line(tmp_path, capsys, monkeypatch):
    # A full-size model loads for seconds: Ctrl-C there printed a KeyboardInterrupt traceback.
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StableAudio3, "from_pretrained", interrupted)
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(1))
    try:
        assert batch.main([str(jobs), str(tmp_path / "out"), "--model", "demo", "--quiet"]) == 130
    finally:
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):  # the runner installed its handlers in this process
            signal.signal(getattr(signal, name), signal.default_int_handler if name == "SIGINT" else signal.SIG_DFL)
    err = capsys.readouterr().err
    assert err.startswith("interrupted: ") and err.count("\n") == 1 and "Traceback" not in err


def test_switching_format_and_back_skips_what_each_format_made(tmp_path):
    # The manifest kept one entry per name, the latest: after a flac run the earlier wav read as a foreign file.
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(1))
    out = tmp_path / "out"
    assert run_cli(jobs, out).returncode == 0
    assert run_cli(jobs, out, "--format", "flac").returncode == 0
    again = run_cli(jobs, out)
    assert again.returncode == 0 and "0 done, 1 skipped" in again.stdout, again.stderr
    assert sorted(e["file"] for e in manifest(out)) == ["clip00.flac", "clip00.wav"]
    flac = run_cli(jobs, out, "--format", "flac")
    assert flac.returncode == 0 and "0 done, 1 skipped" in flac.stdout, flac.stderr


def test_changed_line_refused_unless_overwrite(tmp_path):
    spec = jobs_set(2)
    jobs = write_jobs(tmp_path / "jobs.jsonl", spec)
    out = tmp_path / "out"
    assert run_cli(jobs, out).returncode == 0
    target = out / "clip01.wav"
    stamp = (target.stat().st_ino, target.stat().st_mtime_ns)
    spec[1]["prompt"] = "something else"
    write_jobs(jobs, spec)
    proc = run_cli(jobs, out)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"error: {jobs}:2: name: job 'clip01' changed (prompt) since it was made; pass --overwrite to regenerate it"
    ]
    assert (target.stat().st_ino, target.stat().st_mtime_ns) == stamp
    proc = run_cli(jobs, out, "--overwrite")
    assert proc.returncode == 0 and "1 done, 1 skipped" in proc.stdout
    assert {e["name"]: e["settings"]["prompt"] for e in manifest(out)}["clip01"] == "something else"


TINY = REPO.parent / "shared" / "reference" / "sa3_small_tiny_s0"  # a real (tiny) checkpoint with official LoRAs
LORA = TINY / "lora" / "lora_r4.safetensors"


def test_lora_changes_audio_and_is_recorded(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(2, duration=1.0, steps=2))
    plain, adapted = tmp_path / "plain", tmp_path / "lora"
    assert run_cli(jobs, plain, model=TINY).returncode == 0
    proc = run_cli(jobs, adapted, "--lora", LORA, "--lora-strength", "0.8", "--lora-interval", "0,1", model=TINY)
    assert proc.returncode == 0, proc.stderr
    for with_lora, without in zip(manifest(adapted), manifest(plain)):
        assert with_lora["seed"] == without["seed"]  # same job, same seed: only the adapter differs
        a = sf.read(adapted / with_lora["file"], dtype="float32")[0]
        b = sf.read(plain / without["file"], dtype="float32")[0]
        assert a.shape == b.shape and rel_err(a, b) > 1e-3  # lora_r4 moves v by ~30% (CASES.txt)
        assert with_lora["settings"]["loras"] == [{"strength": 0.8, "interval": [0.0, 1.0]}]
        assert "loras" not in without["settings"] and "loras" not in without["model"]
        assert [entry["sha256"] for entry in with_lora["model"]["loras"]] == [
            hashlib.sha256(LORA.read_bytes()).hexdigest()
        ]
        assert with_lora["model"]["weights_hash"] == without["model"]["weights_hash"]  # the base is the same


@pytest.mark.parametrize(
    ("args", "reason"),
    [
        (["--lora", LORA, "--lora-strength", "0.5"], "changed (loras)"),
        (["--lora", TINY / "lora" / "bora.safetensors", "--lora-strength", "0.8"], "was made with other weights"),
        ([], "changed (loras)"),
    ],
)
def test_rerun_with_other_lora_refused_unless_overwrite(tmp_path, args, reason):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(1, duration=1.0, steps=2))
    out = tmp_path / "out"
    assert run_cli(jobs, out, "--lora", LORA, "--lora-strength", "0.8", model=TINY).returncode == 0
    again = run_cli(jobs, out, "--lora", LORA, "--lora-strength", "0.8", model=TINY)
    assert again.returncode == 0 and "0 done, 1 skipped" in again.stdout
    target = out / "clip00.wav"
    stamp = (target.stat().st_ino, target.stat().st_mtime_ns, target.read_bytes())
    proc = run_cli(jobs, out, *args, model=TINY)
    assert proc.returncode == 2 and reason in proc.stderr and "pass --overwrite" in proc.stderr
    assert (target.stat().st_ino, target.stat().st_mtime_ns, target.read_bytes()) == stamp
    proc = run_cli(jobs, out, *args, "--overwrite", model=TINY)
    assert proc.returncode == 0 and "1 done, 0 skipped" in proc.stdout, proc.stderr
    assert target.read_bytes() != stamp[2]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lora-strength", "0.5"], "--lora-strength / --lora-interval given without --lora"),
        (["--lora", LORA, "--lora-interval", "1,0"], "--lora-interval 1,0: expected finite LO <= HI"),
        (["--lora", "/nonexistent/x.safetensors"], "no such LoRA file"),
    ],
)
def test_bad_lora_flags_refused_before_anything(tmp_path, args, message):
    out = tmp_path / "out"
    proc = run_cli(tmp_path / "missing.jsonl", out, *args, model=TINY)  # the job file is not even read
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_foreign_file_is_never_replaced(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(1))
    out = tmp_path / "out"
    out.mkdir()
    (out / "clip00.wav").write_bytes(b"mine")
    proc = run_cli(jobs, out)
    assert proc.returncode == 2 and "is not a finished job of this manifest" in proc.stderr
    assert (out / "clip00.wav").read_bytes() == b"mine"


@pytest.mark.parametrize("kind", ["directory", "device", "fifo"])
def test_a_manifest_that_is_not_a_regular_file_is_refused_in_one_line(tmp_path, kind):
    # It was read or appended to as it was: a traceback for a directory, writes into /dev/null, a FIFO that blocks.
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(1))
    out = tmp_path / "out"
    out.mkdir()
    target = out / batch.MANIFEST
    {"directory": target.mkdir, "device": lambda: target.symlink_to(os.devnull), "fifo": lambda: os.mkfifo(target)}[
        kind
    ]()
    proc = run_cli(jobs, out)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {target}") and "regular file" in line
    assert sorted(p.name for p in out.iterdir()) == [batch.MANIFEST]


def test_a_manifest_line_that_is_not_utf8_is_skipped_like_a_torn_line(tmp_path):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(2))
    out = tmp_path / "out"
    assert run_cli(jobs, out).returncode == 0
    with open(out / batch.MANIFEST, "ab") as f:
        f.write(b'{"name": "clip01", "status": "\xff\xfe"}\n')  # foreign bytes: that line only is unreadable
    assert sorted(batch.read_manifest(out)) == ["clip00", "clip01"]
    again = run_cli(jobs, out)
    assert again.returncode == 0 and "0 done, 2 skipped" in again.stdout, again.stderr


def test_failed_job_recorded_and_retried(tmp_path, monkeypatch):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(2))
    out = tmp_path / "out"
    calls = {"n": 0}
    real = StableAudio3.generate_to_file

    def flaky(self, path, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise ValueError("simulated failure")
        return real(self, path, *args, **kwargs)

    monkeypatch.setattr(StableAudio3, "generate_to_file", flaky)
    assert batch.main([str(jobs), str(out), "--model", "demo", "--quiet"]) == 2
    assert [e["status"] for e in manifest(out)] == ["failed", "done"]
    assert manifest(out)[0]["error"] == "simulated failure"
    assert batch.main([str(jobs), str(out), "--model", "demo", "--quiet"]) == 0
    assert [e["status"] for e in manifest(out)] == ["done", "done"]


def _launcher():
    exe = shutil.which("mlx.launch")
    return [exe] if exe else [sys.executable, "-m", "mlx._distributed_utils.launch"]


def _comparable(entries):
    return [{k: v for k, v in e.items() if k not in ("timings", "rank", "finished")} for e in entries]


@pytest.mark.parametrize("fmt", ["flac", "wav"])
def test_two_ranks_equal_one(tmp_path, fmt):
    jobs = write_jobs(tmp_path / "jobs.jsonl", jobs_set(7))
    single, double = tmp_path / "one", tmp_path / "two"
    proc = run_cli(jobs, single, "--max-batch", "2", "--format", fmt)
    assert proc.returncode == 0, proc.stderr
    proc = run_cli(jobs, double, "--max-batch", "2", "--format", fmt, launcher=[*_launcher(), "-n", "2", "--"])
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert "7 done, 0 skipped, 0 failed" in proc.stdout and "over 2 ranks" in proc.stdout
    one, two = manifest(single), manifest(double)
    assert _comparable(one) == _comparable(two)
    assert {e["rank"] for e in two} == {0, 1}  # both ranks worked
    assert not list(double.glob("manifest.rank*.jsonl"))  # shards merged
    for e in one:
        a, b = (single / e["file"]).read_bytes(), (double / e["file"]).read_bytes()
        assert a == b  # byte-identical files, WAV included (no PEAK chunk with its write time)
