"""Output files that are never damaged: checked targets, atomic group writes, signal cleanup, one-line OS errors.

Rules (the same for the CLI and the library):

- The output path must be a regular file or not exist. An existing directory, FIFO, device or socket is refused, and
  an existing regular file is refused unless ``overwrite`` is given. All of this is decided before any model loads.
- Symlinks are followed: the checks apply to the file the link points to, and the finished file replaces *that*
  file (the link itself stays a link), as ``cp`` or ``sox`` would write through it.
- Audio is written to a short hidden temporary file in the target's directory (``.sa3-<pid>-<random>.partial``, so a
  legal 255-byte target name still works) created with the permissions the umask gives (0644 under umask 022). Only
  when every file of a batch is complete are they moved into place, together: on any error, cancel or signal none
  appears and the temporary files are removed. A target that is not a regular file at that moment is never replaced.
- Temporary files left by a run that died hard (SIGKILL, power loss) carry its pid; the next run writing to the same
  directory removes those whose process is gone (:func:`remove_stale_temporaries`).
- SIGTERM and SIGHUP are turned into :class:`Terminated` (:func:`handle_signals`), so they take the same cleanup path
  as Ctrl-C; the CLI exits with ``128 + signal``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import stat
import sys
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from .options import whole_number

#: name of the temporary files: hidden, short, with the writer's pid so stale ones can be recognised
TEMP_PATTERN = re.compile(r"^\.sa3-(\d+)-[0-9a-f]{8}\.(partial|old|converting)$")
#: seeds accepted as given; negative seeds (officially ``-1``) and ``None`` mean "draw one at random"
SEED_MAX = 2**63 - 1
#: the range random seeds are drawn from (what the official code and earlier mlx_sa3 versions print)
RANDOM_SEED_BOUND = 2**31
#: written into every directory convert.py produces, so ``--force`` can tell it from anything else
CONVERSION_MARKER = ".mlx_sa3-conversion"


class OutputError(ValueError):
    """An output that cannot or must not be written; the message is one line naming the path."""


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived; raised like KeyboardInterrupt so every cleanup path runs. Exit with ``status``."""

    def __init__(self, signum: int):
        self.signum = int(signum)
        self.status = 128 + self.signum
        super().__init__(f"terminated by {signal.Signals(self.signum).name}")


# -- one-line OS errors ------------------------------------------------------------------------------------------

_REASONS = {
    errno.ENOSPC: "no space left on device",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENAMETOOLONG: "file name too long",
    errno.EFBIG: "file too large (a file size limit is set: ulimit -f)",
    errno.ENOENT: "no such file or directory",
    errno.ENOTDIR: "a component of the path is not a directory",
    errno.EISDIR: "is a directory",
    errno.EEXIST: "already exists",
    errno.EIO: "input/output error",
    errno.EXDEV: "crosses file systems",
    errno.ELOOP: "too many levels of symbolic links",
}
if hasattr(errno, "EDQUOT"):
    _REASONS[errno.EDQUOT] = "disk quota exceeded"


def os_error_message(err: BaseException, path=None, action: str = "cannot write") -> str:
    """One line for an OSError (or soundfile's ``LibsndfileError: System error.``), naming ``path``.

    libsndfile reports a failed write(2) as a bare "System error."; the errno it saw is read back from soundfile's
    cffi handle, and where that is unavailable a full file system is recognised from its free space.
    """
    code = getattr(err, "errno", None) if isinstance(err, OSError) else _soundfile_errno()
    if code is None and path is not None and _is_full(path):
        code = errno.ENOSPC
    where = path if path is not None else getattr(err, "filename", None)
    reason = _REASONS.get(code) or (os.strerror(code) if code else None) or str(err).strip() or type(err).__name__
    return f"{action} {where}: {reason}" if where is not None else f"{action}: {reason}"


