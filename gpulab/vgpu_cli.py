"""`gpulab vgpu`: a worker's vGPUs, their usage, call traces, VRAM tiers and revocation, through its control API.

Who asks decides what is seen (gpu_worker/daemon/control.py): the worker's admin sees every vGPU,
a session sees its own.  The credential is found in this order:
  1. --url, with --token or $GPULAB_TOKEN;
  2. $GPULAB_CONTROL_URL and $GPULAB_TOKEN: the session itself, from a kernel's environment;
  3. what a worker on this host published in the state directory ($GPULAB_STATE_DIR, else
     $XDG_STATE_HOME/gpulab, else ~/.local/state/gpulab): its control URL and admin token, of the
     only worker there or of --worker NAME.
A token belongs in $GPULAB_TOKEN or the published file rather than in --token: a command line is
visible to every user of the host (`ps`), and the admin token sees and revokes every vGPU.
Only the standard library talks to the worker, so the command answers at once.
"""
from __future__ import annotations

import json
import sys

from traitlets import Bool, Float, Int, Unicode
from traitlets.config import Application

from gpu_worker.client.control import TIER_WAIT, ControlError, call, find_credential, quote
from gpu_worker.client.vgpu_text import TRACE_HEADER, describe, moved, pct, seconds, short_gpus, table, \
    tier_bytes, trace_rows, vram
from gpulab.cli import SubcommandApp

FOLLOW_WAIT = 25  # seconds each --follow long-poll is held by the worker


class VGPUCommand(Application):
    """Options every `gpulab vgpu` subcommand shares, and the credential they find."""

    url = Unicode("", help="The worker's control API, http://host:port (default: $GPULAB_CONTROL_URL, else "
                           "what the worker published in the state directory).").tag(config=True)
    token = Unicode("", help="The worker's admin token or a vGPU's session token (default: $GPULAB_TOKEN "
                             "with --url or $GPULAB_CONTROL_URL, else the admin token the worker published). "
                             "Prefer those: a token on the command line is visible to every user of the host "
                             "in `ps`.").tag(config=True)
    worker = Unicode("", help="Name of the worker on this host whose published control URL and admin token "
                              "to use, when the state directory holds several.").tag(config=True)
    state_dir = Unicode("", help="Where workers on this host publish their control URL and admin token "
                                 "(default: $GPULAB_STATE_DIR, else $XDG_STATE_HOME/gpulab, else "
                                 "~/.local/state/gpulab).").tag(config=True)
    as_json = Bool(False, help="Print the worker's JSON answer instead of a table, for scripts.").tag(config=True)
    aliases = {"url": "VGPUCommand.url", "token": "VGPUCommand.token", "worker": "VGPUCommand.worker",
               "state-dir": "VGPUCommand.state_dir"}
    flags = {"json": ({"VGPUCommand": {"as_json": True}}, "Print JSON instead of a table, for scripts.")}

    def start(self):
        try:
            self.run()
        except ControlError as e:
            print(f"gpulab vgpu: {e}", file=sys.stderr)
            self.exit(1)
        except KeyboardInterrupt:
            self.exit(0)

    # ------------------------------------------------------------------ credential and requests
    def credential(self) -> tuple[str, str]:
        """(control URL, token) in the order the module docstring gives."""
        return find_credential(self.url, self.token, self.worker, self.state_dir)

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        return call(*self.credential(), method, path, body, timeout)

    def one_id(self) -> str:
        if len(self.extra_args) != 1:
            raise ControlError(f"give one vGPU id (`gpulab vgpu list` shows them), e.g. `gpulab vgpu {self.name.rsplit('-', 1)[1]} 17`")
        return quote(self.extra_args[0])

    def emit(self, data) -> bool:
        """Print `data` as JSON when --json; True if so (the caller then prints no table)."""
        if self.as_json:
            print(json.dumps(data, indent=2))
        return self.as_json


# ---------------------------------------------------------------------- subcommands


