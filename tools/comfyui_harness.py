"""Run this pack inside a real ComfyUI, headless: ComfyUI's own loader, validator and executor.

``start_comfyui(workdir)`` puts the checkout (COMFYUI_PATH) on ``sys.path``, selects the CPU when there is no
GPU, points ComfyUI's input/output/temp/user folders into ``workdir`` (nothing is written into the
checkout), loads the built-in nodes, then loads this repository with ``nodes.load_custom_node``,
exactly as ComfyUI loads a folder in ``custom_nodes/``. It returns a ``ComfyUI`` whose ``run``
executes an API prompt or a saved UI workflow with ``execution.PromptExecutor`` after
``execution.validate_prompt``, the path a prompt queued by the frontend takes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tools.workflow_format import set_widgets, workflow_to_prompt

REPO = Path(__file__).resolve().parents[1]


def comfyui_path() -> Path:
    """The ComfyUI checkout named by COMFYUI_PATH."""
    value = os.environ.get("COMFYUI_PATH", "").strip()
    path = Path(value).expanduser() if value else None
    if path is None or not (path / "comfy" / "samplers.py").is_file():
        raise RuntimeError(f"No ComfyUI checkout at COMFYUI_PATH={value!r} (it needs comfy/samplers.py). Set "
                           "COMFYUI_PATH to a ComfyUI checkout, e.g. COMFYUI_PATH=/path/to/ComfyUI.")
    return path


def import_comfy() -> None:
    """Put ComfyUI on the path, on the CPU when there is no GPU, without parsing our command line."""
    path = str(comfyui_path())
    if path not in sys.path:
        sys.path.insert(0, path)
    import comfy.options

    comfy.options.enable_args_parsing = False
    import comfy.cli_args

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True


class WorkflowFailed(AssertionError):
    """ComfyUI refused (validation) or failed (execution) a prompt; ``error`` holds what it reported."""

    def __init__(self, message: str, error: Mapping[str, Any]):
        super().__init__(message)
        self.error = dict(error)


class RecordingServer:
    """Stands in for the PromptServer: keeps every message the executor sends to the frontend."""

    def __init__(self) -> None:
        self.client_id: str | None = None
        self.last_node_id: str | None = None
        self.last_prompt_id: str | None = None
        self.sockets_metadata: dict = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event: str, data: Any, sid: str | None = None) -> None:
        self.messages.append((event, data))


@dataclass
class Execution:
    """One executed prompt: the values of the requested nodes, the UI each node sent, and every message."""

    prompt: dict
    outputs: dict[str, tuple]  # node id -> its output values, one per output socket
    ui: dict[str, dict]  # node id -> what it showed in the frontend (images, text)
    messages: list[tuple[str, Any]]
    progress: list[tuple[str | None, int, int]] = field(default_factory=list)  # (node id, value, total)

    def executed(self) -> list[str]:
        return [data["node"] for event, data in self.messages if event == "executing" and data.get("node")]


def _socket_values(slots: list) -> tuple:
    """A node's cached outputs: per socket a list over calls; a single call gives the value itself."""
    return tuple(slot[0] if isinstance(slot, list) and len(slot) == 1 else slot for slot in slots)


