"""The understanding nodes: a VLM extracts the causal graph and proposes or propagates interventions.

    VLM (Local)                models/LLM/<name>                            -> CSG_VLM
    VLM (OpenAI-compatible)    base URL, model, API-key variable            -> CSG_VLM
    Concept Extractor          CSG_VLM, IMAGE (+ caption)                   -> CSG_CAUSAL_GRAPH, preview, JSON,
                                                                               base prompt
    Intervention Proposer      CSG_VLM, IMAGE, CSG_CAUSAL_GRAPH             -> CSG_INTERVENTIONS (3), JSON
    Manual Intervention        CSG_CAUSAL_GRAPH, target, value (+ CSG_VLM)  -> CSG_INTERVENTION, JSON, report, preview

The stages are ``csg.vlm``'s; these nodes only translate ComfyUI types, show progress and honour
Cancel. A VLM socket carries a ``VLMHandle``: the backend the stages call (wrapped in the answer
cache when asked) and, for a local model, whether to free its memory once a node has used it, so
SDXL gets the VRAM back. A local model loads through ComfyUI's memory manager (model_memory.py),
which makes room for it on the device first, evicting SDXL if it must.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui
from PIL import Image

from ..csg.errors import InputError, WeightsMissingError
from ..csg.graph import CausalGraph
from ..csg.vlm import (
    DEFAULT_ATTEMPTS,
    VLM,
    CachedVLM,
    OpenAICompatibleVLM,
    TransformersVLM,
    Turn,
    extract_graph,
    manual_intervention,
    propagate_intervention,
    propose_interventions,
)
from ..csg.vlm.openai_backend import MAX_RETRY_AFTER
from ..csg.vlm.schemas import STRUCTURED_MODES, Schema, check_mode
from ..csg.vlm.transformers_backend import GIB, WORKING_MEMORY_BASE, check_fits, memory_needed, resolve_device_dtype
from .csg_common import CATEGORY, CausalGraphType, Interventions, InterventionType
from .graph_nodes import (
    graph_preview,
    graph_view_ui,
    image_to_pil,
    intervention_report,
    interventions_json,
    preview_width_input,
)
from .model_memory import ManagedPlacement, node_device

UNDERSTANDING_CATEGORY = f"{CATEGORY}/understanding"
VLMType = io.Custom("CSG_VLM")  # nodes.vlm_nodes.VLMHandle
LLM_FOLDER = "LLM"
NO_LOCAL_MODEL = "(no model folder in models/LLM)"
CACHE_FOLDER = "csg_vlm_cache"  # under ComfyUI's user directory
PUT_A_MODEL_THERE = ("Put a Qwen3-VL (or Qwen2.5-VL) instruct model there, e.g. hf download "
                     "Qwen/Qwen3-VL-8B-Instruct --local-dir <ComfyUI>/models/LLM/Qwen3-VL-8B-Instruct, then refresh "
                     "the page.")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

log = logging.getLogger("csg.vlm")


# -- what travels on a VLM socket ---------------------------------------------------------------------


@dataclass(frozen=True)
class VLMHandle:
    backend: VLM  # what the stages call: OpenAICompatibleVLM or TransformersVLM, maybe inside CachedVLM
    local: TransformersVLM | None = None
    unload_after_use: bool = False

    def __repr__(self) -> str:  # shown by ComfyUI in error reports; backends never hold secrets
        return f"VLMHandle({self.backend!r}, unload_after_use={self.unload_after_use})"


class StageProgress:
    """One progress bar over a node's VLM questions; a local model's tokens fill each question's share."""

    UNITS = 100

    def __init__(self, questions: int):
        self.questions = max(1, questions)
        self.answered = 0
        self.bar = comfy.utils.ProgressBar(self.questions * self.UNITS)

    def _show(self, units: int) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        self.bar.update_absolute(min(units, self.questions * self.UNITS))

    def on_token(self, done: int, budget: int) -> None:
        share = min(self.answered, self.questions - 1) * self.UNITS
        self._show(share + self.UNITS * done // max(budget, 1))

    def on_answer(self) -> None:
        self.answered += 1
        self._show(self.answered * self.UNITS)


class _Watched:
    """The backend as the stages see it: Cancel is checked before each question, progress after each answer."""

    def __init__(self, backend: VLM, progress: StageProgress):
        self.backend = backend
        self.progress = progress

    @property
    def identity(self) -> str:
        return self.backend.identity

    def generate(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *, temperature: float,
                 max_tokens: int, schema: Schema | None = None) -> str:
        comfy.model_management.throw_exception_if_processing_interrupted()
        answer = self.backend.generate(system, turns, images, temperature=temperature, max_tokens=max_tokens,
                                       schema=schema)
        self.progress.on_answer()
        return answer

    def forget(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *, temperature: float,
               max_tokens: int, schema: Schema | None = None) -> None:
        forget = getattr(self.backend, "forget", None)  # the answer cache drops answers the stage rejected
        if forget is not None:
            forget(system, turns, images, temperature=temperature, max_tokens=max_tokens, schema=schema)

    def remember(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *, temperature: float,
                 max_tokens: int, answer: str, schema: Schema | None = None) -> None:
        remember = getattr(self.backend, "remember", None)  # the answer cache keeps a corrected answer it accepted
        if remember is not None:
            remember(system, turns, images, temperature=temperature, max_tokens=max_tokens, answer=answer,
                     schema=schema)


@contextmanager
def asking(handle: VLMHandle, questions: int) -> Iterator[VLM]:
    """The VLM for one node's stages, with progress and Cancel; a local model may be unloaded afterwards."""
    if not isinstance(handle, VLMHandle):
        raise InputError("Expected a VLM from 'VLM (Local)' or 'VLM (OpenAI-compatible)', "
                         f"got {type(handle).__name__}.")
    progress = StageProgress(questions)
    local = handle.local
    previous = local.on_token if local is not None else None
    if local is not None:
        local.on_token = progress.on_token
    try:
        yield _Watched(handle.backend, progress)
    finally:
        if local is not None:
            local.on_token = previous
            if handle.unload_after_use:
                local.unload()


def answer_cache_folder() -> Path:
    return Path(folder_paths.get_user_directory()) / CACHE_FOLDER


def cached(backend: VLM, cache_answers: bool) -> VLM:
    return CachedVLM(backend, answer_cache_folder()) if cache_answers else backend


# -- local models -------------------------------------------------------------------------------------


def register_llm_folder() -> None:
    """Add <ComfyUI>/models/LLM to the "LLM" folder type (other packs may have registered it already)."""
    folder_paths.add_model_folder_path(LLM_FOLDER, os.path.join(folder_paths.models_dir, LLM_FOLDER))



def local_model_names() -> list[str]:
    """Sub-folders of every models/LLM folder that hold a model config."""
    names = set()
    for root in folder_paths.get_folder_paths(LLM_FOLDER):
        if os.path.isdir(root):
            names |= {entry.name for entry in os.scandir(root) if (Path(entry.path) / "config.json").is_file()}
    return sorted(names)


def local_model_folder(name: str) -> Path:
    for root in folder_paths.get_folder_paths(LLM_FOLDER):
        candidate = Path(root) / name
        if candidate.is_dir():
            return candidate
    raise WeightsMissingError(f"No VLM folder '{name}' in {', '.join(folder_paths.get_folder_paths(LLM_FOLDER))}. "
                              f"{PUT_A_MODEL_THERE}")


def checked_working_memory(folder: Path, device: torch.device, dtype: torch.dtype) -> int:
    """Log what the model needs on the device, refuse a device too small for it, and return the memory
    to generate with (beyond the weights) that ComfyUI's manager is asked to keep free."""
    need = memory_needed(folder, dtype)
    if need is None:
        log.warning("VLM %s: no safetensors files, so its size is unknown and whether it fits on %s is not checked",
                    folder.name, device)
        return WORKING_MEMORY_BASE
    total = comfy.model_management.get_total_memory(device)
    log.info("VLM %s needs %s; %s has %.1f GiB in all", folder.name, need, device, total / GIB)
    check_fits(need, total, device, folder.name)
    return need.working


_LOCAL_MODELS: dict[tuple[str, str, str], TransformersVLM] = {}  # one loaded copy per folder, device and dtype


def shared_local_model(folder: Path, device: str, dtype: str) -> TransformersVLM:
    """The folder's model on the device, shared by every node that asks for the same folder, device and dtype.

    Nothing loads here: what the model needs is logged and checked against the device, and the model
    loads when first asked, through ComfyUI's memory manager.
    """
    device, dtype = resolve_device_dtype(node_device(device), dtype)
    working_memory = checked_working_memory(folder, device, dtype)
    key = (str(folder.resolve()), str(device), str(dtype))
    if key not in _LOCAL_MODELS:
        _LOCAL_MODELS[key] = TransformersVLM(folder, device=device, dtype=dtype,
                                             placement=ManagedPlacement(device, working_memory))
    return _LOCAL_MODELS[key]


def cache_input() -> io.Boolean.Input:
    return io.Boolean.Input("cache_answers", default=True,
                            tooltip="Keep every answer on disk (ComfyUI user folder, csg_vlm_cache) and reuse it for "
                                    "the same question, image and model, so re-runs cost nothing.")


def structured_input() -> io.Combo.Input:
    # optional, so workflows saved before it existed still validate (and get auto)
    return io.Combo.Input("structured", options=list(STRUCTURED_MODES), default="auto", optional=True,
                          tooltip="How each answer is held to its stage's JSON Schema while it is decoded. auto: the "
                                  "schema where the backend can (falls back to a JSON object, then plain text, when "
                                  "a server refuses it); schema or json: only that (a refusal is an error); off: "
                                  "plain text, repaired and re-asked when it does not fit.")


def attempts_input() -> io.Int.Input:
    return io.Int.Input("max_attempts", default=DEFAULT_ATTEMPTS, min=1, max=10,
                        tooltip="Questions per stage: an unusable answer is sent back with the problem named, up to "
                                "this many times in all.")


# -- nodes --------------------------------------------------------------------------------------------


class LocalVLM(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        names = local_model_names() or [NO_LOCAL_MODEL]
        return io.Schema(
            node_id="CSGLocalVLM",
            display_name="VLM (Local)",
            category=UNDERSTANDING_CATEGORY,
            description="A Qwen3-VL or Qwen2.5-VL instruct model from models/LLM/<name>, run with transformers. It "
                        "loads on first use, through ComfyUI's memory manager (which makes room for it, moving "
                        "SDXL out if it must), and is shared by every node that uses the same folder; nothing is "
                        "downloaded. The node logs how much memory the model needs and refuses a device too small.",
            inputs=[
                io.Combo.Input("model", options=names, default=names[0],
                               tooltip="A folder in models/LLM holding a whole Hugging Face snapshot of the model."),
                io.Combo.Input("device", options=["auto", "cuda", "cpu"], default="auto",
                               tooltip="auto: ComfyUI's device."),
                io.Combo.Input("dtype", options=["auto", "bfloat16", "float16", "float32"], default="auto",
                               tooltip="auto: bfloat16 on GPUs that support it (else float16), float32 on the CPU."),
                io.Boolean.Input("unload_after_use", default=True,
                                 tooltip="Free the VLM's memory after each node that used it, so SDXL gets the VRAM; "
                                         "the next use loads it again. Off: ComfyUI keeps it loaded and moves it to "
                                         "system memory when another model needs the room."),
                structured_input(),
                cache_input(),
            ],
            outputs=[VLMType.Output(display_name="vlm", tooltip="The model, for Concept Extractor, Intervention "
                                                                "Proposer, Manual Intervention and Counterfactual "
                                                                "Judge.")],
        )

    @classmethod
    def execute(cls, model: str, device: str, dtype: str, unload_after_use: bool, cache_answers: bool,
                structured: str = "auto") -> io.NodeOutput:
        if model == NO_LOCAL_MODEL:
            raise WeightsMissingError(f"models/LLM holds no VLM folder. {PUT_A_MODEL_THERE} Or use "
                                      "'VLM (OpenAI-compatible)' with a server.")
        local = shared_local_model(local_model_folder(model), device, dtype)
        local.structured = check_mode(structured)  # the shared model answers in the mode of the node that ran last
        return io.NodeOutput(VLMHandle(cached(local, cache_answers), local, unload_after_use))


class OpenAICompatibleVLMNode(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGOpenAIVLM",
            display_name="VLM (OpenAI-compatible)",
            category=UNDERSTANDING_CATEGORY,
            description="A VLM behind any OpenAI-compatible /chat/completions server (vLLM, llama.cpp, Ollama, "
                        "LM Studio, a hosted API). The API key is read from an environment variable at run time, "
                        "so it never enters the workflow.",
            inputs=[
                io.String.Input("base_url", default="http://127.0.0.1:8000/v1",
                                tooltip="The server's OpenAI API root, e.g. http://127.0.0.1:8000/v1."),
                io.String.Input("model", default="",
                                tooltip="The model name the server serves (see its /v1/models)."),
                io.String.Input("api_key_env", default="",
                                tooltip="The NAME of the environment variable that holds the API key (e.g. "
                                        "OPENAI_API_KEY), set before starting ComfyUI. Never the key itself: this "
                                        "field is saved in the workflow. Empty for servers without a key."),
                io.Float.Input("timeout", default=300.0, min=1.0, max=3600.0, step=1.0,
                               tooltip="Seconds one question may take in all: connecting, sending and the whole "
                                       "answer, however slowly it comes. Each retry gets this time afresh."),
                io.Int.Input("retries", default=2, min=0, max=10,
                             tooltip="Extra tries after a refused or broken connection, a timeout or a busy server "
                                     f"(whose Retry-After is honoured up to {MAX_RETRY_AFTER:g} s)."),
                structured_input(),
                cache_input(),
            ],
            outputs=[VLMType.Output(display_name="vlm", tooltip="The server connection, for Concept Extractor, "
                                                                "Intervention Proposer, Manual Intervention and "
                                                                "Counterfactual Judge.")],
        )

    @classmethod
    def execute(cls, base_url: str, model: str, api_key_env: str, timeout: float, retries: int,
                cache_answers: bool, structured: str = "auto") -> io.NodeOutput:
        variable = api_key_env.strip()
        if variable and not ENV_NAME.fullmatch(variable):
            # never echo the field: it may be a pasted key
            raise InputError("api_key_env must be the name of an environment variable (letters, digits and _), "
                             "not the key itself. Put the key in an environment variable, write its name here, "
                             "and do not share this workflow with the key in it.")
        backend = OpenAICompatibleVLM(base_url, model, api_key_env=variable or None, timeout=timeout, retries=retries,
                                      structured=structured)
        backend.check_setting()  # a bad key variable or URL is this node's error, not the first stage's
        return io.NodeOutput(VLMHandle(cached(backend, cache_answers)))


class ConceptExtractor(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGConceptExtractor",
            display_name="Concept Extractor",
            category=UNDERSTANDING_CATEGORY,
            description="Asks the VLM for the image's causal graph: about five high-level concepts with their current "
                        "values, the concepts they would change, and the cause -> effect edges (a DAG). Without a "
                        "caption the VLM first describes the scene, and that description is the base prompt.",
            inputs=[
                VLMType.Input("vlm", tooltip="From 'VLM (Local)' or 'VLM (OpenAI-compatible)'."),
                io.Image.Input("image", tooltip="The factual image (one)."),
                io.String.Input("caption", multiline=True, default="", optional=True,
                                tooltip="Optional caption of the image; it becomes the base prompt. Empty: the VLM "
                                        "describes the scene."),
                attempts_input(),
                preview_width_input(),
            ],
            outputs=[
                CausalGraphType.Output(display_name="causal_graph", tooltip="The extracted graph (a DAG of "
                                                                            "concepts with their current values)."),
                io.Image.Output(display_name="preview", tooltip="The graph drawn as a picture, cause above effect."),
                io.String.Output(display_name="graph_json", tooltip="Edit it in 'Causal Graph From JSON' if needed."),
                io.String.Output(display_name="base_prompt", tooltip="The caption, or the VLM's scene description."),
            ],
        )

    @classmethod
    def execute(cls, vlm: VLMHandle, image, max_attempts: int, preview_width: int, caption: str | None = None
                ) -> io.NodeOutput:
        picture = image_to_pil(image, "Concept Extractor")
        caption = (caption or "").strip()
        with asking(vlm, questions=1 if caption else 2) as backend:
            extraction = extract_graph(backend, picture, caption or None, max_attempts=max_attempts)
        graph = extraction.graph
        preview = graph_preview(graph, width=preview_width)
        return io.NodeOutput(graph, preview, graph.to_json(), extraction.base_prompt, ui=graph_view_ui(graph))


class InterventionProposer(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGInterventionProposer",
            display_name="Intervention Proposer",
            category=UNDERSTANDING_CATEGORY,
            description="Asks the VLM for three diverse interventions on different concepts: one that changes many "
                        "concepts downstream, one that changes few, one that changes none. Each is checked against "
                        "the graph; changes outside the target's descendants are stripped and reported.",
            inputs=[
                VLMType.Input("vlm", tooltip="From 'VLM (Local)' or 'VLM (OpenAI-compatible)'."),
                io.Image.Input("image", tooltip="The factual image the graph was extracted from."),
                CausalGraphType.Input("causal_graph", tooltip="The image's causal graph."),
                io.String.Input("base_prompt", multiline=True, default="", optional=True,
                                tooltip="The prompt the proposals' generation prompts edit; empty: the graph's "
                                        "scene summary."),
                attempts_input(),
            ],
            outputs=[
                Interventions.Output(display_name="interventions", tooltip="Pick one with 'Select Intervention'."),
                io.String.Output(display_name="interventions_json", tooltip="The three proposals as JSON (edit one "
                                                                            "in Intervention From JSON)."),
            ],
        )

    @classmethod
    def execute(cls, vlm: VLMHandle, image, causal_graph: CausalGraph, max_attempts: int,
                base_prompt: str | None = None) -> io.NodeOutput:
        picture = image_to_pil(image, "Intervention Proposer")
        with asking(vlm, questions=1) as backend:
            proposals = propose_interventions(backend, picture, causal_graph, (base_prompt or "").strip() or None,
                                              max_attempts=max_attempts)
        report = "\n\n".join(f"[{k}] {intervention_report(p)}" for k, p in enumerate(proposals, start=1))
        return io.NodeOutput(proposals, interventions_json(proposals), ui=ui.PreviewText(report))


class ManualIntervention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CSGManualIntervention",
            display_name="Manual Intervention",
            category=UNDERSTANDING_CATEGORY,
            description="Your own intervention do(target = value). With a VLM (and the image) the VLM works out how "
                        "the target's descendants change; changes it proposes outside them are stripped and "
                        "reported. Without a VLM only the target is edited.",
            inputs=[
                CausalGraphType.Input("causal_graph", tooltip="The graph the intervention acts on."),
                io.String.Input("target", default="c1",
                                tooltip="The concept to intervene on: its id (c2) or its name (hair color)."),
                io.String.Input("new_value", default="",
                                tooltip="The value it takes. Without a VLM this phrase also guides the edit, so "
                                        "'black hair' works better than 'black'."),
                VLMType.Input("vlm", optional=True,
                              tooltip="A VLM that propagates the change to the target's descendants."),
                io.Image.Input("image", optional=True,
                               tooltip="The factual image; needed when a VLM is connected."),
                io.String.Input("base_prompt", multiline=True, default="", optional=True,
                                tooltip="The prompt the generation prompt edits; empty: the graph's scene summary."),
                attempts_input(),
                preview_width_input(),
            ],
            outputs=[
                InterventionType.Output(display_name="intervention", tooltip="Your intervention, checked against "
                                                                             "the graph, with the changes the VLM "
                                                                             "propagated."),
                io.String.Output(display_name="intervention_json", tooltip="The same as JSON (edit it further in "
                                                                           "Intervention From JSON)."),
                io.String.Output(display_name="report", tooltip="What changes, and every causal violation stripped; "
                                                                "read it with a Preview Any node."),
                io.Image.Output(display_name="preview", tooltip="The graph drawn as a picture with the target and "
                                                                "its changes marked."),
            ],
        )

    @classmethod
    def execute(cls, causal_graph: CausalGraph, target: str, new_value: str, max_attempts: int, preview_width: int,
                vlm: VLMHandle | None = None, image=None, base_prompt: str | None = None) -> io.NodeOutput:
        base_prompt = (base_prompt or "").strip() or None
        if vlm is None:
            intervention = manual_intervention(causal_graph, target, new_value, generation_prompt=base_prompt or "")
        else:
            if image is None:
                raise InputError("Manual Intervention has a VLM but no image: connect the factual image, so the VLM "
                                 "can see what the change does, or disconnect the VLM to edit the target alone.")
            picture = image_to_pil(image, "Manual Intervention")
            with asking(vlm, questions=1) as backend:
                intervention = propagate_intervention(backend, picture, causal_graph, target, new_value,
                                                      base_prompt=base_prompt, max_attempts=max_attempts)
        report = intervention_report(intervention)
        preview = graph_preview(causal_graph, intervention, preview_width)
        shown = graph_view_ui(causal_graph, intervention) | ui.PreviewText(report).as_dict()
        return io.NodeOutput(intervention, intervention.to_json(), report, preview, ui=shown)


NODES = [LocalVLM, OpenAICompatibleVLMNode, ConceptExtractor, InterventionProposer, ManualIntervention]
