"""Writing files so that a crash never leaves a half-written one: checkpoints, weights, shards, history.

atomic_write() writes to a temporary name in the target's folder, fsyncs it, renames it over the
target and fsyncs the folder: a reader sees the old file or the new one. The temporary name says
who writes it, ".NAME.PID_HOST_XXXX.tmp" (HOST: the crc32 of the host name), so that the next
write of NAME can remove what a killed writer left: a temporary file of NAME whose process is not
alive on this host and which has not changed for STALE_AFTER_S seconds. A file of a live writer,
of another host, or of another naming is never touched.
"""
from __future__ import annotations

import os
import re
import socket
import tempfile
import time
import zlib
from pathlib import Path

STALE_AFTER_S = 60       # a live writer changes its file far more often; guards against other PID namespaces


def _host_tag() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _file_mode(path: Path) -> int:
    if path.exists():
        return path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def _alive(pid: int) -> bool:
    if os.name != "posix":                       # on Windows os.kill(pid, 0) would end the process
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):      # another user's process; not a pid at all: keep the file
        return True
    return True


def remove_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove the temporary files of path that killed writers left (see the module docstring);
    -> the files removed. Never raises: a file it cannot remove stays."""
    path = Path(path)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(\d+)_([0-9a-f]{{8}})_\w+\.tmp")
    removed, host, now = [], _host_tag(), time.time()
    try:
        candidates = list(path.parent.iterdir())
    except OSError:
        return removed
    for tmp in candidates:
        m = pattern.fullmatch(tmp.name)
        if not m or m.group(2) != host or _alive(int(m.group(1))):
            continue
        try:
            if now - tmp.lstat().st_mtime >= STALE_AFTER_S:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass
    return removed


def atomic_write(path: str | Path, write) -> Path:
    """Call write(tmp_path), then fsync and rename tmp_path over path. Removes the stale temporary
    files of path first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}_{_host_tag()}_", suffix=".tmp")
    os.close(fd)
    try:
        os.chmod(tmp, _file_mode(path))     # mkstemp makes 0600; give the file the usual mode
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return path
