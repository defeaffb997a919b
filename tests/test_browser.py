"""The α explorer where people use it: a real JupyterLab in headless Chromium, driven by Playwright.

The test starts JupyterLab on 127.0.0.1 (free port, token, its own temporary root and config folders), opens
``tests/browser/alpha_explorer.ipynb`` (a copy), runs it, and checks that the explorer rendered (4 α sliders,
the three buttons, the readout). It then clicks *binary step* and *one-shot step* and moves a slider, and after
each action compares what the page shows (α, H, the steepest task, ∂H/∂α) with what ``alpha_readout``,
``binary_step`` and ``one_shot_step`` compute in this process on a bit-identical model and bank
(``tests/browser/explorer_state.py``). Screenshots go to ``tests/browser/screenshots/`` (ignored by git).

Needs Debian's ``chromium`` (``make test`` and ``.ci/run`` install it as root); skipped, with the reason,
only when it is missing. No browser is downloaded: Playwright drives ``/usr/bin/chromium``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

from supsup_lite.notebook.widgets import alpha_readout, binary_step, effective_alphas, one_shot_step

try:
    from playwright.sync_api import Page, sync_playwright
except ImportError as err:  # a [dev] extra like pytest itself: missing means a broken setup, not a skip
    raise ImportError("tests/test_browser.py needs playwright (a [dev] extra): pip install -e '.[dev]'") from err

BROWSER_DIR = Path(__file__).resolve().parent / "browser"
SCREENSHOTS = BROWSER_DIR / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic", "--disable-dev-shm-usage"]
SERVER_START_S = 90  # bounded waits: JupyterLab start-up, one UI step (kernel round trip included), shutdown
STEP_S = 60
SHUTDOWN_S = 20

pytestmark = pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no browser: {CHROMIUM} is missing (install "
                                "Debian's chromium as root: apt-get install -y chromium; make test does)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def api(url: str, token: str, method: str = "GET") -> int:
    request = urllib.request.Request(url, method=method, headers={"Authorization": f"token {token}"})
    with urllib.request.urlopen(request, timeout=5) as response:
        return response.status


@pytest.fixture
def jupyterlab(tmp_path):
    """A JupyterLab server on 127.0.0.1 serving a temporary root that holds a copy of the test notebook;
    yields its base URL and token; shut down (kernels included) at teardown."""
    root = tmp_path / "root"
    root.mkdir()
    shutil.copy(BROWSER_DIR / "alpha_explorer.ipynb", root)
    port, token = free_port(), secrets.token_hex(16)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(BROWSER_DIR), os.environ.get("PYTHONPATH")])),
               SUPSUP_DEVICE="cpu", OMP_NUM_THREADS="1", IPYTHONDIR=str(tmp_path / "ipython"),
               **{name: str(tmp_path / name.lower()) for name in
                  ["JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTERLAB_SETTINGS_DIR",
                   "JUPYTERLAB_WORKSPACES_DIR"]})
    env.pop("MPLBACKEND", None)
    # User settings: start the notebook's kernel without asking, fetch no news (no pop-up on the screenshots).
    for name, settings in [("notebook-extension/tracker", {"autoStartDefaultKernel": True}),
                           ("apputils-extension/notification", {"fetchNews": "false", "checkForUpdates": False})]:
        path = Path(env["JUPYTERLAB_SETTINGS_DIR"], "@jupyterlab", f"{name}.jupyterlab-settings")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(settings))
    log = (tmp_path / "jupyterlab.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
         "--ServerApp.allow_root=True", "--LabApp.news_url=None",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + SERVER_START_S
    while True:
        try:
            if api(f"{url}/api/status", token) == 200:
                break
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"JupyterLab did not start within {SERVER_START_S} s (exit code {server.poll()}):\n"
                        + (tmp_path / "jupyterlab.log").read_text()[-3000:])
        time.sleep(0.5)
    try:
        yield url, token
    finally:
        try:
            api(f"{url}/api/shutdown", token, method="POST")  # stops the kernels, then the server
            server.wait(timeout=SHUTDOWN_S)
        except (urllib.error.URLError, OSError, subprocess.TimeoutExpired):
            server.terminate()
            try:
                server.wait(timeout=SHUTDOWN_S)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
        log.close()


def status_text(page: Page) -> str:
    return page.locator(".widget-html-content", has_text="steepest descent").inner_text()


def grad_text(page: Page) -> str:
    return page.locator(".widget-html-content", has_text="∂H/∂α").inner_text()


def shown(page: Page) -> dict:
    """The numbers on the page: α (2 decimals), H (3 decimals), the steepest task, ∂H/∂α (4 decimals)."""
    status = status_text(page)
    entropy = re.search(r"H = ([0-9.]+) nats", status)
    steepest = re.search(r"steepest descent: task (\d+)", status)
    alphas = re.search(r"α = \[([^\]]*)\]", status)
    assert entropy and steepest and alphas, f"unexpected readout: {status!r}"
    grad = re.findall(r"([+-]\d+\.\d{4})", grad_text(page).split("∂H/∂α", 1)[1])
    return {"alphas": [float(a) for a in alphas.group(1).split(",")], "entropy": float(entropy.group(1)),
            "steepest": int(steepest.group(1)), "grad": [float(g) for g in grad]}


def assert_shows(page: Page, expected, what: str) -> None:
    """The page shows ``expected`` (an AlphaReadout) to its display precision."""
    numbers = shown(page)
    assert numbers["alphas"] == [round(a, 2) for a in expected.alphas.tolist()], what
    assert numbers["entropy"] == pytest.approx(expected.entropy, abs=5e-4 + 1e-6), what
    assert numbers["steepest"] == expected.steepest, what
    assert numbers["grad"] == pytest.approx(expected.grad.tolist(), abs=5e-5 + 1e-6), what


def wait_for_change(page: Page, before: str) -> None:
    """Wait (bounded) until the readout differs from ``before``: the kernel has answered the front-end."""
    deadline = time.monotonic() + STEP_S
    while status_text(page) == before:
        assert time.monotonic() < deadline, f"the readout did not change within {STEP_S} s: {before!r}"
        page.wait_for_timeout(100)


def explorer_state():
    """tests/browser/explorer_state.py, the module the notebook's kernel imports."""
    spec = importlib.util.spec_from_file_location("explorer_state", BROWSER_DIR / "explorer_state.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_alpha_explorer_in_jupyterlab(jupyterlab, tmp_path):
    state_module = explorer_state()
    TASKS, IMAGE_TASK, IMAGE_INDEX = state_module.TASKS, state_module.IMAGE_TASK, state_module.IMAGE_INDEX
    model, bank, stream = state_module.build()
    x = stream.test_set(IMAGE_TASK)[0][IMAGE_INDEX:IMAGE_INDEX + 1]

    def expected(raw: list[float]):
        return alpha_readout(model, bank, x, effective_alphas(raw, normalise=True))

    def act_and_check(page, action, raw: list[float], what: str, screenshot: str):
        """Do ``action`` on the page, wait for the kernel's answer, and check the page shows the readout of the
        sliders ``raw`` that the action must produce; returns (raw, the expected state)."""
        before = status_text(page)
        action()
        wait_for_change(page, before)
        state = expected(raw)
        assert_shows(page, state, what)
        page.screenshot(path=str(SCREENSHOTS / screenshot))
        return raw, state

    url, token = jupyterlab
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 900})
        context.set_default_timeout(STEP_S * 1000)
        page = context.pages[0] if context.pages else context.new_page()
        try:
            page.goto(f"{url}/lab/tree/alpha_explorer.ipynb?token={token}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            page.get_by_text("Python 3 (ipykernel) | Idle").wait_for(timeout=SERVER_START_S * 1000)
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()

            # Rendered: one slider per task, the three buttons, the readout and the ∂H/∂α bars.
            page.locator(".widget-button", has_text="one-shot step").wait_for(timeout=SERVER_START_S * 1000)
            sliders = page.locator(".widget-hslider")
            assert sliders.count() == TASKS
            for label in ["one-shot step", "binary step", "uniform α"]:
                assert page.locator(".widget-button", has_text=label).is_visible()
            assert page.locator(".widget-checkbox", has_text="normalise").is_visible()
            raw = [1.0 / TASKS] * TASKS
            state = expected(raw)
            assert_shows(page, state, "initial uniform α")
            page.screenshot(path=str(SCREENSHOTS / "1_uniform.png"))

            # binary step: keep the ⌈k/2⌉ tasks with the smallest ∂H/∂α.
            halved = [round(a, 2) for a in binary_step(state.alphas, state.grad).tolist()]
            assert sum(a > 0 for a in halved) == TASKS // 2
            raw, state = act_and_check(page, page.locator(".widget-button", has_text="binary step").click,
                                       halved, "after binary step", "2_binary_step.png")

            # one-shot step: all weight on argmin ∂H/∂α.
            corner = one_shot_step(state.grad).tolist()
            raw, state = act_and_check(page, page.locator(".widget-button", has_text="one-shot step").click,
                                       corner, "after one-shot step", "3_one_shot_step.png")

            # Move another task's slider to its maximum with the keyboard.
            moved = (int(torch.tensor(raw).argmax()) + 1) % TASKS
            raised = [1.0 if t == moved else a for t, a in enumerate(raw)]
            raw, state = act_and_check(page, lambda: sliders.nth(moved).locator(".noUi-handle").first.press("End"),
                                       raised, f"after moving α{moved} to 1", "4_slider_moved.png")
            assert sliders.nth(moved).locator(".widget-readout").inner_text().strip() == "1.00"
        except BaseException:
            page.screenshot(path=str(SCREENSHOTS / "failure.png"))
            raise
        finally:
            context.close()
