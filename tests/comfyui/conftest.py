"""The ComfyUI test suite: the pack inside a real ComfyUI, run by ComfyUI's own loader and executor.

Needs a ComfyUI checkout and a Python with its requirements:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/comfyui

Without COMFYUI_PATH every test here is skipped, and the run says so at the end. With
CSG_REQUIRE_COMFYUI=1 (as in CI) nothing here may skip: a missing COMFYUI_PATH stops the run, and a
test that skips (e.g. the frontend test without Playwright or Chromium) fails instead.

Fixtures:
    comfyui          (session) a started ComfyUI with this pack loaded; ``comfyui.run(prompt_or_workflow,
                     outputs=[node ids])`` -> ``Execution`` (see tools/comfyui_harness.py)
    memory_requests  every call to ComfyUI's load_models_gpu during one test (``MemoryRequest``)
    sdxl_checkpoint  (session) the ckpt_name of a random-weight SDXL checkpoint that CheckpointLoaderSimple
                     loads; built once into $CSG_TEST_CACHE (default ~/.cache/csg-tests) and reused
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
REQUIRE_VARIABLE = "CSG_REQUIRE_COMFYUI"
HOW_TO_RUN = ("set COMFYUI_PATH to a ComfyUI checkout and use a Python environment with ComfyUI's requirements: "
              "COMFYUI_PATH=/path/to/ComfyUI /path/to/venv/bin/python -m pytest tests/comfyui")


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH", "").strip()
    return Path(value).expanduser() if value else None


def skips_forbidden() -> bool:
    return os.environ.get(REQUIRE_VARIABLE, "").strip() not in ("", "0")


def _is_ours(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = comfyui_path()
    if path is None and skips_forbidden() and any(_is_ours(item) for item in items):
        raise pytest.UsageError(f"{REQUIRE_VARIABLE} is set, so the ComfyUI tests must run, but COMFYUI_PATH is not: "
                                f"{HOW_TO_RUN}")
    if path is None:
        skip = pytest.mark.skip(reason=f"ComfyUI tests need ComfyUI: {HOW_TO_RUN}")
        for item in items:
            if _is_ours(item):
                item.add_marker(skip)
    elif not (path / "comfy" / "samplers.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={path} is not a ComfyUI checkout (it has no comfy/samplers.py).")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Where skips are forbidden, a skipped test of ours is reported as failed, with the skip's reason."""
    report = (yield).get_result()
    if report.skipped and skips_forbidden() and _is_ours(item) and not hasattr(report, "wasxfail"):
        reason = report.longrepr[-1] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but {REQUIRE_VARIABLE} is set, so nothing in tests/comfyui may skip: {reason}"


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if comfyui_path() is None:
        terminalreporter.section("ComfyUI tests SKIPPED", sep="!", yellow=True, bold=True)
        terminalreporter.write_line(f"tests/comfyui did not run: {HOW_TO_RUN}", yellow=True, bold=True)


@pytest.fixture(scope="session", autouse=True)
def comfyui_imports():
    """Before any test here touches ComfyUI: import it in the order its main.py does (see tools/comfyui_harness.py)."""
    from tools.comfyui_harness import import_comfy_like_main

    import_comfy_like_main()


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    import torch

    from tools.comfyui_harness import start_comfyui

    torch.set_num_threads(1)  # the test machine is shared; one core keeps runs predictable
    return start_comfyui(tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfyui) -> str:
    import folder_paths

    from tools.sdxl_checkpoint import ensure_checkpoint

    path = ensure_checkpoint()
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    return path.name


@dataclass
class MemoryRequest:
    """One call to ComfyUI's load_models_gpu. The models are weak references, so recording them keeps none alive."""

    models: list[weakref.ref]
    kinds: list[str]  # their class names
    memory_required: int


@pytest.fixture
def memory_requests(comfyui, monkeypatch) -> list[MemoryRequest]:
    """Records each call to ComfyUI's memory manager, which still does the work."""
    import comfy.model_management

    real = comfy.model_management.load_models_gpu
    calls = []

    def recording(patchers, memory_required=0, **options):
        models = [comfyui.model_of(patcher) for patcher in patchers]
        calls.append(MemoryRequest([weakref.ref(m) for m in models], [type(m).__name__ for m in models],
                                   memory_required))
        return real(patchers, memory_required=memory_required, **options)

    monkeypatch.setattr(comfy.model_management, "load_models_gpu", recording)
    return calls