def _soundfile_errno() -> int | None:
    """The errno of the last C call soundfile made (cffi keeps it per thread), or None."""
    sf = sys.modules.get("soundfile")
    ffi = getattr(sf, "_ffi", None)
    try:
        code = int(ffi.errno) if ffi is not None else 0
    except (
        AttributeError,
        TypeError,
        ValueError,
    ):  # a soundfile without the cffi handle: fall back to the free-space test
        return None
    return code or None


def _is_full(path) -> bool:
    try:
        st = os.statvfs(Path(path).parent)
    except OSError:
        return False
    return st.f_bavail == 0


def is_write_error(err: BaseException) -> bool:
    """True for the errors writing a file can raise: OSError and soundfile's runtime errors."""
    if isinstance(err, OSError):
        return True
    sf = sys.modules.get("soundfile")
    return sf is not None and isinstance(err, getattr(sf, "SoundFileRuntimeError", ()))


# -- target checks ----------------------------------------------------------------------------------------------

_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _kind(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


#: what :func:`not_a_file` says of a path that does not exist
MISSING = "no such file"


def not_a_file(path) -> str | None:
    """Why ``path`` cannot be read as a file: :data:`MISSING`, or what it is ("a directory", "a FIFO (named pipe)"
    ...); None for a regular file (symlinks followed)."""
    try:
        mode = os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return MISSING
    return None if stat.S_ISREG(mode) else _kind(mode)


def _lstat(path: Path):
    try:
        return os.lstat(path)
    except FileNotFoundError:
        return None


def check_output_target(path, overwrite: bool = False) -> Path:
    """Check that ``path`` may be written and return the path that will be written (symlinks resolved).

    Raises :class:`OutputError` (one line) when the target exists and is not a regular file, exists and
    ``overwrite`` is false, its directory is missing or not writable (read-only file system, permissions), or its
    name is too long. Call it before any model loads; :class:`AtomicFiles` checks again when it moves files in place.
    """
    given = Path(os.fspath(path))
    if str(path).endswith(os.sep) or given.name in ("", ".", ".."):
        raise OutputError(f"{path}: the output must be a file name, not a directory")
    _refuse_special_file(given)
    target = Path(os.path.realpath(given))  # follow symlinks (stated rule: the link's target is written)
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"output directory {parent} does not exist")
    _check_name_length(target)
    try:
        st = _lstat(target)
    except OSError as err:
        raise OutputError(os_error_message(err, given, "cannot write")) from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputError(f"{_shown(given, target)} is {_kind(st.st_mode)}; the output must be a regular file")
    if st is not None and not overwrite:
        raise OutputError(f"{_shown(given, target)} already exists (use --overwrite / overwrite=True to replace it)")
    probe_writable(parent)
    return target


def _refuse_special_file(given: Path) -> None:
    """What the path opens, links followed: /dev/stdout, /proc/self/fd/N lead to a pipe or a terminal that
    realpath cannot name ("pipe:[N]"), so it is checked before the path is resolved."""
    try:
        mode = os.stat(given).st_mode
    except OSError:
        return  # missing, or unreadable: the checks on the resolved path say why
    if not stat.S_ISREG(mode):
        raise OutputError(f"{given} is {_kind(mode)}; the output must be a regular file")


def _shown(given: Path, target: Path) -> str:
    return str(given) if given.absolute() == target else f"{given} (-> {target})"


def _check_name_length(target: Path) -> None:
    try:
        limit = os.pathconf(target.parent, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):
        limit = 255
    size = len(os.fsencode(target.name))
    if size > limit:
        raise OutputError(f"{target.name[:40]}...: file name too long ({size} bytes; at most {limit} here)")


def probe_writable(directory: Path) -> None:
    """Create and remove one temporary file: the only test that sees read-only mounts, ACLs and root alike."""
    probe = directory / temp_name("partial")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except OSError as err:
        raise OutputError(os_error_message(err, directory, "cannot write to")) from None
    os.close(fd)
    os.unlink(probe)


def batch_targets(path, batch_size: int) -> list[Path]:
    """The files of a batch: ``path`` itself for one item, else ``stem-1.ext``, ``stem-2.ext`` ..."""
    path = Path(path)
    if batch_size == 1:
        return [path]
    return [path.with_name(f"{path.stem}-{i + 1}{path.suffix}") for i in range(batch_size)]


