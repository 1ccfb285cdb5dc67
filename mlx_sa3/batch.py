"""``python -m mlx_sa3.batch JOBS.jsonl OUT_DIR``: a resumable job runner, on one machine or several (``mlx.launch``).

Each line of JOBS.jsonl is one clip: ``{"prompt": "rain on a tin roof", "duration": 10, "seed": 7, "name": "rain"}``.
Every line is checked before the model loads; each finished clip is renamed into place atomically and recorded in
``OUT_DIR/manifest.jsonl`` (appended and fsynced per finished batch), so a rerun of the same command skips what is done,
retries what failed and never touches a finished file. Under ``mlx.launch`` the jobs are split between the ranks
deterministically; see docs/BATCH.md for the file format, the manifest and multi-Mac setups.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import re
import signal
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from . import cli
from .options import DEFAULT_INIT_NOISE_LEVEL, validate_inpaint_regions
from .outputs import MISSING, not_a_file, os_error_message

MANIFEST = "manifest.jsonl"
SHARD = "manifest.rank{rank}.jsonl"  # one per rank when several ranks run; rank 0 merges them into MANIFEST
MAX_SEED = 2**63
DEFAULT_STEPS = 8  # the pipeline's default, recorded explicitly so a manifest entry says what was run

# field -> (kind, required); kinds are checked by _check_field
FIELDS = {
    "name": ("name", False),
    "prompt": ("text", True),
    "duration": ("seconds", True),
    "seed": ("seed", False),
    "negative_prompt": ("text", False),
    "steps": ("steps", False),
    "sampler": ("text", False),
    "cfg_scale": ("number", False),
    "init_audio": ("file", False),
    "init_noise_level": ("level", False),
    "inpaint_audio": ("file", False),
    "inpaint_regions": ("regions", False),
}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class BatchError(Exception):
    """A problem that stops the run before generation; printed as one line, exit status 2."""


#: the ``field`` of a problem with the whole line (not JSON, not an object)
WHOLE_LINE = "-"


@dataclass(frozen=True)
class Problem:
    line: int
    field: str
    reason: str

    def format(self, path) -> str:
        where = "" if self.field == WHOLE_LINE else f" {self.field}:"
        return f"{path}:{self.line}:{where} {self.reason}"


@dataclass
class Job:
    """One validated job line. ``settings`` is everything that decides the audio (the seed included)."""

    line: int
    name: str
    settings: dict
    file: str  # output file name inside OUT_DIR
    audio_paths: dict = field(default_factory=dict)  # init_audio / inpaint_audio resolved against the job file

    @property
    def seed(self) -> int:
        return self.settings["seed"]

    @property
    def cost(self) -> float:
        """Relative work of this job (DiT steps x latents), used to balance ranks."""
        return self.settings["steps"] * (self.settings["duration"] + 6.0)


# -- job file -------------------------------------------------------------------------------------------------------


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_field(kind: str, value, base: Path, max_duration: float | None) -> str | None:
    """Why ``value`` is not a valid ``kind``, or None."""
    if kind == "name":
        if not isinstance(value, str) or not _NAME.match(value):
            return "must be 1-128 characters of letters, digits, '.', '_' or '-', not starting with '.', '_' or '-'"
    elif kind == "text":
        if not isinstance(value, str):
            return f"must be a string, got {type(value).__name__}"
    elif kind == "seconds":
        if not _number(value) or value <= 0:
            return f"must be a positive number of seconds, got {value!r}"
        if max_duration is not None and value > max_duration + 1e-9:
            return f"{value:g} s exceeds this model's maximum of {max_duration:.1f} s"
    elif kind == "seed":
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < MAX_SEED:
            return f"must be an integer in [0, 2**63), got {value!r}"
    elif kind == "steps":
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            return f"must be an integer of at least 1, got {value!r}"
    elif kind == "number":
        if not _number(value):
            return f"must be a number, got {value!r}"
    elif kind == "level":
        if not _number(value) or not 0 < value <= 1:
            return f"must be in (0, 1], got {value!r}"
    elif kind == "file":
        if not isinstance(value, str) or not value:
            return "must be a path (string)"
        problem = not_a_file(base / value)
        if problem is not None:
            return f"no such file: {base / value}" if problem == MISSING else f"{base / value} is {problem}"
    elif kind == "regions" and (
        not isinstance(value, list)
        or not all(
            isinstance(r, list) and len(r) == 2 and all(_number(v) for v in r) and 0 <= r[0] < r[1] for r in value
        )
    ):
        return "must be a list of [start, end] pairs in seconds with 0 <= start < end"
    return None


def _cross_checks(job: dict, samplers) -> list[tuple[str, str]]:
    out = []
    if "init_noise_level" in job and "init_audio" not in job:
        out.append(("init_noise_level", "needs init_audio"))
    if "inpaint_regions" in job and "inpaint_audio" not in job:
        out.append(("inpaint_regions", "needs inpaint_audio (the audio to keep outside the regions)"))
    if "negative_prompt" in job and job.get("cfg_scale", 1.0) == 1.0:
        out.append(("negative_prompt", "has no effect without a cfg_scale other than 1"))
    if isinstance(job.get("sampler"), str) and job["sampler"] not in samplers:
        out.append(("sampler", f"unknown sampler {job['sampler']!r}; choose one of {', '.join(samplers)}"))
    if (
        isinstance(job.get("prompt"), str)
        and not job["prompt"].strip()
        and not ("init_audio" in job or "inpaint_audio" in job)
    ):
        out.append(("prompt", "must not be empty for text-to-audio"))
    return out


def _audio_checks(job: dict, base: Path, seconds: dict) -> list[tuple[str, str]]:
    """What would fail the job when it generates: audio that cannot be read, regions the inpaint audio refutes.

    Each file is decoded once per job file (``seconds`` caches its length), as the pipeline will read it.
    """
    from .audio import SAMPLE_RATE, AudioError, read_audio

    out = []
    for key in ("init_audio", "inpaint_audio"):
        if key not in job:
            continue
        source = (base / job[key]).resolve()
        if source not in seconds:
            try:
                seconds[source] = read_audio(source).shape[1] / SAMPLE_RATE
            except AudioError as err:
                seconds[source] = str(err)
        if isinstance(seconds[source], str):
            out.append((key, seconds[source]))
        elif key == "inpaint_audio":
            regions = job.get("inpaint_regions")
            try:
                validate_inpaint_regions(regions, seconds[source], float(job["duration"]))
            except ValueError as err:
                out.append(("inpaint_regions" if regions else key, str(err)))
    return out


def _canonical(settings: dict) -> str:
    return json.dumps(settings, sort_keys=True, separators=(",", ":"))


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "job"


def _settings(raw: dict) -> dict:
    """Every setting spelled out (defaults included), so two lines that mean the same run compare equal."""
    settings = {
        "prompt": raw["prompt"],
        "duration": float(raw["duration"]),
        "negative_prompt": raw.get("negative_prompt"),
        "steps": raw.get("steps", DEFAULT_STEPS),
        "sampler": raw.get("sampler"),  # None: the checkpoint's official default
        "cfg_scale": float(raw.get("cfg_scale", 1.0)),
        "init_audio": raw.get("init_audio"),
        "init_noise_level": float(raw.get("init_noise_level", DEFAULT_INIT_NOISE_LEVEL))
        if "init_audio" in raw
        else None,
        "inpaint_audio": raw.get("inpaint_audio"),
        "inpaint_regions": [[float(a), float(b)] for a, b in raw["inpaint_regions"]]
        if "inpaint_regions" in raw
        else None,
    }
    return settings


def _derived_seed(name: str, settings: dict) -> int:
    """A seed from the job itself, so reruns and every rank agree on it without a random draw."""
    return int(_digest(f"{name}\0{_canonical(settings)}")[:8], 16) % 2**31


def parse_jobs(
    path, max_duration: float | None = None, fmt: str = "wav", loras=None
) -> tuple[list[Job], list[Problem]]:
    """Read and validate every line of a JSONL job file; returns the jobs and every problem found (all of them).

    Blank lines are skipped. Relative audio paths are relative to the job file's folder. Without ``name`` a job is
    named from its prompt and a hash of its settings; without ``seed`` the seed is derived from the name and settings.
    ``loras`` (the command line's ``[(path, strength, interval), ...]``) adds their strengths and intervals to every
    job's settings after the name and seed are made, so the same job keeps its name and seed with other LoRA
    settings (a rerun with other strengths is a changed job) and a LoRA's effect shows at the same seed.
    """
    from .sampling import SAMPLERS

    path = Path(path)
    base = path.parent
    jobs, problems, names, audio_seconds = [], [], {}, {}
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a byte-order mark some editors write
    except (OSError, UnicodeDecodeError) as err:
        raise BatchError(f"cannot read the job file {path}: {err}") from None
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            problems.append(Problem(number, WHOLE_LINE, f"not valid JSON: {err.msg} (column {err.colno})"))
            continue
        if not isinstance(raw, dict):
            problems.append(Problem(number, WHOLE_LINE, f"must be a JSON object, got {type(raw).__name__}"))
            continue
        found = [Problem(number, k, "unknown field; known: " + ", ".join(FIELDS)) for k in raw if k not in FIELDS]
        for key, (kind, required) in FIELDS.items():
            if key not in raw:
                if required:
                    found.append(Problem(number, key, "missing"))
                continue
            reason = _check_field(kind, raw[key], base, max_duration)
            if reason:
                found.append(Problem(number, key, reason))
        found += [Problem(number, k, r) for k, r in _cross_checks(raw, SAMPLERS)]
        if not found:
            found = [Problem(number, k, r) for k, r in _audio_checks(raw, base, audio_seconds)]
        given = raw.get("name") if isinstance(raw.get("name"), str) else None
        if given is not None and given.lower() in names:
            found.append(Problem(number, "name", _name_taken(given, *names[given.lower()])))
        elif given is not None:
            names[given.lower()] = (number, given)
        if found:
            problems += found
            continue
        settings = _settings(raw)
        name = given or f"{_slug(raw['prompt'])}-{_digest(_canonical({**settings, 'seed': raw.get('seed')}))[:10]}"
        if name.lower() in names and names[name.lower()][0] != number:
            problems.append(Problem(number, "name", _name_taken(name, *names[name.lower()])))
            continue
        names[name.lower()] = (number, name)
        settings["seed"] = raw["seed"] if "seed" in raw else _derived_seed(name, settings)
        if loras:
            settings["loras"] = lora_settings(loras)
        audio = {k: str((base / raw[k]).resolve()) for k in ("init_audio", "inpaint_audio") if k in raw}
        jobs.append(Job(number, name, settings, f"{name}.{fmt}", audio))
    return jobs, problems


def _name_taken(name: str, line: int, used: str) -> str:
    # Names are compared ignoring letter case: on macOS's default file system rain.wav and Rain.wav are one file.
    if used == name:
        return f"{name!r} is already used by line {line}"
    return f"{name!r} is already used by line {line} as {used!r} (names differing only in case are one file on macOS)"


def lora_settings(loras) -> list[dict]:
    """Strength and sigma interval of each LoRA, by position (the files themselves are in :func:`model_identity`)."""
    return [
        {"strength": float(strength), "interval": None if interval is None else [float(v) for v in interval]}
        for _, strength, interval in loras
    ]


# -- grouping and the split between ranks ---------------------------------------------------------------------------


def job_batch_key(job: Job) -> tuple:
    """What jobs must share to go into one call today: everything but prompt, seed and negative-prompt text.

    The per-item pipeline (:mod:`mlx_sa3.items`) would also take mixed durations in one call (it groups them by
    latent length itself); keeping the duration in the key makes each call one DiT batch. Once the DiT masks padded
    keys, drop ``duration`` here and nothing else changes.
    """
    s = job.settings
    return (
        s["duration"],
        s["steps"],
        s["sampler"],
        s["cfg_scale"],
        s["init_audio"],
        s["init_noise_level"],
        s["inpaint_audio"],
        _canonical(s["inpaint_regions"]),
        s["negative_prompt"] is not None,
    )


def group_jobs(jobs: list[Job], max_batch: int, key=job_batch_key) -> list[list[Job]]:
    """Jobs with equal keys in job-file order, cut into batches of at most ``max_batch`` (first appearance order)."""
    groups: dict = {}
    for job in jobs:
        groups.setdefault(key(job), []).append(job)
    return [g[i : i + max_batch] for g in groups.values() for i in range(0, len(g), max_batch)]


def split_batches(batches: list[list[Job]], size: int) -> list[list[list[Job]]]:
    """Deterministic split of whole batches between ``size`` ranks: longest first onto the least loaded rank.

    It depends only on the job file, --max-batch and the number of ranks (not on what is done), so every rank works
    it out alone, reruns with the same ranks resume each rank's own jobs, and a batch is the same set of jobs
    whether one rank or many run it (the same DiT batch, hence the same bytes).
    """
    load = [0.0] * size
    out: list = [[] for _ in range(size)]
    order = sorted(range(len(batches)), key=lambda i: (-sum(j.cost for j in batches[i]), i))
    for i in order:
        rank = min(range(size), key=lambda r: (load[r], r))
        out[rank].append(i)
        load[rank] += sum(j.cost for j in batches[i])
    return [[batches[i] for i in sorted(idx)] for idx in out]


# -- model identity -------------------------------------------------------------------------------------------------


HASH_METHOD = "sha256 over each *.safetensors file: name, size, header, 16 x 64 KiB evenly spaced samples"
_SAMPLES, _SAMPLE_BYTES = 16, 65536


def _file_fingerprint(path: Path, digest) -> None:
    size = path.stat().st_size
    digest.update(f"{path.name}\0{size}\0".encode())
    with open(path, "rb") as f:
        head = f.read(8)
        header_len = int.from_bytes(head, "little") if len(head) == 8 else 0
        digest.update(head + f.read(min(header_len, 100_000_000)))
        start = f.tell()
        span = max(size - start - _SAMPLE_BYTES, 0)
        for i in range(_SAMPLES):
            f.seek(start + span * i // max(_SAMPLES - 1, 1))
            digest.update(f.read(_SAMPLE_BYTES))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_identity(src, loras=None) -> dict:
    """Model id and a cheap fingerprint of its weights (not a full hash: headers, sizes and sampled bytes).

    A fine-tune changes sampled bytes, so it changes the fingerprint; reading ~1 MiB per file keeps it cheap for
    multi-GB checkpoints. The demo model is identified by its config (its weights are drawn from a fixed seed).
    ``loras`` (``[(path, strength, interval), ...]``) adds ``"loras"``: each adapter file's path and full sha256, in
    load order (adapters are small enough to hash whole); their strengths and intervals are job settings.
    """
    identity = _base_identity(src)
    if loras:
        identity["loras"] = [{"file": str(path), "sha256": _sha256_file(Path(path))} for path, *_ in loras]
    return identity


def _base_identity(src) -> dict:
    if str(src) == "demo":
        from .demo import DEMO_CONFIG, DEMO_TEXT_CONFIG

        text = _canonical({"model": DEMO_CONFIG, "text": DEMO_TEXT_CONFIG, "seed": 0})
        return {"id": "demo", "weights_hash": _digest(text), "hash_method": "sha256 of the demo config (seed 0)"}
    from .loading import open_source

    root = open_source(src).root
    digest = hashlib.sha256()
    files = sorted(p for p in Path(root).rglob("*.safetensors") if p.is_file() and not _hidden(p, root))
    for path in files:
        digest.update(str(path.relative_to(root)).encode())
        _file_fingerprint(path, digest)
    return {"id": str(src), "weights_hash": digest.hexdigest(), "hash_method": HASH_METHOD}


def _hidden(path: Path, root) -> bool:
    """Under a dot-name: macOS's ._ AppleDouble files (copies to exFAT or network volumes), a tool's .cache."""
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def same_weights(recorded: dict, identity: dict) -> bool:
    """The same base weights and the same LoRA files in the same order (by content: moving a file is no change)."""
    return recorded.get("weights_hash") == identity["weights_hash"] and [
        lora.get("sha256") for lora in recorded.get("loras", [])
    ] == [lora["sha256"] for lora in identity.get("loras", [])]


def max_duration_of(src) -> float:
    """The checkpoint's longest output (config ``sample_size``), read without loading weights."""
    if str(src) == "demo":
        from .checkpoint import SA3Config
        from .demo import DEMO_CONFIG

        config = SA3Config.from_dict(DEMO_CONFIG)
    else:
        from .checkpoint import model_config_of
        from .loading import open_source

        config = model_config_of(open_source(src))
    return config.sample_size / config.sample_rate


# -- manifest -------------------------------------------------------------------------------------------------------


def _read_lines(path: Path) -> list[dict]:
    """Entries of one manifest file; a torn last line (a crash mid-write) or a line of foreign bytes is skipped.

    Only a regular file is read (and later appended to): a directory, device or FIFO in its place is refused.
    """
    problem = not_a_file(path)
    if problem == MISSING:
        return []
    if problem is not None:
        raise BatchError(f"{path} is {problem}; the manifest must be a regular file (move it away)")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise BatchError(f"cannot read the manifest {path}: {err.strerror or err}") from None
    entries = []
    for line in data.splitlines():
        with contextlib.suppress(UnicodeDecodeError, json.JSONDecodeError):
            entry = json.loads(line.decode("utf-8"))
            if isinstance(entry, dict) and "name" in entry:
                entries.append(entry)
    return entries


def manifest_files(out_dir: Path) -> list[Path]:
    return [out_dir / MANIFEST, *sorted(out_dir.glob(SHARD.format(rank="*")))]


def read_manifest(out_dir: Path) -> dict[str, dict]:
    """The latest entry per job name over the manifest and any rank shards."""
    return {entry["name"]: entry for entry in _manifest_entries(out_dir)}


def read_manifest_files(out_dir: Path) -> dict[str, dict]:
    """The latest entry per output file (``name.wav`` and ``name.flac`` are two outputs of one job name)."""
    return {_entry_file(entry): entry for entry in _manifest_entries(out_dir)}


def _manifest_entries(out_dir: Path) -> Iterator[dict]:
    """Every entry of the manifest, then of each rank shard, in order (later ones are newer)."""
    for path in manifest_files(out_dir):
        yield from _read_lines(path)


def _entry_file(entry: dict) -> str:
    return entry.get("file") if isinstance(entry.get("file"), str) else entry["name"]


def append_entries(path: Path, entries: list[dict]) -> None:
    """Append entries as JSON lines and fsync: a finished job survives a crash right after."""
    if not entries:
        return
    data = "".join(json.dumps(e, sort_keys=True) + "\n" for e in entries).encode()
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o666)
    try:
        end = os.fstat(fd).st_size
        if end and os.pread(fd, 1, end - 1) != b"\n":
            data = b"\n" + data  # a torn line from a crash must not swallow this entry
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(out_dir: Path, entries: list[dict]) -> None:
    """Replace the manifest atomically (temporary file, fsync, rename, directory fsync)."""
    target = out_dir / MANIFEST
    tmp = out_dir / f".{MANIFEST}.{os.getpid()}.partial"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(entry, sort_keys=True) + "\n" for entry in entries)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
        _fsync_dir(out_dir)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def compact(entries: list[dict], jobs: list[Job]) -> list[dict]:
    """One entry per name and file (the latest), in job-file order; names no longer in the job file keep their
    place after (a job made as wav and as flac keeps both entries: both files are on disk)."""
    latest = {}
    for entry in entries:
        key = (entry["name"], _entry_file(entry))
        latest.pop(key, None)
        latest[key] = entry
    order = {job.name: i for i, job in enumerate(jobs)}
    return sorted(latest.values(), key=lambda e: order.get(e["name"], len(order)))


