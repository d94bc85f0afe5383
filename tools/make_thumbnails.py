"""The template browser's thumbnails (workflows/<name>.jpg, the file the frontend asks for beside each workflow),
made in the real frontend: a ComfyUI with the pack, a headless Chromium, each workflow loaded and fitted into view.

    COMFYUI_PATH=/path/to/ComfyUI ~/comfy-venv/bin/python tools/make_thumbnails.py

Needs Playwright and a Chromium (CSG_CHROMIUM, or apt-get install chromium), as the browser tests do. Re-run it
after tools/build_workflows.py moves nodes.
"""

from __future__ import annotations

import io
import json
import sys
import tempfile
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from tools.comfyui_server import ROOT, chromium, running_comfyui  # noqa: E402

VIEWPORT = {"width": 1440, "height": 1080}
THUMBNAIL = (480, 360)  # the cards show a 4:3 picture; larger only costs bytes
JPEG_QUALITY = 80  # a few tens of KiB each
MARGIN_PX = 40

FIT_TO_VIEW = """async ([workflow, margin]) => {
    await app.loadGraphData(workflow);
    const boxes = [...app.graph._nodes.map(n => [n.pos[0], n.pos[1] - LiteGraph.NODE_TITLE_HEIGHT,
                                                 n.size[0], n.size[1] + LiteGraph.NODE_TITLE_HEIGHT]),
                   ...app.graph._groups.map(g => g._bounding ?? g.bounding)];
    const left = Math.min(...boxes.map(b => b[0])), top = Math.min(...boxes.map(b => b[1]));
    const width = Math.max(...boxes.map(b => b[0] + b[2])) - left;
    const height = Math.max(...boxes.map(b => b[1] + b[3])) - top;
    const canvas = app.canvas.canvas.getBoundingClientRect();
    const scale = Math.min((canvas.width - 2 * margin) / width, (canvas.height - 2 * margin) / height);
    app.canvas.ds.scale = scale;
    app.canvas.ds.offset = [(canvas.width / scale - width) / 2 - left, (canvas.height / scale - height) / 2 - top];
    app.canvas.deselectAll?.();
    app.canvas.setDirty(true, true);
    for (let frame = 0; frame < 5; frame += 1) await new Promise(requestAnimationFrame);  // DOM widgets follow
}"""


def thumbnail(screenshot: bytes) -> bytes:
    image = Image.open(io.BytesIO(screenshot)).convert("RGB")
    image.thumbnail(THUMBNAIL, Image.Resampling.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=JPEG_QUALITY, optimize=True)
    return out.getvalue()


def main() -> None:
    from playwright.sync_api import sync_playwright

    if chromium() is None:
        sys.exit("No Chromium found: apt-get install chromium, or set CSG_CHROMIUM.")
    workflows = sorted((ROOT / "workflows").glob("*.json"))
    with tempfile.TemporaryDirectory() as base, running_comfyui(Path(base)) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT, color_scheme="dark")
        page.set_default_timeout(120_000)
        page.goto(url, wait_until="networkidle")
        page.wait_for_function("window.app && window.app.graph")
        for path in workflows:
            page.evaluate(FIT_TO_VIEW, [json.loads(path.read_text()), MARGIN_PX])
            page.wait_for_timeout(500)  # the in-node graphs ask the server for their layout
            jpeg = thumbnail(page.screenshot())
            path.with_suffix(".jpg").write_bytes(jpeg)
            print(f"{path.with_suffix('.jpg').relative_to(ROOT)}: {len(jpeg) / 1024:.0f} KiB")
        browser.close()


if __name__ == "__main__":
    main()
