"""All-or-nothing output: files are staged beside their targets and moved into place together, last.

A run writes a model, perhaps its external data, and perhaps a JSON and a Markdown report. Each is
written into a staging folder in its target's folder (a rename never crosses file systems), and
only when every one of them is written and verified are they renamed into place: a full disk, a
model that does not verify or a crash leaves the targets as they were.

- Staging folders are named ``.onnxsparse-staging-<pid>@<host>-<random>``: a run that is killed
  (``kill -9``, power loss) leaves one behind, and a later run on the same machine writing into that
  folder removes it once its process is gone, and says so (another machine's, in a shared folder,
  is left alone: its pid means nothing here).
- A run holds a lock on each target (``flock`` on ``.onnxsparse-lock-<name>``, released by the
  kernel when the process dies, so never stale) for its whole length: a second run writing the same
  output fails at once with the holder's pid instead of silently replacing the first one's file.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterable
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:  # typing.Self is Python 3.11+; annotations are not evaluated at run time
    from typing_extensions import Self

from .errors import OutputPathError

log = logging.getLogger(__name__)

STAGING_PREFIX = ".onnxsparse-staging-"
WEIGHTS_PREFIX = ".onnxsparse-weights-"  # a run's weight store (weightstore.py): removed like staging
LOCK_PREFIX = ".onnxsparse-lock-"


def describe_os_error(error: OSError) -> str:
    """``No space left on device`` and the like: strerror, or the errno's name when there is none."""
    if error.strerror:
        return error.strerror
    return errno.errorcode.get(error.errno or 0, type(error).__name__)


# ---------------------------------------------------------------------------------------------
# stale staging folders
# ---------------------------------------------------------------------------------------------


def remove_stale_staging(folder: Path) -> list[Path]:
    """Remove the staging folders in ``folder`` whose process has ended, and lock files no run
    holds (a killed run leaves both); return what was removed."""
    removed = []
    for entry in sorted([*folder.glob(f"{STAGING_PREFIX}*"), *folder.glob(f"{WEIGHTS_PREFIX}*")]):
        pid = _owner_pid(entry.name)
        if pid is None or not entry.is_dir() or _process_alive(pid):
            continue
        shutil.rmtree(entry, ignore_errors=True)
        if not entry.exists():
            removed.append(entry)
            log.warning("removed %s: left by process %d, which ended before it finished", entry, pid)
    for entry in sorted(folder.glob(f"{LOCK_PREFIX}*")):
        if _remove_if_unheld(entry):
            removed.append(entry)
            log.info("removed %s: a lock file left by a run that ended without releasing it", entry)
    return removed


def _owner_pid(name: str) -> int | None:
    """The pid of the run that staged ``name`` on this machine; None for another machine's (a folder
    shared over NFS or between containers: its pid means nothing here, and its run may be writing)."""
    owner = name.removeprefix(STAGING_PREFIX).removeprefix(WEIGHTS_PREFIX).split("-", 1)[0]
    pid_text, _, host = owner.partition("@")
    if host and host != _host_tag():
        return None
    return int(pid_text) if pid_text.isdigit() else None


def _host_tag() -> str:
    """This machine's name as it may stand in a file name (no '-', which separates the parts)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname()) or "host"


def staging_prefix(kind: str = STAGING_PREFIX) -> str:
    """What this run's staging folders (or weight stores) are named with: the pid and the machine that own them."""
    return f"{kind}{os.getpid()}@{_host_tag()}-"


def _process_alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # on Windows, signal 0 is CTRL_C_EVENT: never send it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


# ---------------------------------------------------------------------------------------------
# the lock on the outputs
# ---------------------------------------------------------------------------------------------


def lock_path(target: Path) -> Path:
    return target.parent / f"{LOCK_PREFIX}{target.name}"


class OutputLock:
    """Exclusive right to write ``targets`` while the ``with`` block runs (see the module notes).

    Entering also removes stale staging folders beside the targets. The lock files are removed on
    exit; one left by a killed run is taken over by the next run (flock does not outlive its process).
    """

    def __init__(self, targets: Iterable[str | os.PathLike[str]]) -> None:
        self.targets = sorted({Path(t).parent.resolve() / Path(t).name for t in targets})
        self._held: list[tuple[Path, int]] = []

    def __enter__(self) -> Self:
        try:
            for target in self.targets:
                self._held.append((lock_path(target), _acquire(target)))
            for folder in sorted({t.parent for t in self.targets}):
                remove_stale_staging(folder)
        except BaseException:
            self.release()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.release()

    def release(self) -> None:
        while self._held:
            path, descriptor = self._held.pop()
            # unlink while still holding the lock: a run that opened the old file sees it is gone
            # (its inode no longer matches the path) and tries again on a fresh one
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only folder after the fact: the file is harmless, the lock ends below
            os.close(descriptor)