class ListApp(VGPUCommand):
    name = "gpulab-vgpu-list"
    description = """List the worker's vGPUs (a session sees its own): owner, state, VRAM charged against
    the quota (allocations plus CUDA context overhead), its tier (hot, warm, cold, mixed, none) and bytes
    per tier, compute share and the share measured over the last 10 s, time throttled to the share,
    processes waiting for it now (QUEUE), processes, calls."""

    def run(self):
        vgpus = self.call("GET", "/api/vgpus")["vgpus"]
        if self.emit(vgpus):
            return
        if not vgpus:
            print("no vGPUs on this worker")
            return
        print(table([[str(v["id"]), v.get("user") or "-", v.get("profile") or "-", v.get("state") or "-",
                      short_gpus(v.get("gpus")), vram(v), v.get("tier", "-"), tier_bytes(v, "hot"),
                      tier_bytes(v, "warm"), tier_bytes(v, "cold"), pct(v.get("share", v.get("compute"))),
                      pct(v.get("share_measured")), seconds(v.get("throttled_time")), str(v.get("queue_depth", "-")),
                      str(len(v.get("processes") or [])), str(v.get("calls", 0))]
                     for v in vgpus], ["ID", "USER", "PROFILE", "STATE", "GPUS", "VRAM", "TIER", "HOT", "WARM",
                                       "COLD", "SHARE", "MEASURED", "THROTTLED", "QUEUE", "PROCS", "CALLS"]))


class ShowApp(VGPUCommand):
    name = "gpulab-vgpu-show"
    description = """Show one vGPU: its grant, VRAM (per process, quota, context overhead), its tiers and
    moves between them, compute share (measured, kernel time, time throttled to it), counters and errors
    by CUresult. `gpulab vgpu show ID`."""

    def run(self):
        v = self.call("GET", f"/api/vgpus/{self.one_id()}")
        if self.emit(v):
            return
        print(describe(v))


class TraceApp(VGPUCommand):
    name = "gpulab-vgpu-trace"
    description = """Show a vGPU's recent driver calls (time, client process, function, duration, bytes,
    CUresult), oldest first. With --follow, keep printing new calls until Ctrl-C."""
    follow = Bool(False, help="Keep printing new calls as they happen, until Ctrl-C.").tag(config=True)
    since = Int(0, help="Show only calls after this sequence number (a record's seq).").tag(config=True)
    aliases = {**VGPUCommand.aliases, "since": "TraceApp.since"}
    flags = {**VGPUCommand.flags,
             "follow": ({"TraceApp": {"follow": True}}, "Keep printing new calls until Ctrl-C."),
             "f": ({"TraceApp": {"follow": True}}, "Keep printing new calls until Ctrl-C.")}

    def run(self):
        path, since, header = f"/api/vgpus/{self.one_id()}/trace", self.since, not self.as_json
        while True:
            wait = FOLLOW_WAIT if self.follow else 0
            page = self.call("GET", f"{path}?since={since}&wait={wait}", timeout=wait + 30)
            records, since = page["records"], page["next"]
            if self.as_json:
                for r in records:
                    print(json.dumps(r), flush=True)  # one record a line, as they come
            elif records:
                text = table(trace_rows(records), TRACE_HEADER)
                print(text if header else "\n".join(text.splitlines()[1:]), flush=True)
                header = False
            if not records and not self.follow:
                break
        if header:
            print("no calls recorded")


class RevokeApp(VGPUCommand):
    name = "gpulab-vgpu-revoke"
    description = """Revoke a vGPU: its sessions end, each client's next call fails with a CUDA error
    that gives the reason, and its memory is freed. `gpulab vgpu revoke ID --reason TEXT`."""
    reason = Unicode("", help="Why, in words: the vGPU's programs are told.").tag(config=True)
    aliases = {**VGPUCommand.aliases, "reason": "RevokeApp.reason"}

    def run(self):
        v = self.call("POST", f"/api/vgpus/{self.one_id()}/revoke", {"reason": self.reason})
        if not self.emit(v):
            print(f"vGPU {v['id']} revoked: {v.get('reason') or self.reason}")


