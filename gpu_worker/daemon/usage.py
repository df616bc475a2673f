"""VRAM in use per session, shared between each executor and the daemon's heartbeat.

Each executor keeps one small file in the worker's usage directory, mapped into its memory.
A change of its session's use is a store into that page, with no system call, so every
allocation and free counts at once however fast they come; the daemon reads the files when
it sends a heartbeat, so what the pool hears is what the executors hold at that moment.

The directory is named after the worker's identity in the pool (its name and the pool's URL),
not after the daemon process: a daemon started again with the same configuration finds the
files of the old one's executors (which die with their daemon) and removes them.  Each executor holds an exclusive ``flock`` on its file
for as long as it lives; the kernel releases it when the process ends, however it ends.  That
is how a reader tells a live executor's file from a dead one's (a pid could be reused; a lock
cannot outlive its process), and the dead one's file is removed on the spot.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import mmap
import os
import re
import secrets
import stat
import struct
import tempfile
import time

log = logging.getLogger("gpulab.worker")

SLOT = struct.Struct("<Q")
RECORD_SIZE = 2 * SLOT.size  # the value twice: a reader accepts it only when both copies agree
TMP = ".tmp"                 # a counter being created: not yet locked, not yet counted
TMP_GRACE = 60.0             # an unlocked .tmp file older than this was left by an executor that died


def default_dir(worker_name: str, pool_url: str) -> str:
    """Where a worker keeps its usage files unless configured: the same path for the same worker.

    The runtime directory (or /dev/shm) is memory, so the counters never cause disk writes."""
    base = os.environ.get("XDG_RUNTIME_DIR", "")
    if not base:
        base = "/dev/shm" if os.access("/dev/shm", os.W_OK | os.X_OK) else tempfile.gettempdir()
    ident = hashlib.sha256(f"{pool_url}\0{worker_name}".encode()).hexdigest()[:10]
    readable = re.sub(r"[^A-Za-z0-9_.-]", "_", worker_name)[:64]
    return os.path.join(base, f"gpulab-usage-{os.getuid()}-{readable}-{ident}")


def prepare_dir(path: str) -> str:
    """Create the usage directory, or check that the one found is this user's and private.

    Another user able to write there could make the dashboard show anything."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise PermissionError(f"the usage directory {path} must be a directory of uid {os.getuid()} with mode 0700 "
                              "(GPUWorker.usage_dir)")
    read_usage(path)  # drop what dead executors left behind
    return path


class UsageCounter:
    """One executor's VRAM in use, published for the daemon (create it in the executor, after the fork)."""

    def __init__(self, directory: str, key: str):
        # the pid says whose it is to a person looking; the nonce keeps a reused pid from ever colliding
        self.path = os.path.join(directory, f"{key}.{os.getpid()}.{secrets.token_hex(4)}")
        tmp = self.path + TMP
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a new file: nobody else can hold it
            os.ftruncate(fd, RECORD_SIZE)
            self.map = mmap.mmap(fd, RECORD_SIZE)
            os.rename(tmp, self.path)  # visible under its real name only once locked: never taken for stale
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        self.fd = fd
        self.value = 0

    def set(self, value: int) -> None:
        if value == self.value:
            return
        self.value = value
        SLOT.pack_into(self.map, 0, value)
        SLOT.pack_into(self.map, SLOT.size, value)  # second copy last; readers read it first

    def close(self) -> None:
        """The session ended cleanly: its use is no longer anyone's."""
        if self.fd < 0:
            return
        _unlink(self.path)
        self.map.close()
        os.close(self.fd)
        self.fd = -1


def read_usage(directory: str) -> dict[str, int]:
    """VRAM in use per session key (token hash), summed over the live executors' files.

    Files whose executor has ended are removed here."""
    usage: dict[str, int] = {}
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return usage
    for entry in entries:
        used = _read_live(entry.path, entry.name.endswith(TMP))
        if used is not None:
            key = entry.name.split(".", 1)[0]
            usage[key] = usage.get(key, 0) + used
    return usage


def _read_live(path: str, creating: bool) -> int | None:
    """The figure in a live executor's file; None (and the file removed) when its executor is gone."""
    if creating:
        # never locked by a reader: a forked executor inheriting that lock would make its creator fail
        try:
            if time.time() - os.lstat(path).st_mtime > TMP_GRACE:
                _unlink(path)
        except FileNotFoundError:
            pass
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError:
        return None  # removed meanwhile, or not a file of ours
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _value(fd, path)  # locked: its executor lives
        log.info("removing %s: its executor ended without closing it", path)
        _unlink(path)
        return None
    finally:
        os.close(fd)


def _value(fd: int, path: str) -> int | None:
    """Read the copies in the order opposite to the writer's: agreeing copies are one written value."""
    for _ in range(100):
        second = os.pread(fd, SLOT.size, SLOT.size)
        first = os.pread(fd, SLOT.size, 0)
        if first == second and len(first) == SLOT.size:
            return SLOT.unpack(first)[0]
    log.warning("%s: the counter kept changing while read; left out of this heartbeat", path)
    return None


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
