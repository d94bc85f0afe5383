"""The evaluation's HTML report in a real browser: headless Chromium (through Playwright) opens the
report of a real ``csg-evaluate`` run offline, with no console or page errors, every image decoded,
and the sort buttons reordering the items by score.

It lives in the ComfyUI suite because that suite's environment is the one with Playwright and
Chromium (.ci/run installs both); it needs no ComfyUI itself. CI runs it with no skip allowed.
"""

from __future__ import annotations

from tests.comfyui.browser import chromium, require_browser
from tests.evaluation_fixtures import evaluation_server, write_coco_dataset, write_folder_dataset
from tests.test_cli import no_local_models, sdxl_folder  # noqa: F401 (fixtures)
from tests.test_evaluate import command
from tests.test_metrics import random_parts, weight_files  # noqa: F401 (fixtures)


def test_the_report_shows_every_image_offline_without_errors(sdxl_folder, weight_files, tmp_path, monkeypatch):
    require_browser()
    from playwright.sync_api import sync_playwright

    from csg.evaluate import main
    from csg.evaluation.results import load_results

    monkeypatch.setenv("EVAL_TEST_KEY", "unused")
    datasets = [f"mine=folder:{write_folder_dataset(tmp_path / 'mine', n=2)}",
                f"coco=coco:{write_coco_dataset(tmp_path / 'coco', n=2)}"]
    out = tmp_path / "eval"
    with evaluation_server() as server:
        assert main(command(datasets, out, server, sdxl_folder, weight_files, "--methods", "csg,ddpm")) == 0
    records = load_results(out).records
    expected_images = sum(len(r["interventions"]) * 5 for r in records)  # original, 2 methods, mask, graph

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=["--no-sandbox"])
        page = browser.new_page()
        problems: list[str] = []
        page.on("console", lambda message: problems.append(message.text) if message.type == "error" else None)
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("request", lambda request: problems.append(f"network: {request.url}")
                if not request.url.startswith(("file:", "data:")) else None)
        page.goto((out / "report.html").as_uri(), wait_until="load")
        images = page.evaluate("""() => [...document.images].map(i => ({ok: i.complete && i.naturalWidth > 0,
                                                                          alt: i.alt}))""")
        assert len(images) == expected_images and all(i["ok"] for i in images), images
        for record in records:
            assert page.locator(f"text={record['item_id']}").count() == 1
        order = lambda: page.evaluate("() => [...document.querySelectorAll('#items > .item h3')]"  # noqa: E731
                                      ".map(h => h.textContent)")
        scores = {r["item_id"]: sum(e["lpips"] for e in r["methods"]["csg"] + r["methods"]["ddpm"])
                  / (2 * len(r["interventions"])) for r in records}
        page.get_by_role("button", name="best LPIPS").click()
        assert order() == sorted(scores, key=scores.get)
        page.get_by_role("button", name="worst LPIPS").click()
        assert order() == sorted(scores, key=scores.get, reverse=True)
        browser.close()
    assert problems == []