class MoveCommand(VGPUCommand):
    """Offload or restore: the worker answers once the vGPU's processes have moved its memory."""

    def move(self, action: str, body: dict | None) -> None:
        vid = self.one_id()
        v = self.call("POST", f"/api/vgpus/{vid}/{action}", body, timeout=TIER_WAIT + 30)
        if not self.emit(v):
            print(moved(v))


class OffloadApp(MoveCommand):
    name = "gpulab-vgpu-offload"
    description = """Move a vGPU's device memory off its GPU, to the worker's host RAM (--to warm) or to
    files on its disk (--to cold). Its programs keep their pointers; their next call that needs the memory
    brings it back first. `gpulab vgpu offload ID --to warm|cold`."""
    to = Unicode("warm", help="Where the memory goes: warm (the worker's host RAM, quick to bring back) or cold "
                              "(files on the worker's disk, frees host RAM too).").tag(config=True)
    aliases = {**VGPUCommand.aliases, "to": "OffloadApp.to"}

    def run(self):
        self.move("offload", {"to": self.to})


class RestoreApp(MoveCommand):
    name = "gpulab-vgpu-restore"
    description = """Bring a vGPU's offloaded memory back onto its GPU now, rather than at its programs'
    next call that needs it. `gpulab vgpu restore ID`."""

    def run(self):
        self.move("restore", None)


class IdleApp(VGPUCommand):
    name = "gpulab-vgpu-idle"
    description = """Tell the worker a vGPU's program is idle (e.g. its Jupyter kernel): the idle clock that
    moves its memory to host RAM and then to disk starts at --since (default now), unless the program
    touches its memory after this. `gpulab vgpu idle ID [--since EPOCH]`."""
    since = Float(None, allow_none=True, help="Since when the program has been idle, in epoch seconds (default: "
                                              "now).").tag(config=True)
    aliases = {**VGPUCommand.aliases, "since": "IdleApp.since"}

    def run(self):
        v = self.call("POST", f"/api/vgpus/{self.one_id()}/idle", {} if self.since is None else {"since": self.since})
        if not self.emit(v):
            print(f"vGPU {v['id']} counts as idle for {v.get('idle_seconds') or 0:.0f} s")


class VGPUApp(SubcommandApp):
    name = "gpulab-vgpu"
    description = """A worker's vGPUs through its control API: list them, show one's usage, follow its
    call trace, move its memory off the GPU and back, revoke it. On the worker's host as its admin (the
    control URL and admin token it published in the state directory), or as the session itself from a
    kernel ($GPULAB_CONTROL_URL and $GPULAB_TOKEN), or anywhere with --url and $GPULAB_TOKEN."""
    examples = """
gpulab vgpu list
gpulab vgpu show 17
gpulab vgpu trace 17 --follow
gpulab vgpu offload 17 --to cold
gpulab vgpu restore 17
gpulab vgpu idle 17 --since 1763770000
gpulab vgpu revoke 17 --reason "the course ended"
GPULAB_TOKEN="$(cat worker-w1.admin-token)" gpulab vgpu list --url http://gpuhost:7001 --json
"""
    subcommand_description = "Subcommands are launched as `gpulab vgpu cmd [args]`; `gpulab vgpu cmd --help` " \
                             "describes each one's options."
    subcommands = {
        "list": ("gpulab.vgpu_cli.ListApp", "List the worker's vGPUs: VRAM, compute share, processes, calls."),
        "show": ("gpulab.vgpu_cli.ShowApp", "Show one vGPU's grant, VRAM per process, compute, counters, errors."),
        "trace": ("gpulab.vgpu_cli.TraceApp", "Show (or --follow) a vGPU's recent driver calls."),
        "offload": ("gpulab.vgpu_cli.OffloadApp", "Move a vGPU's memory to the worker's host RAM or disk."),
        "restore": ("gpulab.vgpu_cli.RestoreApp", "Bring a vGPU's offloaded memory back onto its GPU now."),
        "idle": ("gpulab.vgpu_cli.IdleApp", "Say a vGPU's program is idle: its idle clock starts."),
        "revoke": ("gpulab.vgpu_cli.RevokeApp", "Revoke a vGPU: its sessions end with the reason you give."),
    }
    aliases: dict = {}
    flags: dict = {}
