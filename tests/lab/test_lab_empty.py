"""A `jupyter lab` without a vGPU (no GPULAB_* in its environment): the panel says so with the
server's own sentence, and the status bar carries no vGPU item."""
from __future__ import annotations

import os

import pytest

from labtools import PANEL_TAB, Lab

from playwright.sync_api import expect  # noqa: E402  (conftest skipped the module without Playwright)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    env.pop("LD_LIBRARY_PATH", None)
    lab = Lab(tmp_path_factory.mktemp("lab"), env)
    yield lab
    lab.stop()


def test_no_vgpu_empty_state_and_no_status_item(browser, lab):
    answer = lab.get("gpulab/api/vgpus")
    assert answer["configured"] is False and answer["message"], answer
    ctx = browser.new_context()
    page = ctx.new_page()
    page.set_default_timeout(60000)
    try:
        page.goto(lab.page_url("lab"))
        page.click(PANEL_TAB, timeout=120000)
        empty = page.locator("[data-testid=gpulab-empty]")
        expect(empty).to_contain_text("No vGPU on this server", timeout=30000)
        expect(page.locator("[data-testid=gpulab-empty-message]")).to_have_text(answer["message"])
        assert page.is_hidden("[data-testid=gpulab-gpu]") and page.is_hidden("[data-testid=gpulab-error]")
        # the status bar is up, without a vGPU item
        expect(page.locator("#jp-main-statusbar")).to_be_visible()
        assert page.is_hidden("[data-testid=gpulab-status]")
    finally:
        ctx.close()