# -- what is done ---------------------------------------------------------------------------------------------------


def job_state(job: Job, entry: dict | None, out_dir: Path, identity: dict) -> str:
    """ "done" (skip), "pending" (generate), or "conflict" (a file is there that this job may not replace)."""
    target = out_dir / job.file
    if not os.path.lexists(target):
        return "pending"
    if (
        entry is not None
        and entry.get("status") == "done"
        and entry.get("file") == job.file
        and target.is_file()
        and target.stat().st_size == entry.get("bytes")
        and entry.get("settings") == job.settings
        and same_weights(entry.get("model", {}), identity)
    ):
        return "done"
    return "conflict"


def conflict_reason(job: Job, entry: dict | None, out_dir: Path, identity: dict) -> str:
    target = out_dir / job.file
    if entry is None or entry.get("status") != "done" or entry.get("file") != job.file:
        return f"{target} exists but is not a finished job of this manifest; move it away or pass --overwrite"
    if not target.is_file() or target.stat().st_size != entry.get("bytes"):
        return f"{target} differs from the recorded file ({entry.get('bytes')} bytes); move it away or pass --overwrite"
    if entry.get("settings") != job.settings:
        changed = sorted(
            k
            for k in set(job.settings) | set(entry.get("settings", {}))
            if job.settings.get(k) != entry.get("settings", {}).get(k)
        )
        return f"job {job.name!r} changed ({', '.join(changed)}) since it was made; pass --overwrite to regenerate it"
    recorded = entry.get("model", {})
    loras = ", ".join(Path(lora.get("file", "?")).name for lora in recorded.get("loras", [])) or "none"
    return (
        f"job {job.name!r} was made with other weights (recorded: {recorded.get('id')}, LoRA files: {loras}); "
        "pass --overwrite to regenerate it"
    )


