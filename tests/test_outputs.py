"""Output files are never damaged: target checks, atomic group writes, umask, OS errors, signals, stale files, seeds.

Everything happens in tmp_path: FIFOs and directories stand in for devices (the real /dev/null is never touched),
a file-size rlimit and private tmpfs mounts (``unshare -m``, Linux as root) stand in for a full or read-only disk.
"""

import errno
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
import warnings
from pathlib import Path

from mlx_sa3 import outputs
from mlx_sa3.outputs import (
    AtomicFiles,
    OutputError,
    Terminated,
    check_output_target,
    check_replaceable_conversion,
    handle_signals,
    resolve_seed,
)

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def leftovers(directory: Path) -> list:
    return sorted(p.name for p in directory.iterdir() if outputs.TEMP_PATTERN.match(p.name))


def write_wav(path: Path, seconds: float = 0.1) -> None:
    with sf.SoundFile(str(path), "w", samplerate=44100, channels=2, format="WAV", subtype="FLOAT") as f:
        f.write(np.zeros((int(44100 * seconds), 2), np.float32))


# -- targets ----------------------------------------------------------------------------------------------------


def test_fifo_and_directory_targets_are_refused(tmp_path):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    with pytest.raises(OutputError, match="FIFO"):
        check_output_target(fifo, overwrite=True)
    folder = tmp_path / "folder.wav"
    folder.mkdir()
    with pytest.raises(OutputError, match="directory"):
        check_output_target(folder, overwrite=True)
    with pytest.raises(OutputError, match="not a directory|file name"):
        check_output_target(str(tmp_path) + os.sep, overwrite=True)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and folder.is_dir()


def test_socket_target_is_refused(tmp_path):
    import socket

    path = tmp_path / "s.wav"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(path))
        with pytest.raises(OutputError, match="socket"):
            check_output_target(path, overwrite=True)


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="needs Linux /proc/self/fd")
def test_a_link_to_a_pipe_is_named_as_a_pipe():
    # /dev/stdout in `... -o /dev/stdout | player`: the link resolves to "pipe:[N]", which is no path at all; the
    # refusal said "cannot write to /proc/<pid>/fd: no such file or directory".
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(OutputError, match=r"^/proc/self/fd/\d+ is a FIFO \(named pipe\); the output must be"):
            check_output_target(f"/proc/self/fd/{write_end}")
    finally:
        os.close(read_end)
        os.close(write_end)


def test_existing_file_needs_overwrite(tmp_path):
    target = tmp_path / "out.wav"
    target.write_bytes(b"precious")
    with pytest.raises(OutputError, match="already exists.*overwrite"):
        check_output_target(target)
    assert check_output_target(target, overwrite=True) == target
    assert target.read_bytes() == b"precious"  # checking never touches it


def test_missing_directory_and_long_name(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        check_output_target(tmp_path / "nope" / "out.wav")
    with pytest.raises(OutputError, match="file name too long"):
        check_output_target(tmp_path / ("x" * 300 + ".wav"))


def test_symlink_rule_writes_through_the_link(tmp_path):
    real = tmp_path / "real.wav"
    real.write_bytes(b"old")
    link = tmp_path / "link.wav"
    link.symlink_to(real)
    with pytest.raises(OutputError, match="already exists"):
        check_output_target(link)
    assert check_output_target(link, overwrite=True) == real
    with AtomicFiles([link], overwrite=True) as files:
        files.temps[0].write_bytes(b"new")
        files.commit()
    assert link.is_symlink() and real.read_bytes() == b"new"
    # a link to a FIFO is refused like the FIFO itself
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    (tmp_path / "to_fifo.wav").symlink_to(fifo)
    with pytest.raises(OutputError, match="FIFO"):
        check_output_target(tmp_path / "to_fifo.wav", overwrite=True)


# -- atomic writes ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_respect_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        with AtomicFiles([tmp_path / "out.wav"]) as files:
            write_wav(files.temps[0])
            assert stat.S_IMODE(os.stat(files.temps[0]).st_mode) == mode
            files.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "out.wav").st_mode) == mode
    assert sf.info(str(tmp_path / "out.wav")).frames == 4410


