"""Writing files and folders so that a reader only ever sees the old or the new version, and a
writer killed half-way leaves nothing that the next write to the same target does not clean.

Every temporary lives beside its target as ``.<target name>.<kind>-<pid>-<token>`` (kind ``tmp``: a
file being written, ``new``: a folder being written, ``old``: a folder moved aside), created with
the permissions the umask gives (``0644`` / ``0755`` for the usual ``022``, what transformers'
``save_pretrained`` gave before safetensors 0.8 began writing weights ``0600``), never
``0600``/``0700`` as ``tempfile`` would. A temporary whose writing
process is gone is stale: :func:`clean_stale` removes it — only names of that exact pattern, for
that target, and never one of a live process (the ``tempfile`` names of earlier versions, which
carry no process id, once a day old).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import logging
import os
import re
import secrets
import shutil
import socket
import time
from collections.abc import Callable
from pathlib import Path

logger = logging.getLogger(__name__)

_KINDS = ("tmp", "new", "old")


#: This machine, in temporaries' names: a process id means something on its own host only (a
#: folder shared between machines or containers must not lose another host's live temporaries).
HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


def temp_path(target: Path, kind: str) -> Path:
    """A fresh name beside ``target`` for a temporary of ``kind``, tagged with this host and process."""
    assert kind in _KINDS, kind
    return target.with_name(f".{target.name}.{kind}-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")


#: Temporaries of earlier versions carry no process id (``tempfile`` names), and another host's
#: processes cannot be asked: stale once untouched this long.
LEGACY_STALE_AFTER_S = 24 * 3600


def _temporaries(target: Path) -> list[tuple[Path, str, int | None]]:
    """``(path, kind, pid)`` of every temporary of ``target``, also those earlier versions named
    ``.<name>.old-<pid>``, ``.<name>.export-<random>`` (a folder) and ``.<name>.<random>.tmp``; pid
    None where it cannot be checked here (no pid, or another host's)."""
    name = re.escape(target.name)
    ours = re.compile(rf"\.{name}\.({'|'.join(_KINDS)})-(?:([0-9a-f]{{8}})-)?(\d+)(?:-[0-9a-f]+)?")
    legacy = re.compile(rf"\.{name}\.(?:export-[a-z0-9_]{{8}}|[a-z0-9_]{{8}}\.tmp)")
    try:
        entries = list(target.parent.iterdir())
    except FileNotFoundError:
        return []
    found: list[tuple[Path, str, int | None]] = []
    for entry in entries:
        if m := ours.fullmatch(entry.name):
            here = m.group(2) in (None, HOST)
            found.append((entry, m.group(1), int(m.group(3)) if here else None))
        elif legacy.fullmatch(entry.name):
            found.append((entry, "new" if "export-" in entry.name else "tmp", None))
    return found


def _stale(path: Path, pid: int | None) -> bool:
    if pid is not None:
        return not _alive(pid)
    try:
        return time.time() - path.lstat().st_mtime > LEGACY_STALE_AFTER_S
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows' os.kill(pid, 0) would terminate the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale(target: Path) -> None:
    """Remove the temporaries of ``target`` left by writers that are gone. A folder moved aside
    (``old``) by a writer killed before the new one took its place is put back when ``target`` is
    missing: it is the last complete version."""
    stale = [(p, kind) for p, kind, pid in _temporaries(target) if _stale(p, pid)]
    if not target.exists():
        olds = sorted((p for p, kind in stale if kind == "old"), key=lambda p: p.stat().st_mtime)
        if olds:
            os.replace(olds[-1], target)
            logger.warning("restored %s from %s, left by an interrupted write", target, olds[-1].name)
            stale = [(p, kind) for p, kind in stale if p != olds[-1]]
    for path, _ in stale:
        logger.info("removing %s, left by an interrupted write", path)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def atomic_write(target: Path, write: Callable[[str], None]) -> None:
    """``write(temporary path)`` then rename it onto ``target``: ``target`` is the old file or the new
    one, never a half-written one. Stale temporaries of ``target`` are removed first."""
    atomic_write_all([(target, write)])


def atomic_write_all(items: list[tuple[Path, Callable[[str], None]]]) -> None:
    """:func:`atomic_write` for several files: every temporary is written first, then they are
    renamed in order, one right after the other, so the files of one save are together on disk for
    all but the instant between two renames."""
    tmps: list[Path] = []
    try:
        for target, write in items:
            clean_stale(target)
            tmp = temp_path(target, "tmp")
            tmps.append(tmp)
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            mode = tmp.stat().st_mode & 0o777  # what the umask gives
            write(str(tmp))
            os.chmod(tmp, mode)  # writers that recreate the file (safetensors.save_file) leave it 0600
        for tmp, (target, _) in zip(tmps, items):
            os.replace(tmp, target)
    except BaseException:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
        raise


def new_dir(target: Path) -> Path:
    """An empty temporary folder beside ``target`` (mode from the umask), after removing stale ones;
    fill it, then :func:`replace_dir` it onto ``target``."""
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(target)
    tmp = temp_path(target, "new")
    tmp.mkdir(mode=0o777)
    return tmp


def umask_modes(folder: Path) -> None:
    """Give every file under ``folder`` (made by :func:`new_dir`, so its mode is the umask's) the mode
    a plain ``open()`` gives under the umask (``0644`` for ``022``) and every subfolder the folder's:
    safetensors >= 0.8 writes its files ``0600`` whatever the umask (safetensors#782)."""
    dir_mode = folder.stat().st_mode & 0o777
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), dir_mode)
        for name in files:
            os.chmod(os.path.join(root, name), dir_mode & 0o666)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux ``renameat2(RENAME_EXCHANGE)``); False where the
    system or the file system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2  # glibc >= 2.28
    except (AttributeError, OSError, TypeError):  # another libc, or not a POSIX system
        return False
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_dir(src: Path, dst: Path) -> None:
    """Put the folder ``src`` at ``dst``. An existing ``dst`` is swapped out in one atomic step where
    the system allows (else moved aside first, and put back by the next write's :func:`clean_stale`
    if this process dies before the new one is in place), then deleted."""
    if not dst.exists():
        os.replace(src, dst)
        return
    if _exchange(src, dst):
        shutil.rmtree(src, ignore_errors=True)  # now holds the old version
        return
    backup = temp_path(dst, "old")
    os.replace(dst, backup)
    try:
        os.replace(src, dst)
    except BaseException:
        os.replace(backup, dst)
        raise
    shutil.rmtree(backup, ignore_errors=True)
