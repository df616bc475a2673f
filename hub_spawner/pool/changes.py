"""Which workers' rows changed, as PostgreSQL tells this replica (LISTEN on the channel that revision 0005's
trigger notifies), so that the usual heartbeat is answered from what the replica knows with no read of the
worker's row first: the read was a round trip per heartbeat, 200 a second at 1,000 workers, each one the
pool's event loop waited for.

Notices are delivered after their transaction commits, so an answer may miss a change another replica
committed a moment before (sub-millisecond here); the worker then hears of it at its next heartbeat. A notice
that never comes (a connection pooler in transaction mode, where LISTEN does not reach this replica) is
bounded all the same: a worker's last_seen is written every write_every seconds only if its version is the
one known (AllocationBook._write_seen), else the heartbeat reads the database.
"""
from __future__ import annotations

import logging
import select
import time

from .db import close_quietly, own_connection

log = logging.getLogger("gpulab.pool")

CHANNEL = "gpulab_workers"


class WorkerChanges:
    """A connection of its own that listens for the trigger's notices; ``moved()`` drains what arrived
    without waiting (libpq's sockets never block)."""

    def __init__(self, engine, retry_after: float = 1.0):
        self.engine = engine
        self.retry_after = retry_after  # after a failure, seconds before the next try to listen
        self.epoch = 0  # moves on each time listening (re)starts: what was known before may be old
        self._fairy = None
        self._failed_at = float("-inf")
        self._ended = ""  # the server's sentence when it ended the listening connection

    def moved(self) -> dict[str, int] | None:
        """{worker: its version now, or -1 when whatever was known of it is old} for the notices that
        arrived since the last call; None when this replica is not listening (yet, or its connection
        broke and the retry is not due): the caller reads the database instead."""
        if self._fairy is None and not self._listen():
            return None
        try:
            pgconn = self._fairy.dbapi_connection.pgconn
            pgconn.consume_input()
            out: dict[str, int] = {}
            while (notice := pgconn.notifies()) is not None:
                name, _, version = notice.extra.decode().rpartition(" ")
                out[name] = -1 if out.get(name, 0) == -1 else int(version)
            # a server that ends the connection (terminated, shutting down) says so before it closes the
            # socket, and libpq reads the close only at a later call: notices after it would be missed
            if self._ended:
                raise ConnectionError(self._ended)
            return out
        except Exception as exc:  # the server went or the connection broke: nothing known can be vouched for
            log.warning("stopped listening for changes to workers (%s): heartbeats read the database until "
                        "listening again", exc)
            self.close()
            self._failed_at = time.monotonic()
            return None

    def wait(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for a notice to arrive (True), for a caller that must see a change
        just committed elsewhere (tests); False when none came or this replica is not listening."""
        if self._fairy is None:
            return False
        pgconn = self._fairy.dbapi_connection.pgconn
        return bool(select.select([pgconn.socket], [], [], timeout)[0])

    def _listen(self) -> bool:
        if time.monotonic() - self._failed_at < self.retry_after:
            return False
        fairy = None
        try:
            fairy = own_connection(self.engine)
            fairy.dbapi_connection.execute(f"LISTEN {CHANNEL}")
            fairy.dbapi_connection.add_notice_handler(self._noticed)
        except Exception as exc:
            log.warning("could not listen for changes to workers (%s): heartbeats read the database", exc)
            self._failed_at = time.monotonic()
            close_quietly(fairy)  # a connection that opened but could not listen
            return False
        self._fairy, self._ended = fairy, ""
        self.epoch += 1
        return True

    def _noticed(self, diagnostic) -> None:
        """What the server says on the listening connection outside a query: FATAL or PANIC, it is ending
        the connection."""
        if diagnostic.severity_nonlocalized in ("FATAL", "PANIC"):
            self._ended = diagnostic.message_primary or "the server ended the connection"

    def close(self) -> None:
        fairy, self._fairy = self._fairy, None
        close_quietly(fairy)
