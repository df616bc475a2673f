"""The vGPU panel in a real browser: Debian's Chromium against a real `jupyter lab` whose server has a
vGPU on a real emulated worker; a notebook's kernel allocates through the shim, the panel frees its
GPU memory while the kernel lives on, and the next cell gets its bytes back.

One worker, one lab and one page for the module: the steps build on each other, in file order."""
from __future__ import annotations

import json
import os
import re
import time

import pytest

from labtools import PANEL_TAB, Lab, artifacts, copy_to_docs, notebook
from workertools import Worker

from playwright.sync_api import expect  # noqa: E402  (conftest skipped the module without Playwright)

QUOTA = 512 << 20
MiB = 1 << 20

ALLOCATE = """\
import numpy as np
from cuda.bindings import driver as d

def ok(res):
    assert res[0] == d.CUresult.CUDA_SUCCESS, res[0].name
    return res[1] if len(res) == 2 else None

ok(d.cuInit(0))
ctx = ok(d.cuCtxCreate(None, 0, ok(d.cuDeviceGet(0))))
data = np.random.default_rng(11).integers(0, 256, 64 << 20, dtype=np.uint8)
ptr = ok(d.cuMemAlloc(data.nbytes))
ok(d.cuMemcpyHtoD(ptr, data, data.nbytes))
print("allocated", data.nbytes >> 20, "MiB")"""

READ_BACK = """\
back = np.zeros_like(data)
ok(d.cuMemcpyDtoH(back, ptr, data.nbytes))
print("bytes match:", bool((back == data).all()))"""

TRIVIAL = 'print("alive", 6 * 7)'

# Records every text the progress line shows, however briefly (an emulated offload takes well under a second).
WATCH_PROGRESS = """() => {
  const el = document.querySelector('[data-testid=gpulab-action]');
  window.gpulabProgress = [];
  new MutationObserver(() => { if (!el.hidden) window.gpulabProgress.push(el.textContent); })
    .observe(el, {childList: true, characterData: true, subtree: true, attributes: true});
}"""


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
    w = Worker(tmp_path_factory.mktemp("worker"), token="lab-session-token", extra=["--vram-quota", "512M"])
    yield w
    w.stop()


@pytest.fixture(scope="module")
def lab(tmp_path_factory, worker):
    base = {k: v for k, v in os.environ.items() if not k.startswith("GPULAB_")}
    env = worker.env()  # the shim first on LD_LIBRARY_PATH, GPULAB_WORKER and GPULAB_TOKEN, as the spawner sets
    env = {**base, **{k: v for k, v in env.items() if k.startswith("GPULAB_") or k == "LD_LIBRARY_PATH"},
           "GPULAB_CONTROL_URL": worker.control}
    tmp = tmp_path_factory.mktemp("lab")
    lab = Lab(tmp, env)
    notebook(lab.root / "panel.ipynb", [ALLOCATE, READ_BACK, TRIVIAL])
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def page(browser, lab):
    ctx = browser.new_context(viewport={"width": 1400, "height": 900})
    pg = ctx.new_page()
    pg.set_default_timeout(60000)
    pg.goto(lab.page_url("lab/tree/panel.ipynb"))
    pg.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120000)
    yield pg
    ctx.close()


def status(page):
    return page.locator("[data-testid=gpulab-status]")


def panel(page):
    return page.locator("[data-testid=gpulab-panel]")


def vram(page) -> dict:
    """What the VRAM chart last drew, from its data attribute."""
    last = page.get_attribute("[data-testid=gpulab-vram-chart]", "data-last")
    return json.loads(last) if last else {}


def wait_vram(page, condition: str, timeout=30000) -> dict:
    """Waits until the chart's last sample satisfies a JS condition on `v` (hot, warm, cold, quota)."""
    page.wait_for_function(
        "() => { const a = document.querySelector('[data-testid=gpulab-vram-chart]')?.getAttribute('data-last');"
        f" if (!a) return false; const v = JSON.parse(a); return {condition}; }}", timeout=timeout)
    return vram(page)


