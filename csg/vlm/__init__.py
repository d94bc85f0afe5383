"""The understanding half of FM-CGM: a VLM as concept extractor E and concept manipulator M.

Stages (each asks, validates, and re-asks with the problem named, up to ``max_attempts``):
``describe_scene`` -> ``extract_graph`` -> ``propose_interventions`` or ``propagate_intervention``,
and ``judge_counterfactual`` for evaluation. ``manual_intervention`` builds do(C_i = c') with no
VLM at all. Backends: ``TransformersVLM`` (local Qwen-VL folder; ``memory_needed`` and ``check_fits``
tell beforehand whether it fits on a device), ``OpenAICompatibleVLM`` (any ``/chat/completions``
server); wrap either in ``CachedVLM`` to keep answers on disk.
"""

from .asking import DEFAULT_ATTEMPTS, ask_until_valid
from .cache import CachedVLM
from .extractor import Extraction, describe_scene, extract_graph
from .judge import ConceptCheck, Judgement, checklist, judge_counterfactual, judge_preservation, preservation_checklist
from .manipulator import manual_intervention, propagate_intervention, propose_interventions
from .openai_backend import OpenAICompatibleVLM, chat_completions_url
from .parsing import VLMOutputError, extract_json
from .protocol import VLM, Turn, image_for_vlm
from .transformers_backend import MemoryNeed, TransformersVLM, check_fits, check_model_folder, memory_needed

__all__ = [
    "DEFAULT_ATTEMPTS", "ask_until_valid",
    "CachedVLM",
    "Extraction", "describe_scene", "extract_graph",
    "ConceptCheck", "Judgement", "checklist", "judge_counterfactual", "judge_preservation", "preservation_checklist",
    "manual_intervention", "propagate_intervention", "propose_interventions",
    "OpenAICompatibleVLM", "chat_completions_url",
    "VLMOutputError", "extract_json",
    "VLM", "Turn", "image_for_vlm",
    "TransformersVLM", "check_model_folder", "MemoryNeed", "memory_needed", "check_fits",
]