def check_output_targets(paths: Iterable, overwrite: bool = False) -> list[Path]:
    """:func:`check_output_target` for every file of a batch (refused as a whole if any one is refused)."""
    targets = [check_output_target(p, overwrite) for p in paths]
    if len(set(targets)) != len(targets):
        raise OutputError("two outputs of this batch resolve to the same file")
    seen = {}
    for target in targets:
        other = seen.setdefault(_folded_key(target), target)
        if other is not target:
            raise OutputError(
                f"outputs {other.name} and {target.name} differ only in letter case (or Unicode form): one file on a "
                "case-insensitive file system such as macOS's default, so one would replace the other"
            )
    return targets


def _folded_key(target: Path) -> tuple:
    """The name as a case- and normalization-insensitive file system (APFS, HFS+) sees it, in its folder.

    The folder is named by device and inode, so two spellings of one existing folder compare equal too.
    """
    st = os.stat(target.parent)
    return st.st_dev, st.st_ino, unicodedata.normalize("NFC", unicodedata.normalize("NFC", target.name).casefold())


# -- atomic group writes ----------------------------------------------------------------------------------------


def temp_name(kind: str) -> str:
    """A short hidden name with this process's pid: ``.sa3-<pid>-<8 hex>.<kind>`` (kind: partial, old, converting)."""
    return f".sa3-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _create_temp(directory: Path, kind: str = "partial") -> Path:
    """A new empty file, mode 0666 & ~umask (like any tool's output; mkstemp would force 0600)."""
    for _ in range(16):
        temp = directory / temp_name(kind)
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return temp
    raise OutputError(f"cannot create a temporary file in {directory}")


