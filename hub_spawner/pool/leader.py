"""Which pool replica does the periodic work: a lease in the pool database.

Several replicas serve the API on one database at once (placement is safe under the database's
locks), but the heartbeat checker and the Kubernetes pod watch must run in one of them only.  The
replica holding the lease is the leader.  Within ``period`` seconds of the leader's death another
replica holds it: the leader renews every quarter period, each renewal valid for half a period, and
the others try every quarter period.  A leader that could not renew in time stops acting as one
when its last renewal runs out, before any other replica can take the lease.  Times are the
database's clock, so the replicas' clocks need not agree.
"""
from __future__ import annotations

import logging
import time

from sqlalchemy import text, update
from sqlalchemy.exc import IntegrityError

from .db import Lease

log = logging.getLogger("gpulab.pool")

LEADER = "pool-leader"


def database_now(db) -> float:
    """Seconds since the epoch by the database server's clock (SQLite: this host's)."""
    if db.get_bind().dialect.name == "postgresql":
        return float(db.execute(text("SELECT extract(epoch FROM clock_timestamp())")).scalar())
    return time.time()


class LeaderLease:
    """This replica's hold on the lease ``name`` in the database of ``Session``."""

    def __init__(self, Session, holder: str, period: float, name: str = LEADER):
        self.Session, self.holder, self.period, self.name = Session, holder, period, name
        self._valid_until = 0.0  # time.monotonic() until which this replica may act as the leader
        self._unreachable = False  # the database failed the last try: said once per outage

    @property
    def interval(self) -> float:
        """Seconds between two calls of hold()."""
        return self.period / 4

    @property
    def leader(self) -> bool:
        return time.monotonic() < self._valid_until

    def hold(self) -> bool:
        """Take the lease if it is free or ran out, renew it if it is ours; whether we lead now."""
        started = time.monotonic()
        term = self.period / 2
        try:
            with self.Session.begin() as db:
                now = database_now(db)
                row = db.get(Lease, self.name, with_for_update=True)
                if row is None:
                    db.add(Lease(name=self.name, holder=self.holder, expires=now + term, acquired=now))
                    previous = ""
                elif row.holder == self.holder or row.expires < now:
                    previous = row.holder
                    if row.holder != self.holder:
                        row.holder, row.acquired = self.holder, now
                    row.expires = now + term
                else:
                    self._valid_until = 0.0
                    return False
        except IntegrityError:  # another replica created the lease at the same moment: it leads
            self._valid_until = 0.0
            return False
        except Exception as exc:  # the database is out of reach: nobody can be sure to lead
            if not self._unreachable:
                log.error("could not %s the pool's leader lease: %s", "renew" if self.leader else "check", exc)
            self._unreachable, self._valid_until = True, 0.0
            return False
        self._unreachable = False
        if previous != self.holder:
            log.info("this replica (%s) leads the pool now%s", self.holder,
                     f", after {previous}, whose lease ran out" if previous else "")
        self._valid_until = started + term
        return True

    def give_up(self) -> None:
        """At a clean stop: let another replica lead at once instead of after the lease runs out."""
        if not self.leader:
            return
        self._valid_until = 0.0
        try:
            with self.Session.begin() as db:
                db.execute(update(Lease).where(Lease.name == self.name, Lease.holder == self.holder)
                           .values(expires=0.0))
            log.info("this replica (%s) gave up leading the pool", self.holder)
        except Exception as exc:
            log.warning("could not give up the pool's leader lease (another replica takes it when it runs "
                        "out): %s", exc)