def test_a_254_character_name_works(tmp_path):
    target = tmp_path / ("n" * 250 + ".wav")
    assert len(target.name) == 254
    with AtomicFiles([target]) as files:
        assert len(files.temps[0].name) < 40
        write_wav(files.temps[0])
        files.commit()
    assert sf.info(str(target)).frames == 4410 and leftovers(tmp_path) == []


def test_batch_is_all_or_nothing(tmp_path):
    targets = outputs.batch_targets(tmp_path / "take.wav", 3)
    assert [t.name for t in targets] == ["take-1.wav", "take-2.wav", "take-3.wav"]
    with pytest.raises(RuntimeError), AtomicFiles(targets) as files:
        write_wav(files.temps[0])
        write_wav(files.temps[1])
        raise RuntimeError("decoder failed on the third item")
    assert list(tmp_path.iterdir()) == []
    with AtomicFiles(targets) as files:
        for temp in files.temps:
            write_wav(temp)
        assert not any(t.exists() for t in targets)  # nothing appears before commit
        files.commit()
    assert all(t.is_file() for t in targets) and leftovers(tmp_path) == []


def test_outputs_that_differ_only_in_case_are_refused(tmp_path):
    # On macOS's default (case-insensitive) file system take.wav and TAKE.wav are one file: the second would replace
    # the first. Refused on every system, so a batch means the same thing wherever it runs.
    (tmp_path / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "sub")
    for pair in (["take.wav", "TAKE.wav"], ["sub/take.wav", "link/Take.wav"], ["caf\u00e9.wav", "cafe\u0301.wav"]):
        with pytest.raises(OutputError, match="differ only in letter case|the same file"):
            outputs.check_output_targets([tmp_path / p for p in pair])
    with pytest.raises(OutputError, match=r"^outputs take\.wav and TAKE\.wav differ only in letter case"):
        outputs.check_output_targets([tmp_path / "take.wav", tmp_path / "TAKE.wav"])
    assert len(outputs.check_output_targets([tmp_path / "take.wav", tmp_path / "sub" / "TAKE.wav"])) == 2
    assert list(tmp_path.iterdir()) != [] and leftovers(tmp_path) == []


def test_a_target_that_appears_is_never_replaced(tmp_path):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    with AtomicFiles([a, b]) as files:
        for temp in files.temps:
            write_wav(temp)
        os.mkfifo(b)  # something else created b while we generated
        with pytest.raises(OutputError, match="b.wav"):
            files.commit()
    assert not a.exists() and stat.S_ISFIFO(os.lstat(b).st_mode) and leftovers(tmp_path) == []
    os.unlink(b)
    b.write_bytes(b"user file")
    with AtomicFiles([a, b], overwrite=True) as files:
        for temp in files.temps:
            write_wav(temp)
        b.unlink()
        b.mkdir()  # became a directory: refused even with overwrite
        with pytest.raises(OutputError, match="directory"):
            files.commit()
    assert not a.exists() and b.is_dir() and leftovers(tmp_path) == []


def test_failed_move_restores_the_replaced_files(tmp_path, monkeypatch):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    a.write_bytes(b"old a")
    real_rename = os.rename
    calls = []

    def rename_fails_second(src, dst):
        calls.append(dst)
        if Path(dst) == b:
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename_fails_second)
    with AtomicFiles([a, b], overwrite=True) as files:
        for temp in files.temps:
            temp.write_bytes(b"new")
        with pytest.raises(OutputError, match="input/output error"):
            files.commit()
    assert a.read_bytes() == b"old a" and not b.exists() and leftovers(tmp_path) == []