def _fsync(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class AtomicFiles:
    """Temporary files for a group of targets, moved into place all together by :meth:`commit`, or not at all.

    ::

        with AtomicFiles(targets, overwrite=False) as files:
            for temp in files.temps:
                ...write temp...                 # writers must be closed before commit
            files.commit()

    Leaving the block without ``commit`` (an exception, a cancel, KeyboardInterrupt, :class:`Terminated`) removes
    every temporary file. ``commit`` flushes the files to disk, checks every target again (still a regular file or
    absent; absent unless ``overwrite``), then moves them in: without ``overwrite`` by ``os.link``, which never
    replaces anything that appeared meanwhile; with it by ``os.rename``. If one move fails the ones already made are
    undone (replaced files come back from a hard-link backup), so a batch appears whole or not at all.
    """

    def __init__(self, targets: Iterable, overwrite: bool = False):
        self.targets = check_output_targets(targets, overwrite)
        self.overwrite = overwrite
        self.temps: list[Path] = []
        self.committed = False

    def __enter__(self):
        for directory in {t.parent for t in self.targets}:
            remove_stale_temporaries(directory)
        try:
            for target in self.targets:
                self.temps.append(_create_temp(target.parent))
        except OSError as err:
            self._remove_temps()
            raise OutputError(os_error_message(err, self.targets[len(self.temps)].parent, "cannot write to")) from None
        except BaseException:
            self._remove_temps()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove_temps()

    def _remove_temps(self) -> None:
        for temp in self.temps:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        self.temps = []

    def commit(self) -> list[Path]:
        """Move every temporary file to its target; returns the targets. Raises OutputError, leaving none."""
        if self.committed:
            return self.targets
        for temp, target in zip(self.temps, self.targets):
            try:
                _fsync(temp)  # delayed-allocation file systems report a full disk here, not at write time
            except OSError as err:
                raise OutputError(os_error_message(err, target)) from None
        for target in self.targets:
            self._recheck(target)
        done, backups = [], {}
        try:
            for temp, target in zip(self.temps, self.targets):
                if _lstat(target) is not None:  # overwrite (checked above): keep the old file until all succeed
                    backups[target] = self._backup(target)
                self._move(temp, target)
                done.append((temp, target))
        except BaseException as err:
            self._undo(done, backups)
            if isinstance(err, OSError):
                raise OutputError(os_error_message(err, target)) from None
            raise
        finally:
            for backup in backups.values():
                if backup is not None:
                    with contextlib.suppress(OSError):
                        os.unlink(backup)
        with contextlib.suppress(OSError):
            for directory in {t.parent for t in self.targets}:
                _fsync(directory, directory=True)
        self.temps = []
        self.committed = True
        return self.targets

    def _recheck(self, target: Path) -> None:
        st = _lstat(target)
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise OutputError(f"{target} became {_kind(st.st_mode)} during the generation; not replacing it")
        if st is not None and not self.overwrite:
            raise OutputError(f"{target} appeared during the generation; not replacing it (use --overwrite)")

    def _move(self, temp: Path, target: Path) -> None:
        if not self.overwrite:
            try:
                os.link(temp, target)  # fails with EEXIST whatever appeared at target: nothing is ever replaced
            except OSError as err:
                if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                    raise
                self._recheck(target)  # no hard links here (FAT, some FUSE): check, then rename
                os.rename(temp, target)
                return
            os.unlink(temp)
            return
        self._recheck(target)
        os.rename(temp, target)

    @staticmethod
    def _backup(target: Path) -> Path | None:
        backup = target.parent / temp_name("old")
        try:
            os.link(target, backup)
        except OSError:
            return None  # no hard links: a failed later move cannot restore this file (stated best effort)
        return backup

    @staticmethod
    def _undo(done: list, backups: dict) -> None:
        for _, target in reversed(done):
            backup = backups.get(target)
            with contextlib.suppress(OSError):
                if backup is not None:
                    os.rename(backup, target)
                    backups[target] = None
                elif target not in backups:
                    os.unlink(target)


# -- stale temporary files --------------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # someone else's live process (or an unusable pid): keep its file
    return True


def stale_temporaries(directory, min_age: float = 10.0) -> list[Path]:
    """mlx_sa3 temporary files and converter directories in ``directory`` whose writer is gone, at least ``min_age``
    seconds old.

    The pid in the name is checked with ``kill(pid, 0)`` on this machine; the age guard keeps a file whose writer
    just started from being mistaken (pid reuse, a network file system shared with another host).
    """
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    now = time.time()
    for entry in entries:
        match = TEMP_PATTERN.match(entry.name)
        if not match:
            continue
        pid = int(match.group(1))
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue
        ours = stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)  # files, or converter directories
        if ours and pid != os.getpid() and now - st.st_mtime >= min_age and not _pid_alive(pid):
            found.append(Path(entry.path))
    return sorted(found)


def remove_stale_temporaries(directory, min_age: float = 10.0) -> list[Path]:
    """Remove :func:`stale_temporaries` of ``directory``; returns what was removed (failures are left alone)."""
    removed = []
    for path in stale_temporaries(directory, min_age):
        try:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)  # an interrupted conversion's directory
            else:
                os.unlink(path)
        except OSError:
            continue
        removed.append(path)
    return removed


# -- signals ----------------------------------------------------------------------------------------------------

TERMINATING_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


@contextlib.contextmanager
def handle_signals(signals: tuple = TERMINATING_SIGNALS) -> Iterator[Callable[[], None]]:
    """Inside the block SIGTERM and SIGHUP raise :class:`Terminated` (once; repeats are ignored during cleanup).

    The block gets a ``check()`` that raises :class:`Terminated` again if a signal arrived: Python drops an exception
    raised while a destructor (``__del__``) runs, so a signal landing there would otherwise be lost (seen: a
    ``regex`` object's ``__del__`` under garbage collection, the CLI never stopped). Python also prints such a
    dropped exception as a traceback on stderr; inside the block ``sys.unraisablehook`` keeps quiet about a
    Terminated (check() reports it). Call ``check`` at regular points (the CLI does, at every progress event).
    Outside the main thread signal handlers cannot be installed, and the block runs unchanged (``check`` does
    nothing).
    """
    import threading

    fired = []

    def check() -> None:
        if fired:
            raise Terminated(fired[0])

    if threading.current_thread() is not threading.main_thread():
        yield check
        return

    def handler(signum, frame):
        if fired:
            return  # a second signal must not interrupt the cleanup of the first
        fired.append(signum)
        raise Terminated(signum)

    hook = sys.unraisablehook

    def quiet_lost_signal(unraisable):
        # the Terminated that Python drops in a destructor: recorded in ``fired`` for check(), so not a traceback
        if not isinstance(unraisable.exc_value, Terminated):
            hook(unraisable)

    previous = {s: signal.signal(s, handler) for s in signals}
    sys.unraisablehook = quiet_lost_signal
    try:
        yield check
    finally:
        sys.unraisablehook = hook
        for s, old in previous.items():
            signal.signal(s, old)