# Counts the execute requests the page sends its kernel (from the kernel connection's own signal, whatever
# kernel the notebook is connected to now or later); installed once per page.
WATCH_SENT = """() => {
  if (window.gpulabSent !== undefined) return;
  window.gpulabSent = [];
  const nb = notebookPanel();
  const hook = () => {
    const kernel = nb.sessionContext.session?.kernel;
    if (!kernel || kernel.gpulabWatched) return;
    kernel.gpulabWatched = true;
    kernel.anyMessage.connect((_, m) => {
      if (m.direction === 'send' && m.msg.header.msg_type === 'execute_request') window.gpulabSent.push(m.msg.content.code);
    });
  };
  hook();
  nb.sessionContext.kernelChanged.connect(hook);
}"""

# The notebook panel of the page (window.jupyterapp: labtools starts the lab with expose_app_in_browser).
NOTEBOOK_PANEL = """window.notebookPanel = () => {
  const shell = window.jupyterapp.shell;
  return [shell.currentWidget, ...shell.widgets('main')].find(w => w && w.sessionContext && w.content?.widgets);
};"""

# Whether the page took the cell's run: an execute request went to the kernel since `sent`, or the cell's
# model says it runs or has run (its execution count is no longer `count`).
ACCEPTED = """([index, sent, count]) => {
  const model = notebookPanel().content.widgets[index].model;
  return window.gpulabSent.length > sent || model.executionState === 'running' || model.executionCount !== count;
}"""


def run_cell(page, index: int, expected: str, timeout=120000) -> str:
    """Runs one cell and waits for this run's output (its prompt gets a new number). Shift+Enter right
    after the page connects to a new kernel can be dropped (the prompt stays as it was), so it is
    pressed again then, but only when the page did not take the first press: no execute request went
    to the kernel and the cell's model neither runs nor has a new count (a slow page's prompt may show
    "[*]:" late; a second press would run the cell twice)."""
    cell = page.locator(".jp-Notebook .jp-Cell").nth(index)
    prompt = cell.locator(".jp-InputPrompt")
    page.evaluate(NOTEBOOK_PANEL)
    page.evaluate(WATCH_SENT)
    before = prompt.inner_text().strip()
    sent = page.evaluate("() => window.gpulabSent.length")
    count = page.evaluate(f"() => notebookPanel().content.widgets[{index}].model.executionCount")
    for attempt in range(3):
        cell.locator(".jp-InputArea-editor").click()
        page.keyboard.press("Shift+Enter")
        try:
            expect(prompt).not_to_have_text(before, timeout=10000)
            break
        except AssertionError:
            if page.evaluate(ACCEPTED, [index, sent, count]) or prompt.inner_text().strip() != before:
                break  # taken, only slow to show: never run a cell twice
            if attempt == 2:
                raise
    finished = re.compile(r"^\[\d+\]:$")
    expect(prompt).to_have_text(finished, timeout=timeout)
    out = cell.locator(".jp-OutputArea-output")
    expect(out).to_contain_text(expected)
    assert page.evaluate("() => window.gpulabSent.length") <= sent + 1, "the cell ran twice"
    return out.inner_text()


def kernels(lab) -> list[str]:
    return [k["id"] for k in lab.get("api/kernels")]


def test_status_bar_shows_the_quota_and_opens_the_panel(page):
    expect(status(page)).to_have_text(re.compile(r"^vGPU 0 / 512 MiB"), timeout=30000)
    status(page).click()
    expect(panel(page)).to_be_visible()
    expect(page.locator("[data-testid=gpulab-gpu]")).to_have_text("gpulab emulated vGPU (test double, no GPU)")
    expect(page.locator("[data-testid=gpulab-profile]")).to_have_text("worker configuration")
    assert re.fullmatch(r"127\.0\.0\.1:\d+", page.inner_text("[data-testid=gpulab-worker]"))
    assert page.is_hidden("[data-testid=gpulab-empty]")
    assert vram(page)["quota"] == QUOTA


def test_polls_at_the_refresh_interval_of_the_settings(page):
    """labtools sets refreshInterval to 1 s: five or six polls in six seconds (the default 5 s: at most 2)."""
    polls = []
    listen = lambda r: polls.append(r.status) if r.url.split("?")[0].endswith("/gpulab/api/vgpus") else None  # noqa: E731
    page.on("response", listen)
    page.wait_for_timeout(6000)
    page.remove_listener("response", listen)
    assert 5 <= len(polls) <= 8 and set(polls) == {200}, polls