# -- stale temporary files --------------------------------------------------------------------------------------


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_dead_runs_are_removed(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".sa3-{pid}-0123abcd.partial"
    fresh = tmp_path / f".sa3-{pid}-89abcdef.partial"
    alive = tmp_path / f".sa3-{os.getppid()}-00000000.partial"
    other = tmp_path / ".sa3-notapid.partial"
    for path in (stale, fresh, alive, other):
        path.write_bytes(b"x")
    old = time.time() - 60
    for path in (stale, alive, other):
        os.utime(path, (old, old))
    assert outputs.stale_temporaries(tmp_path) == [stale]
    with AtomicFiles([tmp_path / "out.wav"]) as files:  # the next run writing here cleans up
        assert not stale.exists()
        assert fresh.exists() and alive.exists() and other.exists()
        files.temps[0].write_bytes(b"y")
        files.commit()


# -- OS errors --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left on device"),
        (errno.EROFS, "read-only file system"),
        (errno.EACCES, "permission denied"),
        (errno.ENAMETOOLONG, "file name too long"),
        (errno.EDQUOT, "disk quota exceeded"),
        (errno.EFBIG, "file too large"),
    ],
)
def test_os_error_messages(tmp_path, code, words):
    message = outputs.os_error_message(OSError(code, os.strerror(code)), tmp_path / "x.wav")
    assert message.startswith(f"cannot write {tmp_path / 'x.wav'}: {words}")
    assert "\n" not in message


CHILD_WRITE = textwrap.dedent("""
    import os, resource, signal, sys
    import numpy as np, soundfile as sf
    from mlx_sa3.outputs import AtomicFiles, OutputError, is_write_error, os_error_message
    target = sys.argv[1]
    if len(sys.argv) > 2:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the kernel kills us instead of returning EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[2]), int(sys.argv[2])))
    try:
        with AtomicFiles([target]) as files:
            with sf.SoundFile(str(files.temps[0]), "w", samplerate=44100, channels=2, format="WAV",
                              subtype="FLOAT") as f:
                try:
                    for _ in range(20):
                        f.write(np.zeros((44100, 2), np.float32))
                except Exception as err:
                    if not is_write_error(err):
                        raise
                    raise OutputError(os_error_message(err, target)) from None
            files.commit()
    except OutputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
""")


def run_child(*args, prefix=()):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [*prefix, sys.executable, "-c", CHILD_WRITE, *map(str, args)],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_file_size_limit_is_one_line(tmp_path):
    proc = run_child(tmp_path / "big.wav", 200_000)
    assert proc.returncode == 2, proc.stderr
    assert (
        proc.stderr
        == f"error: cannot write {tmp_path / 'big.wav'}: file too large (a file size limit is set: ulimit -f)\n"
    )
    assert list(tmp_path.iterdir()) == []