# -- distributed ----------------------------------------------------------------------------------------------------


class Ranks:
    """This process's place among the ranks (``mx.distributed``; one rank without a launcher)."""

    def __init__(self):
        import mlx.core as mx

        self.mx = mx
        self.group = mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over the ranks; also the barrier (every rank must call it)."""
        if self.size == 1:
            return list(values)
        mx = self.mx
        out = mx.distributed.all_sum(mx.array(values, dtype=mx.float32), group=self.group, stream=mx.cpu)
        return out.tolist()

    def gather_text(self, text: str) -> list[str]:
        """Every rank's ``text``, in rank order."""
        if self.size == 1:
            return [text]
        import numpy as np

        mx = self.mx
        data = text.encode()
        sizes = [0.0] * self.size
        sizes[self.rank] = float(len(data))
        sizes = [int(s) for s in self.sum(sizes)]
        width = max(max(sizes), 1)
        padded = np.zeros(width, dtype=np.uint8)
        padded[: len(data)] = np.frombuffer(data, dtype=np.uint8)
        rows = np.array(mx.distributed.all_gather(mx.array(padded), group=self.group, stream=mx.cpu))
        rows = rows.reshape(self.size, width)
        return [rows[r, : sizes[r]].tobytes().decode() for r in range(self.size)]


