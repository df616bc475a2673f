#!/usr/bin/env python3
"""A real PostgreSQL server in a temporary directory, for the tests and the benchmarks.

The pool runs on PostgreSQL in production; the tests and benchmarks/pool_scale.py need one that
nobody else uses and that leaves nothing behind: Debian's binaries (the `postgresql` package,
which tools/bootstrap.py installs for `make test`) run from a directory of our own, listening on
127.0.0.1 only, on a free port, with the Unix socket in that directory and trust authentication
(only this machine's loopback can reach it). Standard library only: it is imported without pytest.

    with TemporaryPostgres(settings={"fsync": "off"}) as pg:   # fsync off: tests need no durability
        url = pg.create_database("pool_test_1")                # postgresql+psycopg://gpulab@127.0.0.1:PORT/pool_test_1

    python3 tools/postgres_server.py     # start one, print its URL, stop it on Ctrl-C

PostgreSQL refuses to run as root: as root, the server's programs run as Debian's `postgres`
user and the directory is handed to it.
"""
from __future__ import annotations

import argparse
import atexit
import glob
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

DEBIAN_BINARIES = "/usr/lib/postgresql/*/bin"  # Debian installs each major version's programs here
MISSING = ("Debian's postgresql package is not installed: run `make test` (tools/bootstrap.py installs it)"
           " or `apt-get install postgresql`; no initdb and pg_ctl under /usr/lib/postgresql/*/bin or on PATH.")
RUN_AS = "postgres"  # the account Debian's package makes, which owns the server when we are root
NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")  # database and role names we create: no quoting needed


class PostgresMissing(RuntimeError):
    """The server's programs are not on this machine."""


