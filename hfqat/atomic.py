"""Atomic folder and file writes: `path` holds its previous complete content or the new complete content, never a mix, even
when the writer is killed (kill -9) or the machine loses power right after the save returned.

How: the new content is written into a temporary sibling ``.NAME.tmp-<pid>@<host>-<random>``, every file and folder
of it is fsynced, and then it takes `path`'s place by one rename — on Linux one ``renameat2(RENAME_EXCHANGE)`` that
swaps both folders at once, elsewhere (or on file systems without it) two renames through an ``.NAME.old-…`` sibling;
the parent folder is fsynced after the rename. A writer killed mid-save leaves such siblings behind; the next save
to the same `path` removes those whose writer is no longer running (on this host), with a log line.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

logger = logging.getLogger(__name__)

TAGS = ("tmp", "old")  # the two kinds of sibling an interrupted save can leave
_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _host() -> str:
    return socket.gethostname().replace("@", "_").replace("/", "_") or "localhost"


def _owner_tag() -> str:
    """``<pid>@<host>``: who is writing a sibling, so that a later save can tell a live writer from debris."""
    return f"{os.getpid()}@{_host()}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed child not yet reaped is a zombie: it writes nothing any more
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def _is_stale(owner: str) -> bool | None:
    """Whether the writer named in a sibling is gone: True / False, None when it ran on another host (unknown)."""
    pid, sep, rest = owner.partition("@")
    if not sep or not pid.isdigit():
        return True  # not written by this scheme's writers (an older hfqat): nobody owns it
    host = rest.rsplit("-", 1)[0]
    if host != _host():
        return None
    return not _pid_running(int(pid))


def leftover_siblings(path: str | os.PathLike) -> list[Path]:
    """The temporary siblings of `path` that interrupted saves left (their writer is no longer running)."""
    path = Path(path)
    if not path.parent.is_dir():
        return []
    found = []
    for tag in TAGS:
        prefix = f".{path.name}.{tag}-"
        for sibling in path.parent.glob(f"{prefix}*"):
            if _is_stale(sibling.name[len(prefix):]):
                found.append(sibling)
    return sorted(found)


def remove_leftovers(path: str | os.PathLike) -> list[Path]:
    """Remove what interrupted saves of `path` left next to it (logged); returns the removed paths."""
    leftovers = leftover_siblings(path)
    for sibling in leftovers:
        if sibling.is_dir() and not sibling.is_symlink():
            shutil.rmtree(sibling, ignore_errors=True)
        else:
            sibling.unlink(missing_ok=True)
    if leftovers:
        logger.warning("hfqat: removed %d leftover folder(s) of an interrupted save of %s: %s", len(leftovers),
                       path, ", ".join(s.name for s in leftovers))
    return leftovers


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some file systems cannot fsync a folder; the files themselves were synced
        if not path.is_dir() or err.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under `root` (and `root`) to disk."""
    for folder, _, files in os.walk(root):
        for name in files:
            if not os.path.islink(os.path.join(folder, name)):
                _fsync_path(Path(folder, name))
        _fsync_path(Path(folder))


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one step (Linux ``renameat2``); False where the system or file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(a))


def _replace_directory(tmp: Path, path: Path) -> None:
    """Put the folder `tmp` at `path` (an existing folder there is replaced and removed)."""
    if not path.exists():
        os.replace(tmp, path)
        return
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # now the previous content
        return
    old = path.parent / f".{path.name}.old-{_owner_tag()}-{uuid.uuid4().hex[:8]}"
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `path`; on success it replaces `path`, on error it is removed.

    `path` therefore holds either its previous complete content or the new complete content, never a mix; what
    earlier interrupted saves of `path` left next to it is removed first.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"path={str(path)!r} exists and is not a directory")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{_owner_tag()}-", dir=path.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private
        fsync_tree(tmp)
        _replace_directory(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary file path next to `path`; on success the written file replaces `path` (fsynced, one rename,
    parent fsynced), on error it is removed. Leftovers of earlier interrupted writes of `path` are removed first."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"path={str(path)!r} is a directory; expected a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{_owner_tag()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)  # mkstemp makes it private
        _fsync_path(tmp)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
