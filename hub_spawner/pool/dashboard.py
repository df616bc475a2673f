"""The admin dashboard: GPUs, workers, sessions and GPU-hours per user (JupyterHub OAuth)."""
from __future__ import annotations

import html
import time

from jupyterhub.services.auth import HubOAuthenticated
from sqlalchemy import select
from tornado import web

from .db import Allocation, Worker


class DashboardHandler(HubOAuthenticated, web.RequestHandler):
    """The admin dashboard: GPUs, workers, sessions, GPU-hours per user."""

    @web.authenticated
    def get(self):
        user = self.get_current_user()
        pool = self.settings["pool"]
        if not (user.get("admin") or user["name"] in pool.admin_users):
            raise web.HTTPError(403, "the GPU pool dashboard is for hub admins")
        gpus = pool.book.gpu_table()
        with pool.book.Session() as db:
            workers = list(db.scalars(select(Worker).order_by(Worker.name)))
            sessions = list(db.scalars(select(Allocation).where(Allocation.status != "released")
                                       .order_by(Allocation.id)))
        self.finish(render_dashboard(gpus, workers, sessions, pool.book.usage_table()))


def _table(headers, rows) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def render_dashboard(gpus, workers, sessions, usage) -> str:
    gib = 2**30
    gpu_rows = [(g["worker"], g["model"] + (" (EMULATED test double)" if g["emulated"] else ""), g["capability"],
                 f"{g['used_vram'] / gib:.1f} / {g['memory'] / gib:.1f} GiB", f"{g['used_compute']}%",
                 g["sessions"], g["worker_status"]) for g in gpus]
    worker_rows = [(w.name, w.address, w.node, w.backend + (" (test double)" if w.backend == "emulated" else ""),
                    w.status, time.strftime("%H:%M:%S", time.localtime(w.last_seen))) for w in workers]
    session_rows = [(a.id, a.user, a.server_name or "(default)", a.profile, a.worker_name,
                     f"{a.vram / gib:.1f} GiB", f"{a.used_vram / 2**20:.0f} MiB", f"{a.compute}%", a.status,
                     "hot (no tiering yet)") for a in sessions]
    usage_rows = [(u["user"], f"{u['gpu_hours']:.3f}", u["active"]) for u in usage]
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>gpulab GPU pool</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse;margin-bottom:2em}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:left}}</style></head><body>
<h1>gpulab GPU pool</h1>
<h2>GPUs</h2>{_table(["worker", "model", "compute capability", "VRAM promised", "compute promised", "sessions",
                      "status"], gpu_rows)}
<h2>Workers</h2>{_table(["name", "address", "node", "backend", "status", "last heartbeat"], worker_rows)}
<h2>Sessions</h2>{_table(["id", "user", "server", "profile", "worker", "quota", "VRAM in use", "compute", "status",
                          "tier"],
                         session_rows)}
<h2>GPU-hours per user</h2>{_table(["user", "GPU-hours", "active vGPUs"], usage_rows)}
</body></html>"""
