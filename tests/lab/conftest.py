"""Debian's Chromium through Playwright, one per test module; the front end must be built
(`make build` builds it and installs it for this venv's JupyterLab)."""
import pytest

from labtools import CHROMIUM, CHROMIUM_ARGS, built

playwright_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def browser():
    if not built():
        pytest.fail("the JupyterLab front end is not installed for this venv: run `make build` "
                    "(it builds labextension/ into server_extension/labextension and links it)")
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()
