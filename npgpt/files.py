"""Files, written so that a crash never leaves a half-written one, and read as a stranger's.

Writing: checkpoints, weights, shards, history.

atomic_write() writes to a temporary name in the target's folder, fsyncs it, renames it over the
target and fsyncs the folder: a reader sees the old file or the new one. The temporary name says
who writes it, ".NAME.PID_HOST_XXXX.tmp" (HOST: the crc32 of the host name), so that the next
write of NAME can remove what a killed writer left: a temporary file of NAME whose process is not
alive on this host and which has not changed for STALE_AFTER_S seconds. A file of a live writer,
of another host, or of another naming is never touched.

Reading: every file a user hands over may be damaged or hostile. check_regular() and
open_regular() refuse, naming the file, anything but a regular file (a FIFO would block the
reader forever, /dev/zero would fill memory, a folder has no bytes); read_bounded() reads at most
the bytes a format allows; load_json(), parse_json() and load_toml() turn every way a parse fails
(bad syntax or UTF-8, nesting deep enough to exhaust Python's recursion, an integer of more than
4,300 digits) into one ValueError that names the file.
"""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import tempfile
import time
import zlib
from pathlib import Path

STALE_AFTER_S = 60       # a live writer changes its file far more often; guards against other PID namespaces
MAX_JSON_BYTES = 16 << 20    # config.json, hparams.json, an index, a manifest: kilobytes in practice


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


# ---- reading a stranger's file ----

def _not_regular(path, mode: int, what: str) -> ValueError:
    kind = ("a folder" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return ValueError(f"{path}: is {kind}; expected {what}, a regular file")


def check_regular(path, what: str = "a file") -> int:
    """The size of the regular file at path (symbolic links followed); a ValueError naming it
    for a folder, FIFO, device or socket. For readers that open the file by name themselves."""
    mode = os.stat(path)
    if not stat.S_ISREG(mode.st_mode):
        raise _not_regular(path, mode.st_mode, what)
    return mode.st_size


def open_regular(path, what: str = "a file", buffering: int = -1):
    """open(path, "rb") for a regular file only. Opened non-blocking (a FIFO put in the file's
    place after a check would otherwise block the open) and checked on the open descriptor."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        f = os.fdopen(fd, "rb", buffering=buffering)
        (f if buffering == 0 else f.raw).name = os.fspath(path)        # for messages, not the descriptor
        return f
    except BaseException:
        os.close(fd)
        raise


def read_bounded(path, what: str = "a file", max_bytes: int = MAX_JSON_BYTES) -> bytes:
    """The bytes of the regular file at path, refused (ValueError naming it) past max_bytes."""
    with open_regular(path, what) as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ValueError(f"{path}: more than {max_bytes:,} bytes, too large for {what}")
    return data


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def parse_json(data, where, what: str = "a JSON value"):
    """json.loads(data) (bytes or str), any failure a one-line ValueError naming where and saying
    what was expected (what: "an object with n_ctx, n_embd, ...")."""
    try:
        return json.loads(data)
    except RecursionError:
        reason = "JSON nested deeper than Python's recursion limit"
    except UnicodeDecodeError as e:
        reason = f"not UTF-8 text ({e.reason} at byte {e.start})"
    except ValueError as e:                     # JSONDecodeError, or the 4,300-digit integer limit
        reason = f"not valid JSON ({_first_line(e)})"
    raise ValueError(f"{where}: {reason}; expected {what}")


def load_json(path, what: str = "a JSON file", max_bytes: int = MAX_JSON_BYTES):
    """The JSON value in the regular file at path, read and parsed within bounds (see parse_json)."""
    return parse_json(read_bounded(path, what, max_bytes), path, what)


def load_toml(path, what: str = "a TOML file", max_bytes: int = MAX_JSON_BYTES) -> dict:
    """The TOML table in the regular file at path, read and parsed within bounds."""
    import tomllib
    data = read_bounded(path, what, max_bytes)
    try:
        return tomllib.loads(data.decode("utf-8"))
    except RecursionError:
        raise ValueError(f"{path}: not {what} (TOML nested deeper than Python's recursion limit)") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not {what} (not UTF-8 text: {e.reason} at byte {e.start})") from None
    except ValueError as e:                     # TOMLDecodeError, or the 4,300-digit integer limit
        raise ValueError(f"{path}: not {what} (invalid TOML: {_first_line(e)})") from None
