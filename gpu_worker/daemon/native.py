"""Native-mode processes: kernels on this node that run the real driver in-process, attached to their vGPU.

A native-mode shim (gpu_worker/shim/native) connects to the worker's Unix socket and sends a native
hello. The token is checked as for a forwarded session; then, instead of forking an executor, the
daemon claims a slot of the vGPU's ledger for the process (its CUDA context charged up front, as for
an executor) and sends the ledger's memfd and its layout (and the memfd of its GPU's board, pacing.py,
where the process stamps when its vGPU last wanted to launch, so bursting neighbours are not lent its
share while it runs). The process charges its allocations there itself, under the ledger's lock,
beside the vGPU's forwarded executors. The socket stays open: its
end is the process's end, and the slot is freed (`VGPURegistry.reap`). The peer's pid comes from the
kernel (SO_PEERCRED), never from the hello.

Oversubscription: when the real driver finds the GPU full, the shim asks for room on the same socket
(OP_NATIVE_ROOM), and the worker's eviction (tiering.py) moves other vGPUs off that GPU as it does for an
executor; the shim then tries again. A native vGPU is itself a candidate for eviction: its processes'
memory (their slots) counts as held on its GPUs until they are frozen.

The warm tier of a native process is the driver's checkpoint (`Checkpointer`): freezing sets the
slot's frozen byte, waits a grace period (a call that sees the byte asks for a thaw instead of
entering the driver), then locks the process's CUDA calls and checkpoints its device memory to host
memory. The process's next call asks for a thaw (OP_NATIVE_THAW): the worker waits until the GPU has
room for the memory (a restore that fails for lack of it leaves a process stuck), restores, unlocks,
clears the byte and answers. A process that uses managed (UVM) or IPC memory is never frozen: the
shim marks its slot, and the control API says so.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import struct
import subprocess
import sys
import threading
import time

from ..api import errors as E
from ..api.protocol import REP_HEADER, REQ_HEADER
from ..api.wire import MAX_REASON, NATIVE_OBSERVE, OP_NATIVE_ROOM, OP_NATIVE_THAW
from ..client.units import format_size
from .ledger import TIER_OFF, T_FROZEN, Slot, native_layout
from .pacing import CHECK_EVERY, DEPTH

log = logging.getLogger("gpulab.worker.native")

GRACE = 0.05          # seconds between marking a process frozen and locking it
ROOM_POLL = 0.5       # seconds between two looks for room while a thaw waits
STILL_LOCKED = 210     # checkpoint_helper.FROZEN_AS_IS (CUDA_ERROR_ALREADY_ACQUIRED): checkpoint and unlock failed
CHECKPOINT_POLL = 0.01  # seconds between two looks while a thaw waits for a checkpoint under way to end
MAX_ROOM_REQUEST = 256  # largest OP_NATIVE_ROOM payload accepted ({"device": k, "need": n, "wait": s}: under 80)
UVM, IPC = 1, 2       # the shim's bits in the byte after the frozen byte: why it cannot be frozen
WHY_NOT = {UVM: "it uses managed (UVM) memory, which the driver's checkpoint does not move",
           IPC: "it shares device memory with another process (IPC), which the driver's checkpoint does not move"}


def real_driver_env(base: dict | None = None) -> dict:
    """``base`` (default: this environment) without gpulab's libraries on LD_LIBRARY_PATH: the node's driver,
    found where the processes it checkpoints find it (an image may reach libcuda.so.1 only that way)."""
    from ..shim import native_dir, shim_dir

    ours = {os.path.realpath(shim_dir()), os.path.realpath(native_dir())}
    env = dict(os.environ if base is None else base)
    kept = [p for p in env.pop("LD_LIBRARY_PATH", "").split(":") if p and os.path.realpath(p) not in ours]
    if kept:
        env["LD_LIBRARY_PATH"] = ":".join(kept)
    return env


def peer_pid(conn: socket.socket) -> int:
    pid, _uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
    return pid


def slot_bytes(rec: dict) -> int:
    """Device memory a native process holds by its slot (allocations and context): what a checkpoint moves."""
    return rec.get("used", 0) + rec.get("overhead", 0)


def split_by_gpu(rec: dict, gpus: int) -> list[int]:
    """A native process's device memory on each of its vGPU's ``gpus`` GPUs, from its slot: its allocations where
    the shim charged them; its context (the slot's overhead) on the GPUs it allocated on, else on the first
    (cudart's device 0); what the shim did not place (an older shim), evenly."""
    on = list(rec.get("on_gpus", ()))[:gpus]
    on += [0] * (gpus - len(on))
    rest, overhead = max(rec.get("used", 0) - sum(on), 0), rec.get("overhead", 0)
    out = [n + rest // gpus for n in on]
    out[0] += rest % gpus
    where = [i for i, n in enumerate(on) if n] or [0]
    for i in where:
        out[i] += overhead // len(where)
    out[where[0]] += overhead % len(where)
    return out


class NativeLink:
    """The daemon's end of one native process's socket."""

    __slots__ = ("conn", "vgpu", "pid", "slot", "label", "state", "checkpointed", "checkpointed_on", "warm", "refused",
                 "short", "gone")

    def __init__(self, conn, vgpu, pid: int, slot: int, label: str):
        self.conn, self.vgpu, self.pid, self.slot, self.label = conn, vgpu, pid, slot, label
        self.state = "running"  # running, freezing (grace period), checkpointing, frozen, thawing
        self.checkpointed = 0   # bytes the last checkpoint moved to host memory
        self.checkpointed_on: list[int] = []  # of them, from each of the vGPU's GPUs (split_by_gpu)
        self.warm = 0           # bytes of the warm budget its checkpoint holds (charged on the tier board; with
                                # the emulated double, held aside while the checkpoint is under way)
        self.refused = ""       # why its last freeze was refused for want of room in the warm budget
        self.short = 0          # and the bytes more it wanted of the budget then (0: not refused for its size)
        self.gone = False       # the process ended: nothing of it counts any more


class NativeProcesses:
    """(daemon) The native processes attached to this worker's vGPUs, and their warm tier."""

    def __init__(self, registry, checkpointer: "Checkpointer"):
        self.registry = registry
        self.checkpointer = checkpointer
        self.links: dict[int, NativeLink] = {}  # pid -> link
        self.lock = threading.Lock()
        self.tiering = None  # tiering.py's Tiering, set by the worker: room for a process whose GPU is full
        self.time_every = 64  # the worker's native_time_every: an unpaced process times one launch in this many
        registry.native_tier = self.request_tier
        registry.native_why_not = self.why_not_pid
        registry.native_hot_by_gpu = self.hot_by_gpu
        registry.native_budget_has_room = self.budget_has_room
        # the checkpoints' host memory counts in the warm budget, on a tier-board row of the daemon's own
        self.board = registry.tierboard
        self.row = self.board.claim(os.getpid())
        self.warm_lock = threading.Lock()  # one change of a link's charge at a time (taken after self.lock)
        self.pending = 0  # counted_on_board: bytes of checkpoints under way, checked but not on the board yet

    # ------------------------------------------------------------------ attach
    def open(self, conn: socket.socket, grant: dict, flags: int, label: str, max_processes: int) -> NativeLink | None:
        """Answer a checked native hello; the link to watch, or None when the connection is done (refused,
        or an observer that only reads the ledger). Raises E.Refusal with the sentence for the person."""
        if conn.family != socket.AF_UNIX:
            raise E.Refusal(E.NOT_PERMITTED, "native mode attaches through the worker's Unix socket only: the "
                                             "process must run on the worker's node")
        pid = peer_pid(conn)
        observe = bool(flags & NATIVE_OBSERVE)
        if observe:
            v = self.registry.table.get(grant["token_hash"])
            if v is None:
                raise E.Refusal(E.DEVICE_UNAVAILABLE, "this vGPU is not granted to this worker")
            slot = 0
        else:
            v, slot = self.registry.open_slot(grant, pid, max_processes)
            self.registry.bind_native(v, slot, pid)
        info = {**native_layout(), "slot": slot, "slots": v.ledger.slots, "gpus": ",".join(grant["gpus"]),
                "depth_us": round(DEPTH * 1e6), "check_every_us": round(CHECK_EVERY * 1e6),
                "backend": self.checkpointer.backend,
                "eviction_wait_ms": round(self.tiering.eviction_wait * 1000) if self.tiering is not None else 0,
                "time_every": self.time_every}
        fds = [v.ledger.fd]
        row = v.row
        if not observe and v.board is not None and row is not None:  # its launches keep bursting neighbours off
            info.update(v.board.native_layout(row))
            fds.append(v.board.fd)
        payload = "".join(f"{k}={val}\n" for k, val in info.items()).encode()
        conn.setblocking(True)
        try:
            socket.send_fds(conn, [REP_HEADER.pack(len(payload), 0, 0) + payload], fds)
        except OSError:
            if not observe:
                self.registry.reap(pid)
            raise
        if observe:
            return None
        link = NativeLink(conn, v, pid, slot, f"{label} of vGPU {v.id} (native, pid {pid})")
        with self.lock:
            self.links[pid] = link
        log.info("%s: attached (quota %s)", link.label, v.ledger.quota)
        return link

    def readable(self, link: NativeLink) -> bool:
        """A request or the end of a native process; False when it ended (the caller unregisters the socket)."""
        try:
            head = link.conn.recv(REQ_HEADER.size, socket.MSG_WAITALL)
        except OSError:
            head = b""
        if len(head) == REQ_HEADER.size:
            plen, op, _flags = REQ_HEADER.unpack(head)
            if op == OP_NATIVE_THAW and plen == 0:
                threading.Thread(target=self._thaw_and_answer, args=(link,), name="gpulab-thaw", daemon=True).start()
                return True
            if op == OP_NATIVE_ROOM and 0 < plen <= MAX_ROOM_REQUEST:
                try:
                    body = link.conn.recv(plen, socket.MSG_WAITALL)
                except OSError:
                    body = b""
                if len(body) == plen:
                    self._room(link, body)
                    return True
            log.warning("%s: unexpected frame (opcode %d, %d bytes); closing", link.label, op, plen)
        self.closed(link)
        return False

    def closed(self, link: NativeLink) -> None:
        with self.lock:
            self.links.pop(link.pid, None)
            link.gone = True  # a freeze under way when it ended charges nothing after this
        if link.state in ("frozen", "thawing"):
            self.checkpointer.forget(link.pid)
        self._warm_to(link, 0)  # the process, and the host memory its checkpoint held, are gone
        self.registry.reap(link.pid)
        link.conn.close()
        log.info("%s: ended", link.label)

    def close_all(self) -> None:
        for link in list(self.links.values()):
            self.closed(link)

    # ------------------------------------------------------------------ oversubscription
    def _room(self, link: NativeLink, body: bytes) -> None:
        """The process's driver found its GPU full: the worker's eviction, as an executor's request (tiering.py),
        answered on the process's socket: 0 and the bytes freed, or OUT_OF_MEMORY and why none were."""
        def answer(reply: bytes) -> None:
            try:
                got = json.loads(reply)
            except ValueError:
                got = {"refused": "the worker's answer to the request for room was unreadable"}
            freed = int(got.get("freed", 0) or 0)
            if freed > 0:
                frame = REP_HEADER.pack(len(str(freed)), E.SUCCESS, 0) + str(freed).encode()
            else:
                why = str(got.get("refused") or "no other vGPU's memory could move off it").encode()[:MAX_REASON]
                frame = REP_HEADER.pack(len(why), E.OUT_OF_MEMORY, len(why)) + why
            try:
                link.conn.sendall(frame)
            except OSError:
                pass  # the process ended meanwhile

        gpus = link.vgpu.grant["gpus"]
        try:
            req = json.loads(body)
            device, need, wait = req["device"], req["need"], req["wait"]
            if not (type(device) is int and 0 <= device < len(gpus) and type(need) is int and need > 0
                    and type(wait) in (int, float) and wait >= 0):
                raise ValueError
        except (ValueError, KeyError, TypeError):
            answer(json.dumps({"refused": f"the worker did not understand this process's request for room "
                                          f"({body[:80]!r}); expected its device's ordinal, the bytes it needs "
                                          f"and the seconds it waits"}).encode())
            return
        if self.tiering is None:
            answer(json.dumps({"refused": "this worker does not move vGPUs' memory"}).encode())
            return
        index = self.registry.by_uuid[gpus[device]]["index"]
        self.tiering.request(link.vgpu, link.pid, json.dumps({"gpu": index, "need": need, "wait": wait}).encode(),
                             answer)

    def _make_room(self, link: NativeLink) -> None:
        """A thaw finds its GPUs short of room: ask the eviction to move other vGPUs off them (this one, waiting,
        is never chosen), as an executor's restore does, for what the checkpoint took from each."""
        for index, need in zip(self.registry.gpu_indexes(link.vgpu), link.checkpointed_on):
            if need <= 0:
                continue
            reply = json.loads(self.tiering.handle(link.vgpu, link.pid,
                                                   json.dumps({"gpu": index, "need": need}).encode()))
            if "refused" in reply:
                log.info("%s: no room made on GPU %d for its thaw: %s", link.label, index, reply["refused"])

    def hot_by_gpu(self, v, movable: bool = False) -> list[int]:
        """(registry.native_hot_by_gpu) Device memory the native processes of ``v`` hold now on each of its GPUs
        (their allocations and contexts, split_by_gpu): all of it, except while a checkpoint keeps it in host
        memory (frozen, or thawing: waiting for room or being restored); with ``movable``, only that of the
        processes an eviction could freeze (running, or being frozen, and free of managed and IPC memory)."""
        with self.lock:
            links = [(link, link.state) for link in self.links.values() if link.vgpu is v]
        gpus = len(v.grant["gpus"])
        total = [0] * gpus
        for link, state in links:
            if state in ("frozen", "thawing") and (link.checkpointed or movable):
                continue
            if movable and self.why_not(link):
                continue
            rec = v.ledger.read_slot(link.slot)
            if rec is not None:
                total = [a + b for a, b in zip(total, split_by_gpu(rec, gpus))]
        return total

    # ------------------------------------------------------------------ warm tier
    def budget_has_room(self, v) -> bool:
        """(registry.native_budget_has_room) Whether the warm budget, which refused a freeze of one of ``v``'s
        native processes for its size, now has the room that freeze wanted: the idle policy then asks again,
        rather than waiting for ``cold_after`` or a touch."""
        with self.lock:
            short = [link.short for link in self.links.values() if link.vgpu is v and link.short]
        board = self.board
        with self.warm_lock:
            left = board.warm_budget - board.warm_total() - self.pending
        return bool(short) and left >= min(short)

    def request_tier(self, v, seq: int, want: int) -> None:
        """(registry.request_tier) Move the vGPU's native processes: any colder tier freezes them (the driver's
        checkpoint keeps device memory in host RAM: warm; cold is served as warm), hot thaws them."""
        with self.lock:
            links = [link for link in self.links.values() if link.vgpu is v]
        for link in links:
            threading.Thread(target=self._move, args=(link, seq, want), name="gpulab-freeze", daemon=True).start()

    def _move(self, link: NativeLink, seq: int, want: int) -> None:
        slot = Slot(link.vgpu.ledger, link.slot)
        try:
            result = self._freeze(link) if want else self._thaw(link)
        except Exception:
            log.exception("%s: the %s failed", link.label, "freeze" if want else "thaw")
            result = E.UNKNOWN
        slot.set_done(seq, result)

    def why_not_pid(self, pid: int) -> str:
        """(registry.native_why_not) Why the native process ``pid`` cannot be frozen; "" if it can, or is not
        a native process of this worker."""
        with self.lock:
            link = self.links.get(pid)
        return (self.why_not(link) or link.refused) if link is not None else ""

    def why_not(self, link: NativeLink) -> str:
        flags = link.vgpu.ledger.map[link.vgpu.ledger._slot_off(link.slot) + TIER_OFF + T_FROZEN + 1]
        return "; ".join(text for bit, text in WHY_NOT.items() if flags & bit)

    def _warm_to(self, link: NativeLink, nbytes: int, limited: bool = False) -> bool:
        """Make the warm budget's charge for ``link``'s checkpoint ``nbytes``.  ``limited``: refuse (False, nothing
        charged, ``link.refused`` says why) where the budget lacks the room; else it may pass the budget, as the
        grace period's allocations, already moved by the driver, do.  A checkpointer whose moves the tier board
        counts already (the emulated double's) is only checked for room, and what it checked is held aside
        (``self.pending``) until its checkpoint ends, so that two freezes at once never both take the last room."""
        board = self.board
        with self.warm_lock:
            if link.gone:
                nbytes = 0
            more = nbytes - link.warm
            taken = board.warm_total()
            if self.checkpointer.counted_on_board:
                taken += self.pending - link.warm
                fits = not limited or not nbytes or taken + nbytes <= board.warm_budget
                more = nbytes
                if fits:  # a checkpoint's bytes are held here between its check and its end, then on the board
                    held = nbytes if limited else 0
                    self.pending += held - link.warm
                    link.warm = held
                    return True
            elif more > 0 and self.row is None:
                link.refused = "the worker's tier board has no row free to count it in the warm budget"
                return False
            else:
                fits = more <= 0 or board.charge_warm(self.row, more)
                if not fits and not limited:
                    board.force_warm(self.row, more)
                    fits = True
                elif more < 0:
                    board.uncharge_warm(self.row, -more)
            if not fits:
                left = max(board.warm_budget - taken, 0)
                budget = (f"the warm budget ({format_size(board.warm_budget)}) has {format_size(left)} left"
                          if board.warm_budget else "this worker has no warm tier (its warm_budget is 0)")
                link.refused = (f"its checkpoint would keep {format_size(nbytes)} in host memory and {budget}: the "
                                f"driver's checkpoint has no colder tier")
                link.short = more
                log.info("%s: not frozen: %s", link.label, link.refused)
                return False
            link.warm = nbytes
            return True

    def _freeze(self, link: NativeLink) -> int:
        link.refused, link.short = "", 0
        why = self.why_not(link)
        if why:
            log.info("%s: not frozen: %s", link.label, why)
            return E.NOT_SUPPORTED
        ledger = link.vgpu.ledger
        with self.lock:
            if link.state != "running":
                return E.SUCCESS
            # the checkpoint keeps the memory in host RAM and has no colder tier: within the warm budget or not at all
            if not self._warm_to(link, slot_bytes(ledger.read_slot(link.slot) or {}), limited=True):
                return E.OUT_OF_MEMORY
            link.state = "freezing"
        ledger.set_frozen(link.slot, True)
        time.sleep(GRACE)
        with self.lock:
            if link.state != "freezing" or not ledger.frozen(link.slot):  # a call came: it is not idle
                link.state = "running"
                ledger.set_frozen(link.slot, False)
                self._warm_to(link, 0)
                return E.SUCCESS
            link.state = "checkpointing"  # from here a thaw waits for the checkpoint's end, then undoes it
        start = time.monotonic()
        result = self.checkpointer.freeze(link.pid)
        rec = ledger.read_slot(link.slot) or {}
        nbytes = slot_bytes(rec)
        slot = Slot(ledger, link.slot)
        with self.lock:
            if result == STILL_LOCKED:  # the checkpoint failed and the unlock too: its next call asks for a thaw
                link.state, link.checkpointed = "frozen", 0
                self._warm_to(link, 0)
                slot.count_move("failed")
                log.error("%s: the driver's checkpoint failed and the process stays locked until it is thawed",
                          link.label)
                return result
            if result != E.SUCCESS:
                link.state = "running"
                ledger.set_frozen(link.slot, False)
                self._warm_to(link, 0)
                slot.count_move("failed")
                log.warning("%s: the driver's checkpoint failed (%s); the process runs on", link.label, E.name_of(result))
                return result
            link.state, link.checkpointed = "frozen", nbytes
            link.checkpointed_on = split_by_gpu(rec, len(link.vgpu.grant["gpus"]))
            self._warm_to(link, nbytes)  # what it moved, the grace period's last allocations included
        slot.set_tiers(0, rec.get("used", 0), 0)
        slot.count_move("offload", nbytes, time.monotonic() - start)
        log.info("%s: frozen, %d bytes to host memory in %.3f s", link.label, nbytes, time.monotonic() - start)
        return E.SUCCESS

    def _thaw(self, link: NativeLink) -> int:
        ledger = link.vgpu.ledger
        while True:
            with self.lock:
                if link.state == "freezing":  # not locked yet: the freeze stops
                    link.state = "running"
                    ledger.set_frozen(link.slot, False)
                    self._warm_to(link, 0)
                    return E.SUCCESS
                if link.state != "checkpointing":  # else the driver is locking it now: wait for the outcome
                    if link.state != "frozen":
                        return E.SUCCESS
                    link.state = "thawing"
                    break
            time.sleep(CHECKPOINT_POLL)
        start = time.monotonic()
        warned, asked = False, None
        while not self.checkpointer.has_room(link.vgpu.grant["gpus"], link.checkpointed_on):
            if not warned:
                log.warning("%s: waiting for %d bytes of room on its GPU before restoring", link.label,
                            link.checkpointed)
                warned = True
            if self.tiering is not None and (asked is None or time.monotonic() - asked >= self.tiering.eviction_wait):
                asked = time.monotonic()  # at once, then once per eviction_wait while the room does not come
                self._make_room(link)
            time.sleep(ROOM_POLL)
        result = self.checkpointer.thaw(link.pid)
        slot = Slot(ledger, link.slot)
        rec = ledger.read_slot(link.slot) or {}
        with self.lock:
            if result != E.SUCCESS:
                link.state = "frozen"
                slot.count_move("failed")
                log.error("%s: the driver's restore failed (%s)", link.label, E.name_of(result))
                return result
            link.state = "running"
            self._warm_to(link, 0)
        ledger.set_frozen(link.slot, False)
        slot.set_tiers(rec.get("used", 0), 0, 0)
        slot.count_move("restore", link.checkpointed, time.monotonic() - start)
        log.info("%s: thawed in %.3f s", link.label, time.monotonic() - start)
        return E.SUCCESS

    def _thaw_and_answer(self, link: NativeLink) -> None:
        """The process's own call found it frozen: thaw, then answer (the call goes on once answered)."""
        try:
            result = self._thaw(link)
        except Exception:
            log.exception("%s: the thaw failed", link.label)
            result = E.UNKNOWN
        why = b"" if result == E.SUCCESS else (f"the worker could not restore this process's GPU memory "
                                               f"({E.name_of(result)}); its log says why").encode()
        if result != E.SUCCESS:  # the process would wait in the driver's lock: say why, and let it try again
            link.vgpu.ledger.set_frozen(link.slot, True)
        try:
            link.conn.sendall(REP_HEADER.pack(len(why), result, len(why)) + why)
        except OSError:
            pass


# ---------------------------------------------------------------------------------------- checkpointers
class Checkpointer:
    """How the worker freezes and thaws a process's CUDA state (the driver's checkpoint API)."""

    backend = "cuda"
    # whether the tier board counts the host memory of its checkpoints already (the emulated double's executors
    # do); if not, NativeProcesses counts it in the warm budget
    counted_on_board = False

    def freeze(self, pid: int) -> int:
        raise NotImplementedError

    def thaw(self, pid: int) -> int:
        raise NotImplementedError

    def has_room(self, gpus: list[str], need: list[int]) -> bool:
        """Whether each of ``gpus`` has room for the bytes ``need`` says (in the same order)."""
        raise NotImplementedError

    def forget(self, pid: int) -> None:
        """The process ended while frozen."""


class DriverCheckpointer(Checkpointer):
    """The real driver's checkpoint API (driver >= 570), called in a helper process of its own: the daemon
    forks executors, so it must never initialize CUDA itself."""

    def __init__(self):
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()

    def _ask(self, op: str, pid: int) -> int:
        with self.lock:
            if self.proc is None or self.proc.poll() is not None:
                self.proc = subprocess.Popen([sys.executable, "-m", "gpu_worker.daemon.checkpoint_helper"],
                                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                             env=real_driver_env())
            self.proc.stdin.write(f"{op} {pid}\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        try:
            return int(json.loads(line)["result"])
        except (ValueError, KeyError, TypeError):
            log.error("the checkpoint helper answered %r to %s %d", line, op, pid)
            return E.UNKNOWN

    def freeze(self, pid: int) -> int:
        return self._ask("freeze", pid)

    def thaw(self, pid: int) -> int:
        return self._ask("thaw", pid)

    def has_room(self, gpus: list[str], need: list[int]) -> bool:
        """NVML's free memory of each GPU against what the checkpoint took from it."""
        try:
            import pynvml as nvml

            nvml.nvmlInit()
            free = [nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByUUID(u)).free for u in gpus]
        except Exception:  # no NVML: the restore is tried, the driver refuses cleanly when short
            return True
        return all(f >= n for f, n in zip(free, need))


class EmulatedCheckpointer(Checkpointer):
    """The test double on a worker without a GPU, where a native process's "real driver" is the forwarding shim
    (build.py's driver double) talking to this worker: its checkpoint moves that process's forwarded vGPU(s)
    to the warm tier, and its restore brings them back hot, through the executors' own tier machinery (which
    count the warm bytes on the tier board)."""

    backend = "emulated"
    counted_on_board = True
    WAIT = 30.0

    def __init__(self, registry):
        self.registry = registry

    def _vgpus_of(self, pid: int) -> list[str]:
        with self.registry.lock:
            out = []
            for v in self.registry.table.values():
                for exe, slot in v.procs.items():
                    rec = v.ledger.read_slot(slot)
                    if exe not in v.native and rec is not None and rec["client_pid"] == pid:
                        out.append(v.id)
            return sorted(set(out))

    def _move(self, pid: int, want: int) -> int:
        for vid in self._vgpus_of(pid):
            asked = self.registry.request_tier(vid, want)
            if asked is None:
                continue
            deadline = time.monotonic() + self.WAIT
            while not self.registry.tier_done(vid, asked[0]):
                if time.monotonic() > deadline:
                    return E.UNKNOWN
                time.sleep(0.01)
            failures = self.registry.tier_failures(vid, asked[0])
            if failures:
                return next(iter(failures.values()))
        return E.SUCCESS

    def freeze(self, pid: int) -> int:
        return self._move(pid, 1)

    def thaw(self, pid: int) -> int:
        return self._move(pid, 0)

    def has_room(self, gpus: list[str], need: list[int]) -> bool:
        """The emulated GPUs' room is what their tier board leaves (their configured memory)."""
        board = self.registry.tierboard
        indexes = [self.registry.by_uuid[u]["index"] for u in gpus]
        return all(not board.capacity(i) or board.capacity(i) - board.hot_on(i) >= n for i, n in zip(indexes, need))