class ComfyUI:
    """A started ComfyUI: node registry, one executor kept across runs (like the server's), and ``run``."""

    def __init__(self, workdir: Path, pack_nodes: list[str]):
        import comfy.utils
        import execution

        import nodes

        self.workdir = workdir
        self.pack_nodes = pack_nodes  # the node ids this pack registered
        self.nodes = nodes
        self.execution = execution
        self.server = RecordingServer()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self.progress: list[tuple[str | None, int, int]] = []  # of the latest run, failed or not
        comfy.utils.set_progress_bar_global_hook(self._on_progress)

    def _on_progress(self, value: int, total: int, preview: Any, prompt_id: str | None = None,
                     node_id: str | None = None) -> None:
        import comfy.model_management
        from comfy_execution.utils import get_executing_context

        context = get_executing_context()
        node = node_id or (context.node_id if context is not None else None)
        self.progress.append((node, int(value), int(total)))
        comfy.model_management.throw_exception_if_processing_interrupted()

    # -- registry -------------------------------------------------------------------------------

    def node_class(self, class_type: str) -> Any:
        return self.nodes.NODE_CLASS_MAPPINGS[class_type]

    def input_types(self, class_type: str) -> Mapping[str, Any] | None:
        node = self.nodes.NODE_CLASS_MAPPINGS.get(class_type)
        return None if node is None else node.INPUT_TYPES()

    def pack_module(self, name: str) -> Any:
        """A module of the pack as ComfyUI loaded it (e.g. ``"csg.graph"``): the classes its nodes use."""
        import importlib

        return importlib.import_module(f"{pack_package_name()}.{name}")

    def model_of(self, patcher: Any) -> Any:
        """A ModelPatcher's model, or for the pack's own models (held for their patcher, see
        nodes/model_memory.py) the module held."""
        holder = self.pack_module("nodes.model_memory").HeldModule
        return patcher.model.module if isinstance(patcher.model, holder) else patcher.model

    def models_in_memory(self) -> list[Any]:
        """What ComfyUI's memory manager counts as loaded now."""
        import comfy.model_management

        return [self.model_of(patcher) for patcher in comfy.model_management.loaded_models()]

    # -- running --------------------------------------------------------------------------------

    def to_prompt(self, workflow: Mapping[str, Any]) -> dict:
        return workflow_to_prompt(workflow, self.input_types)

    def with_widgets(self, workflow: Mapping[str, Any], class_type: str, **values: Any) -> dict:
        """A copy of a saved workflow with widgets of every ``class_type`` node set, e.g. the test checkpoint."""
        return set_widgets(workflow, class_type, values, self.input_types)

    def run(self, prompt_or_workflow: Mapping[str, Any], outputs: Iterable[str | int] = (), *,
            fresh: bool = False) -> Execution:
        """Validate and execute, returning the outputs of the ``outputs`` node ids.

        Accepts an API prompt or a saved UI workflow (anything with ``"nodes"``). Output nodes run
        as ComfyUI runs them; the requested nodes run too, even if no output node needs them.
        ``fresh`` clears the executor's cache first (otherwise unchanged nodes are reused, as in
        the app). Raises ``WorkflowFailed`` on a validation or execution error.
        """
        prompt = self.to_prompt(prompt_or_workflow) if "nodes" in prompt_or_workflow else json.loads(
            json.dumps(prompt_or_workflow))
        wanted = [str(node_id) for node_id in outputs]
        if fresh:
            self.executor.reset()
        prompt_id = str(uuid.uuid4())
        targets = asyncio.run(self._validate(prompt_id, prompt, wanted))
        self.server.messages = []
        self.progress = []
        # a client id, as the frontend's, makes the executor send its per-node messages ("executing", ...)
        self.executor.execute(prompt, prompt_id, {"client_id": "csg-tests"}, targets)
        failure = next((data for event, data in self.executor.status_messages
                        if event in ("execution_error", "execution_interrupted")), None)
        if failure is not None:
            raise WorkflowFailed(_failure_text(prompt, failure), failure)
        values = {}
        for node_id in wanted:
            cached = self.executor.caches.outputs.get(node_id)
            values[node_id] = _socket_values(cached) if cached is not None else ()
        return Execution(prompt, values, dict(self.executor.history_result["outputs"]), list(self.server.messages),
                         list(self.progress))

    async def _validate(self, prompt_id: str, prompt: dict, wanted: list[str]) -> list[str]:
        """ComfyUI's own checks for the output nodes, plus the requested nodes; every error fails."""
        execution = self.execution
        for node_id in wanted:
            if node_id not in prompt:
                raise WorkflowFailed(f"Node {node_id} is not in the prompt (ids: {sorted(prompt)}).", {})
        has_output_node = any(getattr(self.nodes.NODE_CLASS_MAPPINGS.get(n["class_type"]), "OUTPUT_NODE", False)
                              is True for n in prompt.values())
        targets: list[str] = []
        if has_output_node or not wanted:
            ok, error, good, node_errors = await execution.validate_prompt(prompt_id, prompt, None)
            if not ok or node_errors:
                raise WorkflowFailed(f"ComfyUI rejected the prompt: {error}\nnode errors: "
                                     f"{json.dumps(node_errors, indent=1, default=str)}", {"error": error,
                                                                                          "node_errors": node_errors})
            targets += good
        validated: dict = {}
        for node_id in wanted:
            valid, reasons, _ = await execution.validate_inputs(prompt_id, prompt, node_id, validated)
            if valid is not True:
                problems = [r for result in validated.values() if result[0] is not True for r in result[1]]
                raise WorkflowFailed(f"ComfyUI rejected node {node_id}: {json.dumps(problems, indent=1, default=str)}",
                                     {"node_errors": problems})
        return list(dict.fromkeys([*targets, *wanted]))


