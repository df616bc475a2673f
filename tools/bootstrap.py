#!/usr/bin/env python3
"""What a machine lacks for `make demo`, `make test` or `make validate-gpu`, and installing it.

Runs with the system python3 before any virtual environment exists, so it uses the standard
library only. The Makefile calls it on every `make demo`/`make test` (the probe takes a few
milliseconds): a piece removed after the first run is noticed and installed again, which a make
stamp alone would hide.

The decision is a pure function, `decide(facts, needs)`, so each situation can be tested
without touching the machine. Each missing system package is installed with its own apt-get
command: one command naming `gcc chromium nodejs npm` together failed outright where Node.js
came from NodeSource, whose `nodejs` package ships npm and conflicts with Debian's `npm`.
After each step the machine is probed again and the plan re-decided, so a `nodejs` that
brings its own npm is never followed by Debian's npm.

    python3 tools/bootstrap.py --for test --venv .venv            # install what is missing
    python3 tools/bootstrap.py --for test --dry-run                 # only print the plan
    python3 tools/bootstrap.py --dry-run --facts '{"npm": false}'   # plan for simulated facts
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# What each make goal needs. Node.js runs the proxy; npm builds the JupyterLab front end
# (tools/build_labextension.py, `make labextension`) and installs the proxy. The GPU goals build
# no front end and start no hub, so the device machine needs neither.
NEEDS = {
    "demo": frozenset({"cc", "venv", "node", "npm", "proxy"}),
    "test": frozenset({"cc", "venv", "node", "npm", "proxy", "chromium", "prometheus", "postgresql"}),
    "gpu": frozenset({"cc", "venv"}),
}

PROXY = "configurable-http-proxy"
CHROMIUM = "/usr/bin/chromium"  # the tests drive this path (Playwright cannot download a browser here)
APT_INSTALL = ["apt-get", "install", "-y", "--no-install-recommends"]
# Packages whose maintainer scripts start a system service we only want as a program (the tests run
# Prometheus and PostgreSQL themselves, on free ports): installed under a policy-rc.d that forbids starting it,
# unless the machine already has a policy-rc.d (Debian's container images do).
NO_SERVICE = frozenset({"prometheus", "postgresql"})
NO_START = ('p=/usr/sbin/policy-rc.d; [ -e "$p" ] && exec "$@"; '
            'printf "#!/bin/sh\\nexit 101\\n" > "$p" && chmod 755 "$p" && trap \'rm -f "$p"\' EXIT; "$@"')
# What runs after such an install, should a machine's own policy-rc.d have let the service start anyway:
# Debian's postgresql makes a cluster 'main' on port 5432, which must not be left running.
AFTER_INSTALL = {
    "postgresql": 'pg_lsclusters -h 2>/dev/null | while read -r version name port state rest; do '
                  '[ "$state" != online ] || pg_ctlcluster "$version" "$name" stop || exit 1; done',
}
POSTGRES_BINARIES = "/usr/lib/postgresql/*/bin"  # Debian's, one directory per major version


@dataclass(frozen=True)
class Facts:
    """What the machine has, as far as set-up cares. `probe()` reads them; tests make them up."""

    root: bool = True
    sudo: bool = False  # a sudo command, for a user who is not root
    apt: bool = True  # apt-get (Debian, Ubuntu); elsewhere we can only say what to install
    cc: bool = True  # a C compiler (`cc`, or $CC) for the shim
    libc_headers: bool = True  # gcc installed without recommends lacks libc6-dev
    chromium: bool = True
    prometheus: bool = True  # Debian's prometheus package: the prometheus and promtool programs
    postgresql: bool = True  # Debian's postgresql package: initdb and pg_ctl under POSTGRES_BINARIES
    node: bool = True
    npm: bool = True
    node_path: str = "/usr/bin/node"
    node_package: str | None = "nodejs"  # the dpkg package that owns node, None if none does
    node_provides: tuple = ()  # that package's Provides; NodeSource's nodejs provides npm
    proxy: bool = True  # configurable-http-proxy in the venv or on PATH
    venv: bool = True  # the project's virtual environment exists
    venv_module: bool = True  # python3 can create one (Debian splits ensurepip into python3-venv)
    apt_updated: bool = False  # `apt-get update` already ran in this set-up


@dataclass(frozen=True)
class Step:
    """One action: `apt-update`, `apt-install` (arg: package), `venv` (arg: dir), `proxy` (arg: venv)."""

    kind: str
    arg: str = ""
    why: str = ""


@dataclass
class Plan:
    steps: list = field(default_factory=list)
    problems: list = field(default_factory=list)  # sentences for a person: what we could not do


def decide(f: Facts, needs: frozenset, venv: str = ".venv") -> Plan:
    """The steps that give a machine with facts `f` everything in `needs`, in order, and the
    problems (in words) where we cannot act: not root without sudo, no apt-get, or a Node.js
    whose npm is missing but cannot come from Debian."""
    apt: list[tuple[str, str]] = []  # (package, why), each installed on its own
    problems: list[str] = []
    if "cc" in needs:
        if not f.cc:
            apt.append(("gcc", "a C compiler for the shim"))
        if not f.libc_headers:
            apt.append(("libc6-dev", "the C library headers the shim includes"))
    if "venv" in needs and not f.venv and not f.venv_module:
        apt.append(("python3-venv", "python3 -m venv, for the project's virtual environment"))
    if "chromium" in needs and not f.chromium:
        apt.append(("chromium", "Debian's Chromium, the browser the browser tests drive"))
    if "prometheus" in needs and not f.prometheus:
        apt.append(("prometheus", "Debian's Prometheus and promtool, which the metrics tests run (its service "
                                  "is not started)"))
    if "postgresql" in needs and not f.postgresql:
        apt.append(("postgresql", "Debian's PostgreSQL server programs, which the pool's tests start on a port of "
                                  "their own (its cluster is not started)"))
    if "node" in needs and not f.node:
        apt.append(("nodejs", "Node.js, which runs configurable-http-proxy and builds the JupyterLab front end"))
    npm_ok = True
    if ("npm" in needs or ("proxy" in needs and not f.proxy)) and not f.npm:
        if not f.node:
            # Debian's nodejs ships no npm. Should the nodejs apt picks bring its own npm
            # (NodeSource's does), the re-probe after installing it drops this step.
            apt.append(("npm", "npm, to build the JupyterLab front end and install configurable-http-proxy "
                               "(unless nodejs brought it)"))
        elif "npm" in f.node_provides:
            npm_ok = False
            problems.append(
                f"Node.js at {f.node_path} comes from the package {f.node_package}, which provides npm itself "
                f"(Debian's npm conflicts with it), but npm is not on PATH: reinstall that package "
                f"(apt-get install --reinstall {f.node_package}) or put its npm on PATH.")
        elif f.node_package == "nodejs":
            apt.append(("npm", "npm, to build the JupyterLab front end and install configurable-http-proxy "
                               "(Debian's nodejs ships none)"))
        else:
            npm_ok = False
            problems.append(
                f"Node.js at {f.node_path} is not from a Debian package and has no npm beside it: install the "
                f"npm that belongs to it (Debian's npm would bring a second Node.js); npm builds the JupyterLab "
                f"front end and installs {PROXY}.")

    steps: list[Step] = []
    apt_blocked = set()
    if apt:
        names = ", ".join(f"{pkg} ({why})" for pkg, why in apt)
        if not f.apt:
            problems.append(f"This machine has no apt-get; install these yourself: {names}.")
            apt_blocked = {pkg for pkg, _ in apt}
        elif not f.root and not f.sudo:
            commands = "; ".join(" ".join([*APT_INSTALL, pkg]) for pkg, _ in apt)
            problems.append(
                f"gpulab set-up needs system packages it cannot install (not root, and no sudo): {names}. "
                f"As root, run: apt-get update; {commands}")
            apt_blocked = {pkg for pkg, _ in apt}
        else:
            if not f.apt_updated:
                steps.append(Step("apt-update", why="fresh package lists before the first install"))
            steps += [Step("apt-install", pkg, why) for pkg, why in apt]

    if "venv" in needs and not f.venv:
        if "python3-venv" in apt_blocked:
            problems.append(f"The virtual environment {venv} cannot be created until python3-venv is installed.")
        else:
            steps.append(Step("venv", venv, "the project's virtual environment, for its Python packages"))
    if "proxy" in needs and not f.proxy:
        if npm_ok and not ({"npm", "nodejs"} & apt_blocked):
            steps.append(Step("proxy", venv, f"{PROXY}, which JupyterHub starts (into the venv: nothing global)"))
        elif npm_ok:
            problems.append(f"{PROXY} cannot be installed until Node.js and npm are.")
    return Plan(steps, problems)


def command(step: Step, root: bool = True, python: str = sys.executable) -> list[str]:
    """The argv that carries out `step`; apt-get through sudo when not root."""
    sudo = [] if root else ["sudo"]
    if step.kind == "apt-update":
        return [*sudo, "apt-get", "update"]
    if step.kind == "apt-install":
        no_start = ["sh", "-c", NO_START, "no-service"] if step.arg in NO_SERVICE else []
        after = ["sh", "-c", f'"$@" && {{ {AFTER_INSTALL[step.arg]}; }}', "after-install"] \
            if step.arg in AFTER_INSTALL else []
        return [*sudo, "env", "DEBIAN_FRONTEND=noninteractive", *no_start, *after, *APT_INSTALL, step.arg]
    if step.kind == "venv":
        return [python, "-m", "venv", step.arg]
    if step.kind == "proxy":
        # -g --prefix VENV puts the proxy in VENV/bin, which the Makefile puts first on PATH.
        return ["npm", "install", "-g", "--prefix", step.arg, "--no-fund", "--no-audit", "--loglevel=error", PROXY]
    raise ValueError(f"unknown step {step.kind!r}")


# ------------------------------------------------------------------------------------ probing


def _dpkg(*args: str) -> str | None:
    if not shutil.which("dpkg-query"):
        return None
    r = subprocess.run(["dpkg-query", *args], capture_output=True, text=True)
    return r.stdout if r.returncode == 0 else None


def probe(venv: str) -> Facts:
    """The facts of this machine. Cheap (a few `which` and, only when npm is missing, dpkg-query),
    because the Makefile runs it on every `make test`."""
    vbin = Path(venv) / "bin"
    cc = shutil.which((os.environ.get("CC") or "cc").split()[0])
    node = shutil.which("node")
    npm = shutil.which("npm")
    node_package, provides = None, ()
    if node and not npm:  # only then does it matter who ships node
        owner = _dpkg("-S", os.path.realpath(node)) or _dpkg("-S", node)
        if owner:
            node_package = owner.split(":")[0].strip()
            fields = _dpkg("-W", "-f=${Provides}", node_package) or ""
            provides = tuple(p.strip().split(" ")[0] for p in fields.split(",") if p.strip())
    try:
        import ensurepip  # noqa: F401  (Debian's python3 lacks it without python3-venv)
        venv_module = True
    except ImportError:
        venv_module = False
    return Facts(
        root=os.geteuid() == 0,
        sudo=shutil.which("sudo") is not None,
        apt=shutil.which("apt-get") is not None,
        cc=cc is not None,
        libc_headers=Path("/usr/include/stdio.h").exists(),
        chromium=Path(CHROMIUM).exists(),
        prometheus=all(shutil.which(p) for p in ("prometheus", "promtool")),
        postgresql=any(all(os.access(Path(d) / p, os.X_OK) for p in ("initdb", "pg_ctl"))
                       for d in glob.glob(POSTGRES_BINARIES)),
        node=node is not None,
        npm=npm is not None,
        node_path=node or "",
        node_package=node_package,
        node_provides=provides,
        proxy=(vbin / PROXY).exists() or shutil.which(PROXY) is not None,
        venv=(vbin / "python").exists(),
        venv_module=venv_module,
    )


def describe(plan: Plan, root: bool) -> str:
    lines = [f"  {shlex.join(command(s, root))}    # {s.why}" for s in plan.steps]
    lines += [f"  cannot: {p}" for p in plan.problems]
    return "\n".join(lines) if lines else "  nothing to do"


def _execute(step: Step, facts: Facts, venv: str) -> int:
    env = dict(os.environ, PATH=f"{Path(venv) / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    return subprocess.run(command(step, facts.root), env=env).returncode


def bootstrap(needs: frozenset, venv: str, probe=probe, execute=_execute) -> int:
    """Install what is missing, one step at a time, probing and deciding again after each: what
    one step brought (npm with NodeSource's nodejs) is then never installed a second time."""
    updated, done = False, set()
    while True:
        facts = dataclasses.replace(probe(venv), apt_updated=updated)
        plan = decide(facts, needs, venv)
        if not plan.steps:
            break
        step = plan.steps[0]
        argv = shlex.join(command(step, facts.root))
        if step in done:
            print(f"gpulab set-up: `{argv}` ran, but {step.arg or step.kind} is still missing.", file=sys.stderr)
            return 1
        print(f"gpulab set-up: {step.why}: {argv}", flush=True)
        rc = execute(step, facts, venv)
        if rc != 0:
            print(f"gpulab set-up: `{argv}` failed (exit {rc}).", file=sys.stderr)
            return 1
        done.add(step)
        updated = updated or step.kind == "apt-update"
    for p in plan.problems:
        print(f"gpulab set-up: {p}", file=sys.stderr)
    return 1 if plan.problems else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--for", dest="goal", choices=sorted(NEEDS), default="test", help="the make goal to set up")
    ap.add_argument("--venv", default=os.environ.get("VIRTUAL_ENV") or ".venv", help="the project's venv")
    ap.add_argument("--dry-run", action="store_true", help="print the facts and the plan; change nothing")
    ap.add_argument("--facts", help="JSON object overriding probed facts, to see the plan for another machine")
    args = ap.parse_args(argv)
    if args.facts and not args.dry_run:
        ap.error("--facts describes another machine: use it with --dry-run")
    overrides = json.loads(args.facts) if args.facts else {}
    if "node_provides" in overrides:
        overrides["node_provides"] = tuple(overrides["node_provides"])
    venv = os.path.abspath(args.venv)
    if args.dry_run:
        facts = dataclasses.replace(probe(venv), **overrides)
        plan = decide(facts, NEEDS[args.goal], venv)
        print(f"facts: {json.dumps(dataclasses.asdict(facts))}")
        print(f"plan for `make {'validate-gpu' if args.goal == 'gpu' else args.goal}`:")
        print(describe(plan, facts.root))
        return 0
    return bootstrap(NEEDS[args.goal], venv)


if __name__ == "__main__":
    sys.exit(main())