# -- signals --------------------------------------------------------------------------------------------------------


class Interrupts:
    """Ctrl-C, SIGTERM and SIGHUP stop the run, except while a finished batch is being renamed and recorded.

    ``signum`` is the signal that stopped it (the exit status is 128 + it, as for every entry point).
    """

    def __init__(self):
        self.deferred = False
        self.pending = None
        self.signum = signal.SIGINT

    def install(self):
        for name in ("SIGTERM", "SIGINT", "SIGHUP"):
            if hasattr(signal, name):
                signal.signal(getattr(signal, name), self._handler)

    def _handler(self, signum, frame):
        self.signum = signum
        if self.deferred:
            self.pending = signum
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def recording(self):
        """Deferral ends here; a signal that came in meanwhile stops the run now that the batch is recorded."""
        try:
            yield
        finally:
            self.deferred = False
            if self.pending is not None:
                self.pending = None
                raise KeyboardInterrupt


# -- running --------------------------------------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def run_batch(
    pipe,
    batch: list[Job],
    out_dir: Path,
    fmt: str,
    interrupts: Interrupts,
    stamp: dict,
    callback=None,
    overwrite: bool = False,
):
    """Generate one batch of jobs in one call; returns (manifest entries, error or None)."""
    from .audio import AudioError
    from .sampling import NonFiniteError

    s = batch[0].settings
    paths = [out_dir / job.file for job in batch]

    def on_event(event):
        if event.stage == "done":  # from here on only renames happen: let them finish and be recorded
            interrupts.deferred = True
        return True if callback is None else callback(event)

    start = time.perf_counter()
    error = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # every setting was checked up front
        try:
            out = pipe.generate_to_file(
                paths,
                [job.settings["prompt"] for job in batch],
                duration=[job.settings["duration"] for job in batch],
                fmt=fmt,
                callback=on_event,
                overwrite=overwrite,
                seed=[job.seed for job in batch],
                negative_prompt=[job.settings["negative_prompt"] for job in batch]
                if s["negative_prompt"] is not None
                else None,
                steps=s["steps"],
                sampler=s["sampler"],
                cfg_scale=s["cfg_scale"],
                init_audio=batch[0].audio_paths.get("init_audio"),
                init_noise_level=s["init_noise_level"] if s["init_audio"] else DEFAULT_INIT_NOISE_LEVEL,
                inpaint_audio=batch[0].audio_paths.get("inpaint_audio"),
                inpaint_regions=s["inpaint_regions"],
            )
        except (ValueError, AudioError, NonFiniteError, OSError) as err:
            interrupts.deferred = False
            error = str(err) or type(err).__name__
    seconds = time.perf_counter() - start
    entries = []
    for row, job in enumerate(batch):
        entry = {
            "name": job.name,
            "line": job.line,
            "settings": job.settings,
            "seed": job.seed,
            "file": job.file,
            "batch": {"size": len(batch), "index": row, "first": batch[0].name},
            "finished": _now(),
            **stamp,
        }
        if error is None:
            entry.update(
                status="done",
                bytes=(out_dir / job.file).stat().st_size,
                timings={
                    "batch_seconds": round(seconds, 3),
                    **{k: round(v, 3) if isinstance(v, float) else v for k, v in out.timings.items()},
                },
            )
        else:
            entry.update(status="failed", error=error, timings={"batch_seconds": round(seconds, 3)})
        entries.append(entry)
    return entries, error