def find_binaries() -> Path:
    """The directory with initdb and pg_ctl: the newest Debian version, else the one on PATH."""
    def version(d: str):
        v = Path(d).parent.name
        return (0, int(v)) if v.isdigit() else (-1, 0)

    for d in sorted(glob.glob(DEBIAN_BINARIES), key=version, reverse=True):
        if all(os.access(Path(d) / p, os.X_OK) for p in ("initdb", "pg_ctl")):
            return Path(d)
    pg_ctl = shutil.which("pg_ctl")
    if pg_ctl and os.access(Path(pg_ctl).resolve().parent / "initdb", os.X_OK):
        return Path(pg_ctl).resolve().parent
    raise PostgresMissing(MISSING)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TemporaryPostgres:
    """One PostgreSQL server of our own: `start()` (or `with`) makes and starts it, `url` is its first
    database, `create_database(name)` makes another, `stop()` stops it and removes its directory.

    `settings` are postgresql.conf settings added to ours (e.g. ``{"fsync": "off"}``); the defaults
    are PostgreSQL's own, durable ones. `timeout` bounds each start and stop, in seconds."""

    def __init__(self, user: str = "gpulab", database: str = "gpulab", settings: dict | None = None,
                 timeout: float = 60.0):
        for name in (user, database):
            if not NAME.fullmatch(name):
                raise ValueError(f"{name!r} is not a plain PostgreSQL name (lower case letters, digits, _)")
        self.user, self.database, self.timeout = user, database, timeout
        self.settings = dict(settings or {})
        self.port = 0
        self.dir: Path | None = None
        self.bin: Path | None = None
        self._owner = None  # (uid, gid) the server runs as when we are root

    # ------------------------------------------------------------------ life cycle

    def start(self) -> "TemporaryPostgres":
        if self.dir is not None:
            raise RuntimeError(f"this PostgreSQL server already runs in {self.dir}")
        self.bin = find_binaries()
        self.dir = Path(tempfile.mkdtemp(prefix="gpulab-postgres-"))
        atexit.register(self.stop)  # a test run that ends without stopping it leaves no server behind
        try:
            if os.geteuid() == 0:
                import pwd

                try:
                    entry = pwd.getpwnam(RUN_AS)
                except KeyError:
                    raise PostgresMissing(f"PostgreSQL refuses to run as root and this machine has no "
                                          f"'{RUN_AS}' user (Debian's postgresql package makes it).") from None
                self._owner = (entry.pw_uid, entry.pw_gid)
                os.chown(self.dir, *self._owner)
            self._initdb()
            self._start_on_a_free_port()
            self._create(self.database)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast: open connections are ended) and remove its directory. Idempotent."""
        if self.dir is None:
            return
        data = self.dir / "data"
        if (data / "postmaster.pid").exists():
            r = self._run("pg_ctl", "stop", "-D", str(data), "-m", "fast", "-w", "-t", str(int(self.timeout)),
                          check=False)
            if r.returncode != 0:  # stuck: end the server's processes, the postmaster first
                self._kill_postmaster(data)
        shutil.rmtree(self.dir, ignore_errors=True)
        self.dir = None
        atexit.unregister(self.stop)

    def __enter__(self) -> "TemporaryPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ databases

    @property
    def url(self) -> str:
        """The SQLAlchemy URL of the first database (psycopg 3)."""
        return self.url_of(self.database)

    def url_of(self, database: str) -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new, empty database `name` on this server; its URL."""
        if not NAME.fullmatch(name):
            raise ValueError(f"{name!r} is not a plain PostgreSQL name (lower case letters, digits, _)")
        self._create(name)
        return self.url_of(name)

    def log_text(self) -> str:
        """What the server wrote to its log (for a failure's message)."""
        try:
            return (self.dir / "server.log").read_text(errors="replace")
        except (OSError, TypeError):
            return ""

    # ------------------------------------------------------------------ the programs

    def _run(self, program: str, *args: str, check=True) -> subprocess.CompletedProcess:
        owner = {} if self._owner is None else {"user": self._owner[0], "group": self._owner[1], "extra_groups": []}
        env = dict(os.environ, LC_ALL="C", PGTZ="UTC")
        if self._owner is not None:
            env["HOME"] = str(self.dir)
        r = subprocess.run([str(self.bin / program), *args], cwd=self.dir, env=env, capture_output=True,
                           text=True, timeout=self.timeout + 30, **owner)
        if check and r.returncode != 0:
            raise RuntimeError(f"PostgreSQL's {program} failed (exit {r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-2000:]}\n{self.log_text()[-2000:]}")
        return r

    def _initdb(self) -> None:
        # initdb syncs its files unless the caller has said durability does not matter
        no_sync = ["--no-sync"] if str(self.settings.get("fsync", "on")).lower() in ("off", "false", "0") else []
        self._run("initdb", "-D", str(self.dir / "data"), "-U", self.user, "--auth=trust", "--encoding=UTF8",
                  "--no-locale", *no_sync)
        ours = {"listen_addresses": "127.0.0.1", "unix_socket_directories": str(self.dir),
                "max_connections": 200, **self.settings}
        with open(self.dir / "data" / "postgresql.conf", "a") as conf:  # later lines win
            conf.write("\n# tools/postgres_server.py\n")
            for key, value in ours.items():
                conf.write(f"{key} = '{value}'\n" if isinstance(value, str) else f"{key} = {value}\n")

    def _start_on_a_free_port(self) -> None:
        """pg_ctl start -w on a free port; another program may take the port between our look and the
        server's bind, so a failed start is tried again on another port."""
        for attempt in range(3):
            self.port = free_port()
            r = self._run("pg_ctl", "start", "-D", str(self.dir / "data"), "-l", str(self.dir / "server.log"),
                          "-w", "-t", str(int(self.timeout)), "-o", f"-p {self.port}", check=False)
            if r.returncode == 0:
                return
            if "could not bind" not in self.log_text() or attempt == 2:
                raise RuntimeError(f"PostgreSQL did not start (pg_ctl exit {r.returncode}): "
                                   f"{(r.stderr or r.stdout).strip()}\n{self.log_text()[-3000:]}")

    def _create(self, name: str) -> None:
        self._run("createdb", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, name)

    @staticmethod
    def _kill_postmaster(data: Path) -> None:
        try:
            pid = int((data / "postmaster.pid").read_text().split()[0])
            os.kill(pid, signal.SIGQUIT)  # immediate shutdown: its children end with it
        except (OSError, ValueError, IndexError):
            pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--no-fsync", action="store_true", help="fsync off: faster, not durable")
    args = ap.parse_args(argv)
    try:
        pg = TemporaryPostgres(settings={"fsync": "off"} if args.no_fsync else None).start()
    except PostgresMissing as exc:
        print(exc, file=sys.stderr)
        return 1
    print(pg.url, flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        signal.pause()
    except (KeyboardInterrupt, SystemExit):
        pass
    finally:
        pg.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
