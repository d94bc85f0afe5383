"""A real ComfyUI server (with or without this pack) and a headless Chromium driving its frontend.

Used by the frontend tests: ``from tests.comfyui.browser import chromium_browser, frontend, server  # noqa: F401``
gives a test module the ``server`` (URL of a ComfyUI with the pack), ``chromium_browser`` and ``frontend``
((page, page errors)) fixtures;
``running_comfyui`` and ``open_frontend`` start more of either. Needs Playwright and a Chromium (Debian:
``apt-get install chromium``; or set CSG_CHROMIUM); skipped otherwise. Each server runs from a temporary base
directory, so nothing is written into the ComfyUI checkout. Nothing is fetched from the network.

The servers serve the frontend installed with ComfyUI (``comfyui-frontend-package``), or the one whose ``static``
folder CSG_FRONTEND_ROOT names: CI runs the browser tests a second time with the newest frontend that way.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tools.comfyui_harness import comfyui_path

ROOT = Path(__file__).resolve().parents[2]
PACK_FOLDER = "comfyui-causal-counterfactuals"  # the pack's folder in custom_nodes/, so its URL is /extensions/<this>/
QUIET_SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingModelsWarning": False}
FRONTEND_ROOT_VARIABLE = "CSG_FRONTEND_ROOT"


def frontend_arguments() -> list[str]:
    root = os.environ.get(FRONTEND_ROOT_VARIABLE, "").strip()
    if not root:
        return []
    if not (Path(root) / "index.html").is_file():
        raise RuntimeError(f"{FRONTEND_ROOT_VARIABLE}={root} is not a ComfyUI frontend (it has no index.html): name "
                           "the static folder of an installed comfyui-frontend-package, e.g. "
                           "<target>/comfyui_frontend_package/static.")
    return ["--front-end-root", root]


def chromium() -> str | None:
    return os.environ.get("CSG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def require_browser() -> None:
    pytest.importorskip("playwright.sync_api", reason="the frontend tests drive Chromium with Playwright")
    if chromium() is None:
        pytest.skip("no Chromium found: apt-get install chromium, or set CSG_CHROMIUM")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_comfyui(base: Path, with_pack: bool = True) -> Iterator[str]:
    """A ComfyUI server on a free port, its folders under ``base``; yields its URL."""
    (base / "custom_nodes").mkdir(parents=True)
    if with_pack:
        (base / "custom_nodes" / PACK_FOLDER).symlink_to(ROOT, target_is_directory=True)
    (base / "user" / "default").mkdir(parents=True)
    (base / "user" / "default" / "comfy.settings.json").write_text(json.dumps(QUIET_SETTINGS))
    port = free_port()
    log = (base / "server.log").open("w")
    process = subprocess.Popen([sys.executable, str(comfyui_path() / "main.py"), "--cpu", "--listen", "127.0.0.1",
                                "--port", str(port), "--base-directory", str(base), "--disable-auto-launch",
                                *frontend_arguments()],
                               cwd=comfyui_path(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/system_stats", timeout=2)
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"ComfyUI did not start:\n{(base / 'server.log').read_text()[-3000:]}") from None
                time.sleep(1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


@dataclass
class Problems:
    """What a page reported: uncaught errors and console errors."""

    page_errors: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    def clear(self) -> None:
        self.page_errors.clear()
        self.console_errors.clear()


BROWSER_TIMEOUT_MS = 90_000


@contextmanager
def open_frontend(browser, url: str, color_scheme: str = "dark") -> Iterator[tuple[object, Problems]]:
    """A new tab with the app loaded (``window.app.graph`` exists), and the problems it reports from the start."""
    tab = browser.new_page(viewport={"width": 1600, "height": 1000}, color_scheme=color_scheme)
    # Playwright's 30 s default was once too short for a reload on a 2-core CI machine running ComfyUI beside
    # Chromium; a real defect still fails, only later.
    tab.set_default_timeout(BROWSER_TIMEOUT_MS)
    problems = Problems()
    tab.on("pageerror", lambda error: problems.page_errors.append(str(error)))
    tab.on("console", lambda message: message.type == "error" and problems.console_errors.append(
        f"{message.text} ({message.location.get('url', '')})"))
    try:
        tab.goto(url, wait_until="networkidle")
        tab.wait_for_function("window.app && window.app.graph", timeout=120_000)
        yield tab, problems
    finally:
        tab.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    require_browser()
    with running_comfyui(tmp_path_factory.mktemp("comfyui-base")) as url:
        yield url


@pytest.fixture(scope="module")
def chromium_browser():
    require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def frontend(server, chromium_browser):
    """(the app's page, the page errors seen so far)"""
    with open_frontend(chromium_browser, server) as (tab, problems):
        yield tab, problems.page_errors