def _failure_text(prompt: dict, failure: Mapping[str, Any]) -> str:
    node_id = failure.get("node_id")
    class_type = prompt.get(str(node_id), {}).get("class_type", "?")
    if "exception_message" not in failure:
        return f"Execution interrupted at node {node_id} ({class_type})."
    trace = "".join(failure.get("traceback") or [])
    return (f"Node {node_id} ({class_type}) raised {failure.get('exception_type')}: "
            f"{failure.get('exception_message', '').strip()}\n{trace}")


# -- start-up ---------------------------------------------------------------------------------------


def pack_package_name() -> str:
    """The module name ComfyUI gives a custom-node folder: its path, dots replaced (see nodes.load_custom_node)."""
    return str(REPO).replace(".", "_x_")


def _point_folders_into(workdir: Path) -> None:
    import folder_paths

    for name, setter in (("input", folder_paths.set_input_directory), ("output", folder_paths.set_output_directory),
                         ("temp", folder_paths.set_temp_directory), ("user", folder_paths.set_user_directory)):
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        setter(str(folder))


class _Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(self.format(record))


def _load_pack(nodes_module: Any) -> list[str]:
    """Load the repository with ComfyUI's loader; returns our node ids, or fails with ComfyUI's log."""
    captured = _Captured()
    root = logging.getLogger()
    root.addHandler(captured)
    try:
        before = set(nodes_module.NODE_CLASS_MAPPINGS)
        loaded = asyncio.run(nodes_module.load_custom_node(str(REPO), before, module_parent="custom_nodes"))
    finally:
        root.removeHandler(captured)
    if not loaded:
        raise RuntimeError("ComfyUI could not load the pack:\n" + "\n".join(captured.records))
    return sorted(set(nodes_module.NODE_CLASS_MAPPINGS) - before)


def import_comfy_like_main() -> None:
    """ComfyUI on the path, CPU chosen when there is no GPU, and ComfyUI's ``utils`` package imported first.

    main.py imports ``utils.extra_config`` before anything else; the order matters because
    ComfyUI's nodes.py puts comfy/ at the front of sys.path, after which a fresh ``import utils``
    finds comfy/utils.py and built-in nodes that need the package fail to import.
    """
    import_comfy()
    import comfy.model_management  # noqa: F401  (device chosen now, after the CPU flag is set)

    try:
        import utils.extra_config  # noqa: F401
    except ModuleNotFoundError as exc:
        raise RuntimeError(f"ComfyUI's utils package is shadowed by {sys.modules.get('utils')!r}: something "
                           "imported ComfyUI's nodes.py before import_comfy_like_main() ran. Call it first (the "
                           "tests/comfyui conftest does, before every test).") from exc


def start_comfyui(workdir: Path) -> ComfyUI:
    """Start ComfyUI in this process and load the pack (once per process).

    The location of the checkout comes from COMFYUI_PATH (see ``import_comfy``).
    """
    import_comfy_like_main()
    import nodes

    if not hasattr(nodes, "NODE_CLASS_MAPPINGS") or "CheckpointLoaderSimple" not in nodes.NODE_CLASS_MAPPINGS:
        raise RuntimeError(f"'nodes' resolved to {getattr(nodes, '__file__', nodes)!r}, not ComfyUI's nodes.py; "
                           "ComfyUI must come first on sys.path.")
    _point_folders_into(workdir)
    if "SamplerCustomAdvanced" not in nodes.NODE_CLASS_MAPPINGS:
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return ComfyUI(workdir, _load_pack(nodes))