def test_old_figures_say_when_they_are_from(page):
    """The server's answer is rewritten on its way to the page: fresh, the tier stands alone; an hour
    old (more than two refresh intervals), "as of <its time>" stands beside it; fresh again, gone."""
    asof = page.locator("[data-testid=gpulab-asof]")
    vgpus = re.compile(r"/gpulab/api/vgpus(\?[^/]*)?$")
    age = {"seconds": 0.0}

    def answer(route):
        response = route.fetch()
        body = response.json()
        body["time"] = time.time() - age["seconds"]
        route.fulfill(response=response, json=body)

    page.route(vgpus, answer)
    try:
        page.wait_for_timeout(2500)  # a poll or two with the rewritten time
        expect(asof).to_be_hidden()
        age["seconds"] = 3600
        expect(asof).to_be_visible(timeout=10000)
        expect(asof).to_have_text(re.compile(r"^as of \d{1,2}:\d{2}:\d{2}"))
        assert "as of" not in page.inner_text("[data-testid=gpulab-tier]")  # beside the tier, not in it
        age["seconds"] = 0
        expect(asof).to_be_hidden(timeout=10000)
    finally:
        page.unroute(vgpus, answer)


def widen_sidebar(page, width: int = 420) -> None:
    """Drags the handle between the notebook and the right sidebar until the sidebar is `width` px wide."""
    box = page.locator("#jp-right-stack").bounding_box()
    handle = page.evaluate("""(left) => {
      const handles = [...document.querySelectorAll('#jp-main-split-panel > .lm-SplitPanel-handle')]
        .filter(h => !h.classList.contains('lm-mod-hidden')).map(h => h.getBoundingClientRect());
      handles.sort((a, b) => Math.abs(a.right - left) - Math.abs(b.right - left));
      const h = handles[0];
      return {x: h.left + h.width / 2, y: h.top + h.height / 2};
    }""", box["x"])
    page.mouse.move(handle["x"], handle["y"])
    page.mouse.down()
    page.mouse.move(handle["x"] - (width - box["width"]), handle["y"], steps=8)
    page.mouse.up()
    page.wait_for_timeout(300)
    assert abs(page.locator("#jp-right-stack").bounding_box()["width"] - width) < 30


def test_cell_allocates_and_the_chart_rises(page, lab):
    run_cell(page, 0, "allocated 64 MiB")
    v = wait_vram(page, f"v.hot >= {64 * MiB}")
    assert v["warm"] == 0 and v["cold"] == 0, v
    expect(page.locator("[data-testid=gpulab-tier]")).to_have_text("hot")
    expect(status(page)).to_have_text(re.compile(r"^vGPU \d+(\.\d)? / 512 MiB · hot$"))
    used = float(status(page).inner_text().split()[1])
    assert used >= 64, status(page).inner_text()
    # per-notebook usage: the kernel's row names the notebook and its memory
    row = page.locator("[data-testid=gpulab-kernel]", has_text="panel.ipynb")
    expect(row).to_contain_text("MiB", timeout=30000)
    # the recent CUDA calls name the allocation and the copy
    expect(page.locator("[data-testid=gpulab-trace]")).to_contain_text("cuMemAlloc", timeout=30000)
    expect(page.locator("[data-testid=gpulab-trace]")).to_contain_text("cuMemcpyHtoD")


def test_free_gpu_memory_keeps_the_kernel(page, lab):
    before = kernels(lab)
    page.evaluate(WATCH_PROGRESS)
    page.click("[data-testid=gpulab-offload-warm]")
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text("Free GPU memory (keep kernel)")
    expect(dialog).to_contain_text("Your kernels keep running")
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
    outcome = page.locator("[data-testid=gpulab-action-outcome]")
    expect(outcome).to_be_visible(timeout=60000)
    assert outcome.get_attribute("data-state") == "done", outcome.inner_text()
    progress = page.evaluate("window.gpulabProgress")
    assert progress and all(p.startswith("Freeing GPU memory…") for p in progress), progress
    assert re.search(r"\d\.\d s · hot .* · warm .* · cold ", progress[0]), progress
    expect(page.locator("[data-testid=gpulab-tier]")).to_have_text("warm", timeout=30000)
    v = wait_vram(page, f"v.warm >= {64 * MiB} && v.hot === 0")
    assert v["cold"] == 0, v
    assert json.loads(page.get_attribute("[data-testid=gpulab-vram-chart]", "data-peak"))["hot"] >= 64 * MiB
    expect(status(page)).to_have_text(re.compile(r"· warm$"))
    # the kernel lives on: same kernel, a plain cell runs, and the memory stays off the GPU meanwhile
    run_cell(page, 2, "alive 42")
    expect(page.locator(".jp-Notebook-ExecutionIndicator")).to_have_attribute("data-status", "idle")
    assert kernels(lab) == before
    assert page.inner_text("[data-testid=gpulab-tier]") == "warm"


