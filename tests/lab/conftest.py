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


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keeps each phase's report on the test item, for `shot_on_failure`."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(autouse=True)
def shot_on_failure(request):
    """A failed test leaves a screenshot of the module's page and the lab's log in the artifacts."""
    yield
    report = getattr(request.node, "rep_call", None)
    if report is None or not report.failed or "page" not in request.fixturenames:
        return
    from labtools import artifacts

    name = request.node.name
    try:
        request.getfixturevalue("page").screenshot(path=str(artifacts() / f"{name}-failed.png"))
    except Exception as exc:  # a crashed page: the log still says why
        (artifacts() / f"{name}-failed.txt").write_text(f"no screenshot: {exc}\n")
    lab = request.getfixturevalue("lab")
    (artifacts() / f"{name}-lab.log").write_text(lab.log_text()[-20000:])
