"""A real ComfyUI server with this pack (or without it) on 127.0.0.1, from a temporary base directory.

For the browser tests (tests/comfyui/browser.py) and tools/make_thumbnails.py. The server serves the frontend
installed with ComfyUI (``comfyui-frontend-package``), or the one whose ``static`` folder CSG_FRONTEND_ROOT names:
CI runs the browser tests a second time with the newest frontend that way. Nothing is fetched from the network.
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
from pathlib import Path

from tools.comfyui_harness import comfyui_path

ROOT = Path(__file__).resolve().parents[1]
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
    """The Chromium that Playwright drives: CSG_CHROMIUM, else the system's (Debian: apt-get install chromium)."""
    return os.environ.get("CSG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


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
