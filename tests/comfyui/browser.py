"""A real ComfyUI server (with or without this pack) and a headless Chromium driving its frontend.

Used by the frontend tests: ``from tests.comfyui.browser import chromium_browser, frontend, server  # noqa: F401``
gives a test module the ``server`` (URL of a ComfyUI with the pack), ``chromium_browser`` and ``frontend``
((page, page errors)) fixtures;
``running_comfyui`` (tools/comfyui_server.py) and ``open_frontend`` start more of either. Needs Playwright and a
Chromium (Debian: ``apt-get install chromium``; or set CSG_CHROMIUM); skipped otherwise. CSG_FRONTEND_ROOT serves
another frontend (tools/comfyui_server.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import pytest

from tools.comfyui_server import PACK_FOLDER, ROOT, chromium, running_comfyui  # noqa: F401  (the tests import them from here)


def require_browser() -> None:
    pytest.importorskip("playwright.sync_api", reason="the frontend tests drive Chromium with Playwright")
    if chromium() is None:
        pytest.skip("no Chromium found: apt-get install chromium, or set CSG_CHROMIUM")


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