def private_mount(tmp_path: Path, options: str) -> tuple:
    """A command prefix that runs in a private mount namespace with a tmpfs mounted on tmp_path/mnt."""
    if not sys.platform.startswith("linux") or os.geteuid() != 0 or not shutil.which("unshare"):
        pytest.skip("needs Linux, root and unshare for a private tmpfs")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = f'mount -t tmpfs -o {options} tmpfs "{mnt}" && exec "$@"'
    prefix = ("unshare", "-m", "sh", "-c", script, "sh")
    probe = subprocess.run([*prefix, "true"], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot mount a private tmpfs here: {probe.stderr.strip()}")
    return prefix, mnt


def test_disk_full_says_no_space_left(tmp_path):
    prefix, mnt = private_mount(tmp_path, "size=256k")
    proc = run_child(mnt / "out.wav", prefix=prefix)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == f"error: cannot write {mnt / 'out.wav'}: no space left on device\n"


def test_read_only_file_system_is_refused_before_writing(tmp_path):
    prefix, mnt = private_mount(tmp_path, "ro,size=256k")
    code = (
        "import sys; from mlx_sa3.outputs import check_output_target, OutputError\n"
        "try: check_output_target(sys.argv[1])\n"
        "except OutputError as e: print(e, file=sys.stderr); sys.exit(2)"
    )
    proc = subprocess.run(
        [*prefix, sys.executable, "-c", code, str(mnt / "out.wav")],
        check=False,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 2
    assert proc.stderr == f"cannot write to {mnt}: read-only file system\n"


# -- signals ----------------------------------------------------------------------------------------------------

CHILD_SLOW = textwrap.dedent("""
    import sys, time
    import numpy as np, soundfile as sf
    from mlx_sa3.outputs import AtomicFiles, Terminated, handle_signals
    try:
        with handle_signals(), AtomicFiles([sys.argv[1], sys.argv[2]]) as files:
            writers = [sf.SoundFile(str(t), "w", samplerate=44100, channels=2, format="WAV", subtype="FLOAT")
                       for t in files.temps]
            try:
                for i in range(100000):
                    for w in writers:
                        w.write(np.zeros((441, 2), np.float32))
                    if i == 10:
                        print("writing", flush=True)
                    time.sleep(0.01)
            finally:
                for w in writers:
                    w.close()
            files.commit()
    except Terminated as err:
        print(f"error: {err}; no output written", file=sys.stderr)
        sys.exit(err.status)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signals_clean_up_and_exit_128_plus_signal(tmp_path, signum):
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD_SLOW, str(a), str(b)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline() == "writing\n"
    assert len(leftovers(tmp_path)) == 2  # really mid-write
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum
    assert err == f"error: terminated by {signal.Signals(signum).name}; no output written\n"
    assert list(tmp_path.iterdir()) == []


def test_handle_signals_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated) as info, handle_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    assert info.value.status == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_a_signal_lost_in_a_destructor_is_raised_again_by_check():
    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)  # the handler runs here; Python drops an exception raised in __del__

    reached = []
    with pytest.raises(Terminated) as info, handle_signals() as check:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            obj = SignalledWhileCollected()
            del obj
        reached.append(True)  # the first Terminated was lost: without check() the block would run on
        check()
    assert reached == [True] and info.value.status == 128 + signal.SIGTERM


def test_a_signal_lost_in_a_destructor_prints_no_traceback(monkeypatch):
    """Python reports an exception dropped in ``__del__`` through ``sys.unraisablehook`` (a traceback on stderr, seen
    under the CLI); inside the block a lost Terminated is kept quiet, other dropped exceptions still reach the hook."""
    reported = []
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: reported.append(type(unraisable.exc_value)))

    class SignalledWhileCollected:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)

    class FailsWhileCollected:
        def __del__(self):
            raise KeyError("not a signal")

    with pytest.raises(Terminated), handle_signals() as check:
        obj = SignalledWhileCollected()
        del obj
        obj = FailsWhileCollected()
        del obj
        check()
    assert reported == [KeyError]
    assert sys.unraisablehook is not None and sys.unraisablehook.__name__ == "<lambda>"  # the caller's hook is back


# -- seeds ------------------------------------------------------------------------------------------------------


def test_seed_range():
    assert resolve_seed(0) == 0 and resolve_seed(2**63 - 1) == 2**63 - 1 and resolve_seed(np.int64(7)) == 7
    for random_request in (None, -1, -5):
        seeds = {resolve_seed(random_request) for _ in range(8)}
        assert all(0 <= s < 2**31 for s in seeds) and len(seeds) > 1
    with pytest.raises(ValueError, match=r"0 \.\. 9223372036854775807"):
        resolve_seed(2**63)
    for bad in (1.5, "3", True):
        with pytest.raises(ValueError, match="integer"):
            resolve_seed(bad)


# -- converted directories --------------------------------------------------------------------------------------


def test_force_only_replaces_an_earlier_conversion(tmp_path):
    assert check_replaceable_conversion(tmp_path / "new", force=True) is None
    unrelated = tmp_path / "notes"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--force"):
        check_replaceable_conversion(unrelated, force=False)
    with pytest.raises(OutputError, match="not a directory written by mlx_sa3"):
        check_replaceable_conversion(unrelated, force=True)
    regular = tmp_path / "file"
    regular.write_text("x")
    with pytest.raises(OutputError, match="never replaces"):
        check_replaceable_conversion(regular, force=True)
    converted = tmp_path / "converted"
    converted.mkdir()
    outputs.write_conversion_marker(converted, {"version": 1})
    assert check_replaceable_conversion(converted, force=True) == converted
    older = tmp_path / "older"  # written before the marker existed: its config.json says so
    older.mkdir()
    (older / "config.json").write_text('{"format": "mlx_sa3", "version": 1}')
    assert check_replaceable_conversion(older, force=True) == older
    link = tmp_path / "link"
    link.symlink_to(converted)
    with pytest.raises(OutputError, match="symbolic link"):
        check_replaceable_conversion(link, force=True)
    assert (unrelated / "notes.txt").read_text() == "mine" and regular.read_text() == "x"