@dataclass
class Counts:
    done: int = 0
    skipped: int = 0
    failed: int = 0


def _progress(total: int, initial: int, rank: Ranks, quiet: bool):
    if quiet:
        return None
    from tqdm import tqdm

    desc = "jobs" if rank.size == 1 else f"rank {rank.rank} jobs"
    return tqdm(total=total, initial=initial, desc=desc, unit="clip", file=sys.stderr, dynamic_ncols=True)


def build_parser() -> argparse.ArgumentParser:
    from .generate import _add_lora_arguments

    p = cli.ArgumentParser(
        prog="python -m mlx_sa3.batch",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="several ranks: mlx.launch -n 2 -- python -m mlx_sa3.batch JOBS.jsonl OUT_DIR ...",
    )
    p.add_argument("jobs", help="JSONL job file, one job per line")
    p.add_argument("out_dir", help="output folder (created if missing); holds the clips and manifest.jsonl")
    p.add_argument(
        "--model",
        default="stabilityai/stable-audio-3-small-music",
        help="Hub repo id, local directory (original or converted), or 'demo' (tiny random model)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "float16", "bfloat16"),
        help="DiT/text precision (default: half on Metal, float32 on CPU)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        choices=("auto", "mlx", "torch"),
        help="compute backend (default auto, as python -m mlx_sa3.generate; the manifest records the one that ran)",
    )
    _add_lora_arguments(p)  # parsed by generate.lora_entries, exactly as python -m mlx_sa3.generate does
    p.add_argument("--max-batch", type=int, default=1, help="most jobs per DiT batch (default 1)")
    p.add_argument("--format", choices=("wav", "flac"), default="wav", help="output format (default wav)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="regenerate jobs whose line changed and replace files this manifest did not finish",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    interrupts = Interrupts()
    try:
        return _main(args, interrupts)
    except BatchError as err:
        return cli.fail(str(err))
    except KeyboardInterrupt:  # before the first batch (loading the model): nothing was generated
        print("interrupted: no clip was generated; rerun the same command to start", file=sys.stderr)
        return 128 + int(interrupts.signum)


def _main(args, interrupts: Interrupts) -> int:
    from .generate import lora_entries
    from .loading import CheckpointError

    if args.max_batch < 1:
        raise BatchError(f"--max-batch must be at least 1, got {args.max_batch}")
    try:
        loras = lora_entries(args)  # every LoRA file checked before the job file, the manifest or the model
    except (ValueError, CheckpointError) as err:
        raise BatchError(str(err)) from None
    out_dir = Path(args.out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise BatchError(f"output folder {out_dir} is not a directory")
    try:
        max_duration = max_duration_of(args.model)
        identity = model_identity(args.model, loras)
    except (CheckpointError, OSError) as err:
        raise BatchError(str(err)) from None
    jobs, problems = parse_jobs(args.jobs, max_duration, args.format, loras)
    ranks = Ranks()

    # every rank checks everything; all stop if any rank found a problem (per-host folders can differ)
    manifest = read_manifest_files(out_dir) if out_dir.is_dir() else {}
    states = {job.name: job_state(job, manifest.get(job.file), out_dir, identity) for job in jobs}
    conflicts = (
        []
        if args.overwrite
        else [
            Problem(job.line, "name", conflict_reason(job, manifest.get(job.file), out_dir, identity))
            for job in jobs
            if states[job.name] == "conflict"
        ]
    )
    found = [0.0] * ranks.size
    found[ranks.rank] = float(len(problems) + len(conflicts))
    found = ranks.sum(found)
    if any(found):
        if ranks.rank == 0 or found[0] == 0:
            for problem in problems + conflicts:
                print(f"error: {problem.format(args.jobs)}", file=sys.stderr)
            if not problems and not conflicts:
                print(f"error: rank {ranks.rank}: another rank refused the job file", file=sys.stderr)
        return 2
    if not jobs:
        raise BatchError(f"{args.jobs} has no jobs")

    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        lock = _lock(out_dir, ranks.rank)
    except OSError as err:  # under a regular file, read-only, no permission: before the model loads
        raise BatchError(os_error_message(err, out_dir, "cannot write to the output folder")) from None
    mine = split_batches(group_jobs(jobs, args.max_batch), ranks.size)[ranks.rank]
    from .outputs import remove_stale_temporaries

    remove_stale_temporaries(out_dir)  # the atomic writer's temporaries left by a hard kill of an earlier run

    interrupts.install()
    counts = Counts()
    start = time.perf_counter()
    try:
        from .pipeline import StableAudio3

        pipe = StableAudio3.from_pretrained(args.model, dtype=args.dtype, backend=args.backend, loras=loras)
    except (CheckpointError, ValueError, OSError) as err:
        raise BatchError(str(err)) from None
    stamp = {"model": identity, "backend": pipe.backend, "dtype": args.dtype, "rank": ranks.rank}
    shard = out_dir / (MANIFEST if ranks.size == 1 else SHARD.format(rank=ranks.rank))
    written = []
    total = sum(len(b) for b in mine)
    skipped = sum(states[j.name] == "done" for b in mine for j in b)
    counts.skipped = skipped
    bar = _progress(total, skipped, ranks, args.quiet)
    gen_start = time.perf_counter()
    interrupted = False
    try:
        for batch in mine:
            todo = [job for job in batch if states[job.name] != "done"]
            if not todo:
                continue
            entries, error = run_batch(pipe, todo, out_dir, args.format, interrupts, stamp, overwrite=args.overwrite)
            with interrupts.recording():
                append_entries(shard, entries)
                _fsync_dir(out_dir)
                written += entries
                if error is None:
                    counts.done += len(todo)
                else:
                    counts.failed += len(todo)
            if error is not None:
                message = f"error: jobs {', '.join(j.name for j in todo)} failed: {error}"
                (bar.write(message, file=sys.stderr) if bar else print(message, file=sys.stderr))
            if bar:
                bar.update(len(todo))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if bar:
            bar.close()
    gen_seconds = time.perf_counter() - gen_start
    if interrupted:
        print(
            f"interrupted: {counts.done} clips finished and recorded; rerun the same command to resume", file=sys.stderr
        )
        return 128 + int(interrupts.signum)

    totals = ranks.sum([counts.done, counts.skipped, counts.failed, gen_seconds])  # the barrier before merging
    gathered = ranks.gather_text("".join(json.dumps(e, sort_keys=True) + "\n" for e in written))
    if ranks.rank == 0:
        _merge(out_dir, jobs, gathered, ranks.size)
        done, skipped, failed = (int(v) for v in totals[:3])
        # ranks run side by side: the wall time is the longest rank's, summed seconds over-count
        wall = time.perf_counter() - start
        rate = done / (gen_seconds / 3600) if done and gen_seconds > 0 else 0.0
        print(
            f"{done} done, {skipped} skipped, {failed} failed in {wall:.1f} s "
            f"({rate:.0f} clips/hour over {ranks.size} rank{'s' if ranks.size > 1 else ''}); "
            f"manifest: {out_dir / MANIFEST}"
        )
    del lock
    return 2 if totals[2] else 0


def _merge(out_dir: Path, jobs: list[Job], gathered: list[str], size: int) -> None:
    """Rank 0: the manifest, every shard it can see and what every rank sent, compacted into one manifest."""
    shards = sorted(out_dir.glob(SHARD.format(rank="*")))
    entries = [e for path in [out_dir / MANIFEST, *shards] for e in _read_lines(path)]
    if size > 1:
        entries += [json.loads(line) for text in gathered for line in text.splitlines() if line.strip()]
    write_manifest(out_dir, compact(entries, jobs))
    for path in shards:  # merged above; per-host folders keep the other ranks' shards on their own hosts
        path.unlink(missing_ok=True)


def _lock(out_dir: Path, rank: int):
    """An exclusive lock per rank: a second run on the same folder would race this one's renames."""
    handle = open(out_dir / f".batch.rank{rank}.lock", "a")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.close()
        raise BatchError(f"another mlx_sa3.batch run is using {out_dir} (rank {rank})") from None
    return handle


if __name__ == "__main__":
    sys.exit(main())
