"""Usage accounting in one process: a Session on the emulated backend, its counter, the daemon's reader.

No worker, no shim: the session's handlers are called directly, and read_usage is what the
heartbeat would send at that instant."""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import time

import pytest

from gpu_worker.api import errors as E
from gpu_worker.api.errors import CudaError
from gpu_worker.backends.emulated import EmulatedBackend
from gpu_worker.daemon.session import PRIMARY_CTX_BASE, Session
from gpu_worker.daemon.usage import TMP, TMP_GRACE, UsageCounter, default_dir, prepare_dir, read_usage

KEY = "a" * 16  # stands for a token hash


@pytest.fixture
def usage_dir(tmp_path):
    return prepare_dir(str(tmp_path / "usage"))


def open_session(usage_dir, quota=None, key=KEY) -> Session:
    """A session with its primary context current; it counts into `usage_dir` (None: no counter)."""
    session = Session(EmulatedBackend(total_memory=1 << 30), quota=quota, label="test",
                      usage=UsageCounter(usage_dir, key) if usage_dir else None)
    session.cuDevicePrimaryCtxRetain(0)
    session.set_context(struct.pack("<Q", PRIMARY_CTX_BASE))
    return session


def test_every_change_is_visible_at_once(usage_dir):
    s = open_session(usage_dir)
    (a,) = s.cuMemAlloc(3 << 20)
    (b,) = s.cuMemAlloc(5 << 20)  # no pause between them: nothing is rate-limited
    assert read_usage(usage_dir) == {KEY: 8 << 20}
    s.cuMemFree(a)
    assert read_usage(usage_dir) == {KEY: 5 << 20}
    s.cuMemFree(b)
    assert read_usage(usage_dir) == {KEY: 0}


def test_the_figure_is_what_the_quota_charges(usage_dir):
    s = open_session(usage_dir, quota=4096)
    s.cuMemAlloc(1000)  # charged in 256-byte units, as the quota counts it
    assert read_usage(usage_dir) == {KEY: 1024} and s.used == 1024
    with pytest.raises(CudaError) as exc:
        s.cuMemAlloc(4000)
    assert exc.value.code == E.OUT_OF_MEMORY
    assert read_usage(usage_dir) == {KEY: 1024}  # a refused allocation changes nothing
    with pytest.raises(CudaError):
        s.cuMemFree(0x1234)
    assert read_usage(usage_dir) == {KEY: 1024}


def test_close_frees_and_withdraws_the_figure(usage_dir):
    s = open_session(usage_dir)
    s.cuMemAlloc(1 << 20)
    s.close()
    assert s.used == 0 and read_usage(usage_dir) == {} and os.listdir(usage_dir) == []


def test_processes_of_one_vgpu_add_up_and_others_stay_apart(usage_dir):
    first, second, other = open_session(usage_dir), open_session(usage_dir), open_session(usage_dir, key="b" * 16)
    first.cuMemAlloc(1 << 20)
    second.cuMemAlloc(2 << 20)
    other.cuMemAlloc(4 << 20)
    assert read_usage(usage_dir) == {KEY: 3 << 20, "b" * 16: 4 << 20}


def test_without_a_counter_the_session_still_counts():
    s = open_session(None)
    s.cuMemAlloc(512)
    assert s.used == 512
    s.close()


HOLDER = """
import sys
from gpu_worker.daemon.usage import UsageCounter
c = UsageCounter(sys.argv[1], sys.argv[2])
c.set(int(sys.argv[3]))
print("set", flush=True)
if sys.argv[4] == "hold":
    sys.stdin.readline()
"""


def holder(usage_dir, key, value, hold):
    p = subprocess.Popen([sys.executable, "-c", HOLDER, usage_dir, key, str(value), hold],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "set\n"
    return p


def test_a_live_executor_counts_and_a_dead_ones_file_is_removed(usage_dir):
    live = holder(usage_dir, "live", 7, "hold")
    dead = holder(usage_dir, "dead", 9, "exit")  # ends without closing: what a crash or SIGKILL leaves
    dead.wait()
    try:
        assert len(os.listdir(usage_dir)) == 2
        assert read_usage(usage_dir) == {"live": 7}
        assert [n.split(".")[0] for n in os.listdir(usage_dir)] == ["live"]
    finally:
        live.kill()
        live.wait()
    assert read_usage(usage_dir) == {} and os.listdir(usage_dir) == []


def test_a_counter_being_created_is_left_alone_until_it_is_old(usage_dir):
    young, old = os.path.join(usage_dir, "x.1.aa" + TMP), os.path.join(usage_dir, "y.2.bb" + TMP)
    for path in (young, old):
        open(path, "wb").close()
    os.utime(old, (time.time() - TMP_GRACE - 1,) * 2)
    assert read_usage(usage_dir) == {}
    assert os.listdir(usage_dir) == [os.path.basename(young)]


def test_the_directory_must_be_private(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError, match="0700"):
        prepare_dir(str(shared))
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "usage-real")
    (tmp_path / "usage-real").mkdir(mode=0o700)
    with pytest.raises(PermissionError):
        prepare_dir(str(link))


def test_the_default_directory_belongs_to_the_worker_not_the_process(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    a = default_dir("gpu-node-1", "http://pool:8080/")
    assert a == default_dir("gpu-node-1", "http://pool:8080/")  # a restarted daemon finds it again
    assert a != default_dir("gpu-node-2", "http://pool:8080/")
    assert a != default_dir("gpu-node-1", "http://other-pool:8080/")
    assert os.path.dirname(a) == str(tmp_path) and "/" not in default_dir("a/b", "x")[len(str(tmp_path)) + 1:]
