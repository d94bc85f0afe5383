"""The ComfyUI test suite: the pack inside a real ComfyUI, run by ComfyUI's own loader and executor.

Needs a ComfyUI checkout and a Python with its requirements:

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python -m pytest tests/comfyui

Without COMFYUI_PATH every test here is skipped, and the run says so at the end.

Fixtures:
    comfyui          (session) a started ComfyUI with this pack loaded; ``comfyui.run(prompt_or_workflow,
                     outputs=[node ids])`` -> ``Execution`` (see harness.py)
    sdxl_checkpoint  (session) the ckpt_name of a random-weight SDXL checkpoint that CheckpointLoaderSimple
                     loads; built once into $CSG_TEST_CACHE (default ~/.cache/csg-tests) and reused
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
HOW_TO_RUN = ("set COMFYUI_PATH to a ComfyUI checkout and use a Python environment with ComfyUI's requirements: "
              "COMFYUI_PATH=/path/to/ComfyUI /path/to/venv/bin/python -m pytest tests/comfyui")


def comfyui_path() -> Path | None:
    value = os.environ.get("COMFYUI_PATH", "").strip()
    return Path(value).expanduser() if value else None


def _is_ours(item: pytest.Item) -> bool:
    return HERE in Path(str(item.path)).resolve().parents


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    path = comfyui_path()
    if path is None:
        skip = pytest.mark.skip(reason=f"ComfyUI tests need ComfyUI: {HOW_TO_RUN}")
        for item in items:
            if _is_ours(item):
                item.add_marker(skip)
    elif not (path / "comfy" / "samplers.py").is_file():
        raise pytest.UsageError(f"COMFYUI_PATH={path} is not a ComfyUI checkout (it has no comfy/samplers.py).")


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if comfyui_path() is None:
        terminalreporter.section("ComfyUI tests SKIPPED", sep="!", yellow=True, bold=True)
        terminalreporter.write_line(f"tests/comfyui did not run: {HOW_TO_RUN}", yellow=True, bold=True)


@pytest.fixture(scope="session", autouse=True)
def comfyui_imports():
    """Before any test here touches ComfyUI: import it in the order its main.py does (see harness.py)."""
    from tests.comfyui.harness import import_comfy_like_main

    import_comfy_like_main()


@pytest.fixture(scope="session")
def comfyui(tmp_path_factory):
    import torch

    from tests.comfyui.harness import start_comfyui

    torch.set_num_threads(1)  # the test machine is shared; one core keeps runs predictable
    return start_comfyui(tmp_path_factory.mktemp("comfyui"))


@pytest.fixture(scope="session")
def sdxl_checkpoint(comfyui) -> str:
    import folder_paths

    from tests.comfyui.sdxl_checkpoint import ensure_checkpoint

    path = ensure_checkpoint()
    folder_paths.add_model_folder_path("checkpoints", str(path.parent))
    return path.name
