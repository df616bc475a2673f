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

import datetime
import json
import os
import sys
import urllib.error
import urllib.parse
import urllib.request

from traitlets import Bool, Float, Int, Unicode
from traitlets.config import Application

from gpulab.cli import SubcommandApp

FOLLOW_WAIT = 25  # seconds each --follow long-poll is held by the worker
TIER_WAIT = 30  # seconds the worker waits for a vGPU's processes to move its memory (control.TIER_WAIT)


class VGPUError(Exception):
    """What went wrong, as one sentence for the person at the terminal."""


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
        except VGPUError as e:
            print(f"gpulab vgpu: {e}", file=sys.stderr)
            self.exit(1)
        except KeyboardInterrupt:
            self.exit(0)

    # ------------------------------------------------------------------ credential and requests
    def credential(self) -> tuple[str, str]:
        """(control URL, token) in the order the module docstring gives."""
        if self.url:
            token = self.token or os.environ.get("GPULAB_TOKEN", "")
            if not token:
                raise VGPUError("--url needs a credential: set GPULAB_TOKEN (or pass --token, which `ps` shows "
                                "to every user of this host)")
            return self.url.rstrip("/"), token
        if os.environ.get("GPULAB_CONTROL_URL") and not self.worker:
            token = self.token or os.environ.get("GPULAB_TOKEN", "")
            if not token:
                raise VGPUError("GPULAB_CONTROL_URL is set but GPULAB_TOKEN is not: set it too")
            return os.environ["GPULAB_CONTROL_URL"].rstrip("/"), token
        from gpu_worker.client.env import default_state_dir
        from gpu_worker.daemon.control import published

        state = self.state_dir or default_state_dir()
        workers = published(state)
        if not workers:
            raise VGPUError(f"no worker on this host published its control API in {state}; set "
                            f"GPULAB_CONTROL_URL and GPULAB_TOKEN, or pass --url with GPULAB_TOKEN set")
        if self.worker:
            if self.worker not in workers:
                raise VGPUError(f"no worker named {self.worker} published its control API in {state} "
                                f"(there: {', '.join(workers)})")
            name = self.worker
        elif len(workers) > 1:
            raise VGPUError(f"several workers published their control API in {state} ({', '.join(workers)}): "
                            f"choose one with --worker NAME")
        else:
            (name,) = workers
        url, token_file = workers[name]
        if self.token:
            return url.rstrip("/"), self.token
        try:
            return url.rstrip("/"), token_file.read_text().strip()
        except PermissionError:
            raise VGPUError(f"cannot read worker {name}'s admin token {token_file}: run this as the user the "
                            f"worker runs as") from None
        except OSError as e:
            raise VGPUError(f"cannot read worker {name}'s admin token {token_file}: {e.strerror}") from None

    def call(self, method: str, path: str, body: dict | None = None, timeout: float = 30):
        url, token = self.credential()
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(url + path, data=data, method=method,
                                     headers={"Authorization": f"token {token}", "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            try:
                message = json.loads(e.read())["message"]
            except (ValueError, KeyError, TypeError):
                message = f"the worker answered {e.code} {e.reason}"
            raise VGPUError(message) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise VGPUError(f"cannot reach the worker's control API at {url}: {reason}") from None

    def one_id(self) -> str:
        if len(self.extra_args) != 1:
            raise VGPUError(f"give one vGPU id (`gpulab vgpu list` shows them), e.g. `gpulab vgpu {self.name.rsplit('-', 1)[1]} 17`")
        return urllib.parse.quote(self.extra_args[0], safe="")

    def emit(self, data) -> bool:
        """Print `data` as JSON when --json; True if so (the caller then prints no table)."""
        if self.as_json:
            print(json.dumps(data, indent=2))
        return self.as_json


# ---------------------------------------------------------------------- formatting


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def size(n) -> str:
    from gpu_worker.client.units import format_size

    return "-" if n is None else format_size(int(n))


def short_gpus(uuids) -> str:
    return ",".join(u[:12] for u in uuids or []) or "-"


def clock(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).strftime("%H:%M:%S.%f")[:-3]


def vram(v: dict) -> str:
    charged = (v.get("used") or 0) + (v.get("overhead") or 0)
    return f"{size(charged)} / {size(v.get('quota')) if v.get('quota') is not None else 'whole GPU'}"


def tier_bytes(v: dict, tier: str) -> str:
    return size((v.get("tiers") or {}).get(tier, 0))


def tiers(v: dict) -> str:
    """Where its memory is: "mixed: 150.0 MiB hot, 75.0 MiB warm, 75.0 MiB cold"."""
    return f"{v.get('tier', '-')}: " + ", ".join(f"{tier_bytes(v, t)} {t}" for t in ("hot", "warm", "cold"))


def moves(v: dict) -> str:
    m = v.get("moves") or {}
    return (f"{m.get('offloads', 0)} offloads ({size(m.get('bytes_offloaded', 0))} in "
            f"{seconds(m.get('offload_seconds', 0))}), {m.get('restores', 0)} restores "
            f"({size(m.get('bytes_restored', 0))} in {seconds(m.get('restore_seconds', 0))}), "
            f"{m.get('failures', 0)} failed")


def seconds(t) -> str:
    return "-" if t is None else f"{t:.2f} s"


def pct(p) -> str:
    return "-" if p is None else f"{p:g}%"


def compute(v: dict) -> str:
    """Its share, whether it may burst, and what it used lately: "25% (bursts), measured 31.5% over 10 s"."""
    share = v.get("share", v.get("compute"))
    if share is None:
        return "-"
    burst = {True: " (may burst into idle time)", False: " (no bursting)"}.get(v.get("burst"), "")
    text = f"{share:g}% of a GPU{burst}"
    if v.get("share_measured") is not None:
        text += f", measured {pct(v['share_measured'])} over the last 10 s"
    return text


def trace_rows(records: list[dict]) -> list[list[str]]:
    return [[clock(r["time"]), str(r["pid"]), r["function"], f"{r['duration'] * 1e6:.0f} us",
             size(r["bytes"]) if r.get("bytes") else "-", r.get("error") or ("CUDA_SUCCESS" if not r["result"]
                                                                              else str(r["result"]))]
            for r in records]


TRACE_HEADER = ["TIME", "PID", "FUNCTION", "DURATION", "BYTES", "RESULT"]


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
        lines = [("vGPU", str(v["id"])), ("user", v.get("user") or "-"),
                 ("profile", f"{v.get('profile') or '-'} (QoS {v.get('qos') or '-'})"),
                 ("state", v.get("state", "-") + (f": {v['reason']}" if v.get("reason") else "")),
                 ("GPUs", ", ".join(v.get("gpus") or []) or "-"),
                 ("compute", compute(v)),
                 ("kernels", f"{seconds(v.get('kernel_time'))} of GPU time; throttled "
                             f"{seconds(v.get('throttled_time'))} waiting for its share, "
                             f"{v.get('queue_depth', '-')} process(es) waiting now"),
                 ("VRAM", f"{vram(v)} (allocations {size(v.get('used', 0))}, context overhead "
                          f"{size(v.get('overhead', 0))})"),
                 ("tiers", tiers(v) + (f"; idle {v['idle_seconds']:.0f} s" if v.get("idle_seconds") is not None
                                       else "")),
                 ("moves", moves(v)),
                 ("calls", f"{v.get('calls', 0)} ({v.get('launches', 0)} launches)"),
                 ("copied", f"{size(v.get('bytes_in', 0))} to the device, {size(v.get('bytes_out', 0))} from it"),
                 ("errors", ", ".join(f"{k} x{n}" for k, n in sorted((v.get("errors") or {}).items())) or "none")]
        print("\n".join(f"{k + ':':<9} {text}" for k, text in lines))
        procs = v.get("processes") or []
        if procs:
            print()
            print(table([[str(p["pid"]), str(p.get("client_pid", "-")), size(p.get("used", 0)),
                          size(p.get("overhead", 0)), str(p.get("calls", 0)), seconds(p.get("kernel_time")),
                          seconds(p.get("throttled_time")), {True: "yes", False: "no"}.get(p.get("waiting"), "-"),
                          clock(p["started"]) if p.get("started") else "-"] for p in procs],
                        ["PID", "CLIENT PID", "VRAM", "OVERHEAD", "CALLS", "KERNELS", "THROTTLED", "WAITING",
                         "STARTED"]))


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
        if self.emit(v):
            return
        if v.get("done", True):
            print(f"vGPU {v['id']} is {tiers(v)}")
        else:
            print(f"vGPU {v['id']}: asked, but its processes have not all acted within {TIER_WAIT} s (one may be "
                  f"in a long call); it is {tiers(v)}")


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