def _acquire(target: Path) -> int:
    path = lock_path(target)
    while True:
        descriptor = _open_lock_file(path, target)
        if not _try_lock(descriptor):
            holder = _read_pid(descriptor)
            os.close(descriptor)
            raise OutputPathError(
                f"{target}: another onnxsparse run{f' (pid {holder})' if holder else ''} is writing it; "
                "wait for it to end or choose another output path"
            )
        if _still_linked(descriptor, path):
            break
        os.close(descriptor)  # the previous holder removed this file between our open and lock
    os.ftruncate(descriptor, 0)
    os.write(descriptor, str(os.getpid()).encode())
    return descriptor


def _open_lock_file(path: Path, target: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as error:
        raise OutputPathError(f"{target}: cannot write in {target.parent} ({describe_os_error(error)})") from error


def _try_lock(descriptor: int) -> bool:
    if fcntl is None:  # no flock (Windows): the lock file is advisory only there
        return True
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _remove_if_unheld(path: Path) -> bool:
    """Remove a lock file when no process holds it (taken first, so no live run loses its lock)."""
    if fcntl is None:
        return False
    try:
        descriptor = os.open(path, os.O_RDWR)
    except OSError:
        return False
    try:
        if not _try_lock(descriptor) or not _still_linked(descriptor, path):
            return False
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(descriptor)


def _still_linked(descriptor: int, path: Path) -> bool:
    try:
        return os.fstat(descriptor).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _read_pid(descriptor: int) -> str:
    text = os.pread(descriptor, 32, 0).decode(errors="replace").strip()
    return text if text.isdigit() else ""


# ---------------------------------------------------------------------------------------------
# staging
# ---------------------------------------------------------------------------------------------


class Staging:
    """Files written into staging folders beside their targets, renamed into place by ``commit``.

    Leaving the ``with`` block removes the staging folders, and with them whatever was not
    committed. ``commit`` renames in the order files were staged: stage external data before its
    model, so a reader never sees a model whose data is not there yet.
    """

    def __init__(self) -> None:
        self._folders: dict[Path, Path] = {}  # target folder -> its staging folder
        self._staged: list[tuple[Path, Path]] = []  # (staged file, target)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None) -> None:
        self.discard()

    def path_for(self, target: str | os.PathLike[str]) -> Path:
        """Where to write the staged copy of ``target`` (then ``add`` it, or use write_bytes/text)."""
        target = Path(target)
        folder = target.parent.resolve()
        if folder not in self._folders:
            try:
                self._folders[folder] = Path(tempfile.mkdtemp(prefix=staging_prefix(), dir=folder))
            except OSError as error:
                raise OutputPathError(f"{target}: cannot write in {folder} ({describe_os_error(error)})") from error
        return self._folders[folder] / target.name

    def add(self, staged: Path, target: str | os.PathLike[str]) -> None:
        """``staged`` (written by the caller inside a staging folder) goes to ``target`` at commit."""
        self._staged.append((staged, Path(target).parent.resolve() / Path(target).name))

    def write_bytes(self, target: str | os.PathLike[str], data: bytes) -> Path:
        staged = self.path_for(target)
        try:
            staged.write_bytes(data)
        except OSError as error:
            raise OutputPathError(f"{target}: cannot be written ({describe_os_error(error)}); nothing was written") from error
        self.add(staged, target)
        return staged

    def write_text(self, target: str | os.PathLike[str], text: str) -> Path:
        return self.write_bytes(target, text.encode("utf-8"))

    def staged_bytes(self, target: str | os.PathLike[str]) -> int:
        """Size on disk of what is staged for ``target``."""
        resolved = Path(target).parent.resolve() / Path(target).name
        return sum(staged.stat().st_size for staged, goal in self._staged if goal == resolved)

    def commit(self) -> list[Path]:
        """Rename every staged file into place, in the order staged; return the targets."""
        done: list[Path] = []
        for staged, target in self._staged:
            try:
                os.replace(staged, target)
            except OSError as error:
                placed = f"; already in place: {', '.join(map(str, done))}" if done else "; nothing was written"
                raise OutputPathError(f"{target}: cannot be put in place ({describe_os_error(error)}){placed}") from error
            done.append(target)
        self._staged.clear()
        return done

    def discard(self) -> None:
        for staging in self._folders.values():
            shutil.rmtree(staging, ignore_errors=True)
        self._folders.clear()
        self._staged.clear()


def write_text_atomically(path: str | os.PathLike[str], text: str) -> None:
    """``text`` at ``path`` whole or not at all (staged beside it, then renamed; see files.py)."""
    with Staging() as staging:
        staging.write_text(path, text)
        staging.commit()
