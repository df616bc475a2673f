"""The admin dashboard: GPUs, workers, sessions and GPU-hours per user (JupyterHub OAuth); per GPU its
VRAM by vGPU and its last hour, per vGPU its usage, processes and last calls (panels.py).

It is rendered from ``templates/dashboard.html``, which extends JupyterHub's own ``page.html``
(found in the hub's installed templates), so the pool looks like the hub: the same navbar,
styles and scripts, served by the hub under ``<hub prefix>static/``.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import jinja2
from jupyterhub._data import DATA_FILES_PATH
from jupyterhub.services.auth import HubOAuthenticated
from jupyterhub.utils import url_path_join
from sqlalchemy import select
from tornado import web
from tornado.httputil import responses

from .db import Allocation, Worker
from .panels import gpu_facts, history_chart, vgpu_rows, vram_bar

TEMPLATES = Path(__file__).parent / "templates"
GIB = 2**30


def environment() -> jinja2.Environment:
    """Our templates first, then the hub's (page.html, error.html)."""
    loader = jinja2.ChoiceLoader([jinja2.FileSystemLoader(str(TEMPLATES)),
                                  jinja2.FileSystemLoader(os.path.join(DATA_FILES_PATH, "templates"))])
    return jinja2.Environment(loader=loader, autoescape=True)


def page_namespace(user: dict, hub_prefix: str, service_prefix: str, xsrf_token: str = "") -> dict:
    """The variables JupyterHub's page.html reads, for a user the hub's OAuth told us about.

    Links point at the hub (``base_url`` is the hub's prefix, as on the hub's own pages); the
    Services menu lists this service only, as the pool cannot see the hub's other services."""
    scopes = set(user.get("scopes", []))
    if user.get("admin"):
        scopes.add("admin-ui")

    def static_url(path: str, include_version: bool = True) -> str:
        return url_path_join(hub_prefix, "static", path)

    return {
        "base_url": hub_prefix, "prefix": hub_prefix[: -len("hub/")] if hub_prefix.endswith("hub/") else "/",
        "static_url": static_url, "logo_url": "", "version_hash": "",
        "user": {"name": user["name"], "json_escaped_name": json.dumps(user["name"])[1:-1]},
        "admin_access": bool(user.get("admin")), "no_spawner_check": True, "parsed_scopes": scopes,
        "services": [{"name": "gpulab-pool", "href": service_prefix}],
        "login_url": url_path_join(hub_prefix, "login"), "logout_url": url_path_join(hub_prefix, "logout"),
        "xsrf_token": xsrf_token, "announcement": "",
    }


def dashboard_rows(gpus: list[dict], workers, sessions, usage: list[dict]) -> dict:
    """Table rows as the page shows them; an emulated device is said to be so once per row."""
    return {
        "gpus": [{**g, "vram": f"{g['used_vram'] / GIB:.1f} / {g['memory'] / GIB:.1f} GiB",
                  "compute": f"{g['used_compute']}%",
                  # the emulated backend's model name already says so; another device gets a badge
                  "emulated_badge": g["emulated"] and "emulated" not in g["model"].lower()} for g in gpus],
        "workers": [{"name": w.name, "address": w.address, "node": w.node, "backend": w.backend,
                     "status": w.status, "last_seen": time.strftime("%H:%M:%S", time.localtime(w.last_seen))}
                    for w in workers],
        "sessions": [{"id": a.id, "user": a.user, "server": a.server_name or "(default)", "profile": a.profile,
                      "worker": a.worker_name, "quota": f"{a.vram / GIB:.1f} GiB",
                      "in_use": f"{a.used_vram / 2**20:.0f} MiB", "compute": f"{a.compute}%", "status": a.status,
                      "message": a.message, "tier": "hot (no tiering yet)"} for a in sessions],
        "usage": [{**u, "gpu_hours": f"{u['gpu_hours']:.3f}"} for u in usage],
    }


def dashboard_panels(gpus: list[dict], sessions, live, now: float) -> dict:
    """Per GPU its VRAM bar, last-hour chart and latest facts; per active vGPU its panel.  An emulated
    GPU says so in its heading (the emulated backend's model name already does)."""
    active = [a for a in sessions if a.status == "active"]
    panels = []
    for g in gpus:
        facts = live.gpu(g["uuid"]) if live else None
        emulated = g["emulated"] or bool(facts and facts.get("emulated"))
        total = (facts or {}).get("memory_total") or g["memory"]
        panels.append({"uuid": g["uuid"], "worker": g["worker"], "model": g["model"],
                       "emulated_badge": emulated and "emulated" not in g["model"].lower(),
                       "bar": vram_bar(g, [a for a in active if g["uuid"] in a.gpu_list], live),
                       "chart": history_chart(live.history(g["uuid"]) if live else [], total, now),
                       "facts": gpu_facts(facts)})
    return {"panels": panels,
            "vgpus": [vgpu_rows(a, live.vgpu(a.token_hash) if live else None) for a in active]}


class DashboardHandler(HubOAuthenticated, web.RequestHandler):
    """The admin dashboard: GPUs, workers, sessions, GPU-hours per user."""

    _env: jinja2.Environment | None = None

    def render_page(self, name: str, user: dict, **values) -> str:
        if DashboardHandler._env is None:
            DashboardHandler._env = environment()
        ns = page_namespace(user, self.hub_auth.hub_prefix, self.settings["pool"].prefix,
                            self.xsrf_token.decode("ascii"))
        return DashboardHandler._env.get_template(name).render(**ns, **values)

    @web.authenticated
    def get(self):
        user = self.get_current_user()
        pool = self.settings["pool"]
        if not (user.get("admin") or user["name"] in pool.admin_users):
            raise web.HTTPError(403, "The GPU pool dashboard is for hub admins.")
        gpus = pool.book.gpu_table()
        with pool.book.Session() as db:
            workers = list(db.scalars(select(Worker).order_by(Worker.name)))
            sessions = list(db.scalars(select(Allocation).where(Allocation.status != "released")
                                       .order_by(Allocation.id)))
        self.finish(self.render_page("dashboard.html", user,
                                     **dashboard_rows(gpus, workers, sessions, pool.book.usage_table()),
                                     **dashboard_panels(gpus, sessions, pool.live, time.time())))

    def write_error(self, status_code, **kwargs):
        """Errors of a signed-in user look like the hub's own error page."""
        try:
            user = self.get_current_user()
        except Exception:  # an error while authenticating: no page of the hub to show
            user = None
        exc = kwargs.get("exc_info", (None, None))[1]
        if not user:
            return super().write_error(status_code, **kwargs)
        self.finish(self.render_page("error.html", user, status_code=status_code,
                                     status_message=responses.get(status_code, "Error"),
                                     message=getattr(exc, "log_message", None) or ""))