def test_next_cell_gets_its_bytes_back(page, lab):
    run_cell(page, 1, "bytes match: True")
    expect(page.locator("[data-testid=gpulab-tier]")).to_have_text("hot", timeout=30000)
    v = wait_vram(page, f"v.hot >= {64 * MiB} && v.warm === 0")
    assert v["cold"] == 0, v
    widen_sidebar(page)  # readable figures and tables: the sidebar's default width cuts them
    page.wait_for_timeout(1500)  # a poll at the new width: the charts redraw to fill it
    shot = artifacts() / "vgpu-panel-light.png"
    panel(page).screenshot(path=str(shot))
    copy_to_docs(shot)


def act(page, testid: str, title: str) -> str:
    """Clicks a tier button, confirms, and returns the outcome sentence once the action ended."""
    page.click(f"[data-testid={testid}]")
    dialog = page.locator(".jp-Dialog")
    expect(dialog).to_contain_text(title)
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()
    outcome = page.locator("[data-testid=gpulab-action-outcome]")
    expect(outcome).to_have_attribute("data-state", re.compile("done|failed"), timeout=60000)
    assert outcome.get_attribute("data-state") == "done", outcome.inner_text()
    return outcome.inner_text()


def test_cancel_moves_nothing_then_disk_and_restore(page):
    page.click("[data-testid=gpulab-offload-cold]")
    page.locator(".jp-Dialog .jp-Dialog-button.jp-mod-reject").click()
    expect(page.locator(".jp-Dialog")).to_have_count(0)
    page.wait_for_timeout(1500)  # more than a refresh: a move would show by now
    assert page.inner_text("[data-testid=gpulab-tier]") == "hot"
    act(page, "gpulab-offload-cold", "Move to disk")
    expect(page.locator("[data-testid=gpulab-tier]")).to_have_text("cold", timeout=30000)
    v = wait_vram(page, f"v.cold >= {64 * MiB} && v.hot === 0 && v.warm === 0")
    assert v["quota"] == QUOTA
    expect(page.locator("[data-testid=gpulab-restore]")).to_be_enabled()
    act(page, "gpulab-restore", "Restore")
    expect(page.locator("[data-testid=gpulab-tier]")).to_have_text("hot", timeout=30000)
    wait_vram(page, f"v.hot >= {64 * MiB} && v.cold === 0")
    run_cell(page, 1, "bytes match: True")  # still the same bytes after the round trip through the disk


def test_dark_theme(page, lab):
    lab.theme("JupyterLab Dark")
    dark = page.context.new_page()  # a reload of the first would stop at the notebook's "leave page?"
    try:
        dark.goto(lab.page_url("lab/workspaces/dark"))  # a workspace of its own: no clash with the first page's
        dark.wait_for_selector("body[data-jp-theme-name='JupyterLab Dark']", state="attached", timeout=60000)
        if not dark.locator("[data-testid=gpulab-panel]").is_visible():
            dark.click(PANEL_TAB)
        wait_vram(dark, f"v.hot >= {64 * MiB}")
        ground = dark.evaluate("getComputedStyle(document.querySelector('[data-testid=gpulab-panel]')).backgroundColor")
        text = dark.evaluate("getComputedStyle(document.querySelector('[data-testid=gpulab-tier]')).color")
        assert brightness(ground) < 100 < brightness(text), (ground, text)  # dark ground, light text
        widen_sidebar(dark)
        dark.locator("[data-testid=gpulab-panel]").screenshot(path=str(artifacts() / "vgpu-panel-dark.png"))
    finally:
        dark.close()
        lab.theme("JupyterLab Light")


def test_unreachable_worker_is_said_in_a_sentence(page, worker):
    worker.stop()
    error = page.locator("[data-testid=gpulab-error]")
    expect(error).to_be_visible(timeout=30000)
    assert "cannot reach the vGPU's worker" in error.inner_text(), error.inner_text()


def brightness(css: str) -> float:
    r, g, b = (int(x) for x in re.findall(r"\d+", css)[:3])
    return 0.299 * r + 0.587 * g + 0.114 * b
