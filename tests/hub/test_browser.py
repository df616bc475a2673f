"""The whole path in a real browser: Debian's Chromium driven by Playwright against a real hub."""
from __future__ import annotations

import re

import pytest

from hubtools import API_TOKEN
from kernel_client import run_in_kernel

playwright_api = pytest.importorskip("playwright.sync_api")

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    ctx = browser.new_context()
    pg = ctx.new_page()
    pg.set_default_timeout(60000)
    yield pg
    ctx.close()


def login(page, hub, user, password="gpulab-demo"):
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", password)
    page.click("#login_submit")
    page.wait_for_load_state()


def open_form(page, hub):
    page.goto(f"{hub.url}/hub/spawn")
    page.wait_for_selector(".gpulab-profiles")
    return {el.get_attribute("data-slug"): el.inner_text() for el in page.query_selector_all(".gpulab-profile")}


def test_pick_a_profile_start_use_and_stop(page, hub):
    login(page, hub, "alice")
    profiles = open_form(page, hub)
    assert set(profiles) == {"small", "half", "full", "cpu"}
    assert re.search(r"\d+ available now", profiles["small"]) and "EMULATED" not in profiles["small"]
    assert "no GPU" in profiles["cpu"] and "available" not in profiles["cpu"]
    assert "EMULATED" in page.inner_text(".gpulab-emulated")
    page.check("input[name=profile][value=small]")
    page.select_option("select[name='profile-option-small--vram']", "1g")
    page.click("#spawn_form button[type=submit], #spawn_form input[type=submit]")
    page.wait_for_url(re.compile(r".*/user/alice/lab.*"), timeout=120000)
    page.wait_for_selector("#jp-main-dock-panel", timeout=120000)  # JupyterLab is up
    [alloc] = hub.allocations("alice")
    assert alloc["vram"] == 1 << 30 and alloc["profile"] == "small"
    out = run_in_kernel(hub.url, "alice", API_TOKEN, "from cuda.bindings import driver as d\n"
                        "d.cuInit(0); e, c = d.cuDevicePrimaryCtxRetain(0); d.cuCtxSetCurrent(c)\n"
                        "print(d.cuMemGetInfo()[2])")
    assert int(out.strip()) == 1 << 30, out
    page.goto(f"{hub.url}/hub/home")
    page.click("#stop")
    page.wait_for_selector("#start", timeout=60000)
    hub.wait_stopped("alice")
    assert hub.allocations("alice") == []


def test_user_outside_the_group_does_not_see_its_profile(page, hub):
    login(page, hub, "bob")
    assert set(open_form(page, hub)) == {"small", "half", "cpu"}


def test_full_pool_shows_the_503_message(page, hub):
    status, _ = hub.api("POST", "users/alice/server", {"profile": "full"})
    assert status in (201, 202)
    hub.wait_ready("alice")
    try:
        login(page, hub, "bob")
        profiles = open_form(page, hub)
        assert "Full: all GPUs are busy" in profiles["small"]
        page.check("input[name=profile][value=small]")
        page.click("#spawn_form button[type=submit], #spawn_form input[type=submit]")
        page.wait_for_selector("text=No GPU is free", timeout=60000)
        assert hub.allocations("bob") == []
    finally:
        hub.api("DELETE", "users/alice/server")
        hub.wait_stopped("alice")


def test_admin_dashboard_lists_gpus_workers_sessions(page, hub):
    status, _ = hub.api("POST", "users/carol/server", {"profile": "half"})
    assert status in (201, 202)
    hub.wait_ready("carol")
    try:
        login(page, hub, "admin", hub.admin_password)
        page.goto(f"{hub.url}/services/gpulab-pool/")
        page.wait_for_selector("h1:has-text('gpulab GPU pool')")
        text = page.inner_text("body")
        assert "EMULATED test double" in text and "(test double)" in text
        assert re.search(r"carol\s+\(default\)\s+half\s+local\s+8\.0 GiB\s+\d+ MiB\s+50%\s+active", text), text
        assert "GPU-hours per user" in text
    finally:
        hub.api("DELETE", "users/carol/server")
        hub.wait_stopped("carol")


def test_dashboard_is_for_admins_only(page, hub):
    login(page, hub, "bob")
    resp = page.goto(f"{hub.url}/services/gpulab-pool/")
    assert resp.status == 403
