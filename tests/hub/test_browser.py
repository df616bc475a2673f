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


class Hog:
    """Books GPU capacity straight from the pool (as another user's server would) for one test."""

    def __init__(self, hub, vram: str, compute: int):
        self.hub = hub
        status, self.alloc = hub.pool("POST", "api/allocations", {"user": "hog", "vram": vram, "compute": compute})
        assert status == 201, self.alloc

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.hub.pool("DELETE", f"api/allocations/{self.alloc['id']}")


def start_button(page):
    return page.locator("#spawn_form button[type=submit]")


@pytest.mark.parametrize("hog, sentence", [
    (("15G", 10), "No GPU has 2 GiB of free memory right now (the most free is 1 GiB). "
                  "Pick a smaller memory option or try again later."),
    (("1G", 100), "All GPUs' compute is promised: your profile needs 25% and the most free is 0%. "
                  "Pick a profile with a smaller compute share or try again later."),
], ids=["memory", "compute"])
def test_spawn_error_names_what_is_short(page, hub, hog, sentence):
    login(page, hub, "bob")
    profiles = open_form(page, hub)
    assert "available now" in profiles["small"]
    with Hog(hub, *hog):  # the GPU fills up between showing the form and pressing Start
        page.click("#spawn_form button[type=submit]")
        page.wait_for_selector(f"text={sentence}", timeout=60000)
        text = page.inner_text("body")
        assert "SpawnException(" not in text and "reason=" not in text, text
        assert hub.allocations("bob") == []


def test_full_profile_is_not_preselected_and_cannot_be_started(page, hub):
    login(page, hub, "bob")
    with Hog(hub, "15G", 10):  # 1 GiB left: Small's default 2 GiB and Half's 8 GiB do not fit, Small's 1 GiB does
        profiles = open_form(page, hub)
        assert "1 available now with GPU memory 1 GiB" in profiles["small"] and "Full" not in profiles["small"]
        assert "Full: no GPU has 8 GiB of free memory" in profiles["half"]
        assert page.is_checked("input[name=profile][value=small]")  # the default, with the choice that fits
        assert page.input_value("select[name='profile-option-small--vram']") == "1g"
        assert start_button(page).is_enabled()
        page.select_option("select[name='profile-option-small--vram']", "2g")
        assert start_button(page).is_disabled()
        assert "Small vGPU, GPU memory 2 GiB: no GPU has 2 GiB of free memory" in page.inner_text(".gpulab-start-why")
        page.select_option("select[name='profile-option-small--vram']", "1g")
        assert start_button(page).is_enabled() and not page.is_visible(".gpulab-start-why")
        page.check("input[name=profile][value=half]")
        assert start_button(page).is_disabled()
        with Hog(hub, "768M", 10):  # 0.25 GiB left: no GPU profile fits, CPU only is preselected
            profiles = open_form(page, hub)
            assert "Full: no GPU has 2 GiB of free memory right now" in profiles["small"]
            assert page.is_checked("input[name=profile][value=cpu]")
            assert not page.is_checked("input[name=profile][value=small]")
            assert start_button(page).is_enabled()
            page.check("input[name=profile][value=small]")
            assert start_button(page).is_disabled()


def test_admin_dashboard_lists_gpus_workers_sessions(page, hub):
    login(page, hub, "admin", hub.admin_password)
    page.goto(f"{hub.url}/services/gpulab-pool/")
    page.wait_for_selector("h1:has-text('gpulab GPU pool')")
    # the hub's page: its navbar and its styles, served by the hub
    assert page.is_visible("nav.navbar #jupyterhub-logo")
    assert page.get_attribute("nav.navbar a.nav-link:has-text('Home')", "href") == "/hub/home"
    assert page.evaluate("getComputedStyle(document.querySelector('nav.navbar')).display") == "flex"
    assert "No sessions: no server holds a vGPU right now." in page.inner_text("body")
    rows = [r.inner_text() for r in page.query_selector_all(".gpulab-gpus tbody tr")]
    assert rows and all(r.lower().count("emulated") == 1 for r in rows), rows
    status, _ = hub.api("POST", "users/carol/server", {"profile": "half"})
    assert status in (201, 202)
    hub.wait_ready("carol")
    try:
        page.reload()
        text = page.inner_text("body")
        assert "(test double)" in text and "No sessions" not in text
        assert re.search(r"carol\s+\(default\)\s+half\s+local\s+8\.0 GiB\s+\d+ MiB\s+50%\s+active", text), text
        assert "GPU-hours per user" in text
    finally:
        hub.api("DELETE", "users/carol/server")
        hub.wait_stopped("carol")


def test_dashboard_is_for_admins_only(page, hub):
    login(page, hub, "bob")
    resp = page.goto(f"{hub.url}/services/gpulab-pool/")
    assert resp.status == 403


def test_lab_status_bar_shows_the_quota_through_the_hub(page, hub):
    """The vGPU front end under the hub's base URL: its API calls go to /user/<name>/gpulab/api/ (from
    the page's settings, not the site root) and the status bar shows the server's quota."""
    login(page, hub, "bob")
    calls = []
    page.on("response", lambda r: calls.append((r.url.split("?")[0], r.status)) if "/gpulab/api/" in r.url else None)
    status, _ = hub.api("POST", "users/bob/server", {"profile": "small"})
    assert status in (201, 202)
    try:
        hub.wait_ready("bob")
        [alloc] = hub.allocations("bob")
        gib = alloc["vram"] / (1 << 30)
        quota = f"{gib:g} GiB" if gib >= 1 else f"{alloc['vram'] >> 20} MiB"
        page.goto(f"{hub.url}/user/bob/lab")
        item = page.locator("[data-testid=gpulab-status]")
        playwright_api.expect(item).to_have_text(re.compile(rf"^vGPU 0 / {re.escape(quota)}"), timeout=120000)
        assert (f"{hub.url}/user/bob/gpulab/api/vgpus", 200) in calls, calls
        assert not any(url.startswith(f"{hub.url}/gpulab/") for url, _ in calls), calls
    finally:
        hub.api("DELETE", "users/bob/server")
        hub.wait_stopped("bob")