# -- seeds ------------------------------------------------------------------------------------------------------


def resolve_seed(seed) -> int:
    """The seed to use: ``None`` or a negative seed (the official ``-1``) draws one in [0, 2**31); 0 .. 2**63-1 is
    used as given (it fits a signed 64-bit integer: numpy, torch.manual_seed, JSON). Anything else is refused."""
    if seed is None:
        return secrets.randbelow(RANDOM_SEED_BOUND)
    seed = whole_number(seed, "seed")
    if seed < 0:
        return secrets.randbelow(RANDOM_SEED_BOUND)
    if seed > SEED_MAX:
        raise ValueError(f"seed {seed} is out of range: use 0 .. {SEED_MAX} (2**63 - 1), or -1 for a random seed")
    return seed


# -- converted directories (convert.py --force) -----------------------------------------------------------------


def write_conversion_marker(directory, info: dict | None = None) -> Path:
    """Mark ``directory`` as written by an mlx_sa3 conversion (call it on the temporary directory before the rename)."""
    marker = Path(directory) / CONVERSION_MARKER
    marker.write_text(json.dumps({"written_by": "mlx_sa3.convert", **(info or {})}) + "\n")
    return marker


def check_replaceable_conversion(path, force: bool) -> Path | None:
    """May ``convert.py`` write to ``path``? Returns the existing directory ``--force`` will replace, or None.

    Absent: fine. An existing directory is replaced only with ``force`` and only when it holds the marker of an
    earlier mlx_sa3 conversion (a real directory, not a symlink to one); a regular file, a symlink or anything
    else is never replaced. Raises :class:`OutputError` with the reason.
    """
    path = Path(path)
    try:
        st = _lstat(path)
    except OSError as err:  # under a regular file, no permission to look, a name too long
        raise OutputError(os_error_message(err, path, "cannot write")) from None
    if st is None:
        return None
    if stat.S_ISLNK(st.st_mode):
        raise OutputError(f"{path} is a symbolic link; not replacing it (remove it or choose another output)")
    if not stat.S_ISDIR(st.st_mode):
        raise OutputError(
            f"{path} exists and is {_kind(st.st_mode) if not stat.S_ISREG(st.st_mode) else 'a file'}; "
            "convert writes a directory and never replaces anything else"
        )
    if not force:
        raise FileExistsError(f"{path} already exists (use --force to replace an earlier conversion)")
    if not is_conversion_dir(path):
        raise OutputError(
            f"{path} is not a directory written by mlx_sa3's converter (no {CONVERSION_MARKER} in it); "
            "--force only replaces an earlier conversion"
        )
    return path


def is_conversion_dir(path) -> bool:
    """Was ``path`` written by mlx_sa3's converter? Its marker file, or (conversions made before the marker existed)
    a ``config.json`` whose ``format`` is mlx_sa3's converted format."""
    from .loading import CONVERTED_FORMAT

    path = Path(path)
    marker = path / CONVERSION_MARKER
    if marker.is_file() and not marker.is_symlink():
        return True
    config = path / "config.json"
    if not config.is_file() or config.is_symlink():
        return False
    try:
        meta = json.loads(config.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(meta, dict) and meta.get("format") == CONVERTED_FORMAT
