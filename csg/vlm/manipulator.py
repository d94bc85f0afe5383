"""The concept manipulator M: interventions do(C_i = c') and their consequences for the descendants.

Whatever the VLM writes, every intervention passes through ``check_intervention``, so a change to a
concept outside De(C_i) is stripped and recorded in ``violations``, never passed on silently.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from PIL import Image

from ..errors import InputError
from ..graph import CausalGraph, Concept, Intervention, check_intervention, no_change
from . import prompts
from .asking import DEFAULT_ATTEMPTS, ask_until_valid
from .parsing import VLMOutputError, extract_json
from .protocol import VLM
from .schemas import PROPOSALS


def _intervention_items(answer: str) -> list:
    """The list of intervention objects in an answer: {"interventions": [...]}, a bare list, or one object."""
    data = extract_json(answer)
    if isinstance(data, list):
        return data
    if isinstance(data, Mapping):
        if isinstance(data.get("interventions"), list):
            return data["interventions"]
        if isinstance(data.get("intervention"), Mapping):
            return [data["intervention"]]
        if "target_concept_id" in data:
            return [data]
    raise VLMOutputError('Expected {"interventions": [ ... ]} with intervention objects inside.')


def _read_intervention(graph: CausalGraph, item: Any, default_id: str) -> Intervention:
    if isinstance(item, Mapping) and not item.get("id"):
        item = {**item, "id": default_id}
    return check_intervention(graph, Intervention.from_dict(item))


def parse_proposals(graph: CausalGraph, answer: str) -> list[Intervention]:
    """Up to three checked interventions on different concepts, each really changing its target."""
    wanted = min(PROPOSALS, len(graph.concepts))
    chosen: list[Intervention] = []
    for k, item in enumerate(_intervention_items(answer), start=1):
        intervention = _read_intervention(graph, item, f"intervention_{k}")  # one that changes nothing fails here
        if all(c.target_concept_id != intervention.target_concept_id for c in chosen):
            chosen.append(intervention)
    if len(chosen) < wanted:
        targets = ", ".join(c.target_concept_id for c in chosen) or "none"
        raise VLMOutputError(f"Only {len(chosen)} intervention(s) on different concepts (targets: {targets}); "
                             f"propose {wanted}, each on a different concept.")
    chosen = chosen[:wanted]
    ids = [c.id for c in chosen]
    if len(set(ids)) < len(ids):  # the ids name output folders and nodes' choices, so keep them unique
        chosen = [replace(c, id=f"intervention_{k}") for k, c in enumerate(chosen, 1)]
    return chosen


def _value_phrase(vlm_phrase: str | None, new_value: str) -> str:
    """The VLM's phrase for the target ("black hair") only when it carries the user's value."""
    if isinstance(vlm_phrase, str) and new_value.strip().lower() in vlm_phrase.strip().lower():
        return vlm_phrase.strip()
    return new_value


def parse_propagation(graph: CausalGraph, target: Concept, new_value: str, answer: str) -> Intervention:
    """The one intervention of a propagation answer, with the user's target and value imposed."""
    items = [item for item in _intervention_items(answer) if isinstance(item, Mapping)]
    if not items:
        raise VLMOutputError('Expected {"interventions": [ one intervention object ]}.')
    on_target = [item for item in items if str(item.get("target_concept_id", "")).strip() in (target.id, target.name)]
    item = dict(on_target[0] if on_target else items[0])
    states = item.get("final_concept_states")
    states = dict(states) if isinstance(states, Mapping) else {}
    states[target.id] = _value_phrase(states.get(target.id), new_value)
    item.update(
        id=item.get("id") or "user_intervention",
        target_concept_id=target.id,
        target_concept_name=target.name,
        original_value=target.current_value,
        new_value=new_value,
        final_concept_states=states,
        intervention_description=item.get("intervention_description") or f"Set {target.name} to {new_value}.",
    )
    return check_intervention(graph, Intervention.from_dict(item))


def _user_target(graph: CausalGraph, target: str, new_value: str) -> tuple[Concept, str]:
    if not isinstance(new_value, str) or not new_value.strip():
        raise InputError("The intervention's new value is empty. Type the value the concept should take, e.g. 'black'.")
    concept = graph.find_concept(target)
    unchanged = no_change(concept, new_value)
    if unchanged:  # found before the VLM is asked
        raise InputError(unchanged)
    return concept, new_value.strip()


def propose_interventions(vlm: VLM, image: Image.Image, graph: CausalGraph, base_prompt: str | None = None, *,
                          max_attempts: int = DEFAULT_ATTEMPTS) -> list[Intervention]:
    """Three checked interventions on different concepts (one reaching many, one few, one none).

    Args:
        vlm: the backend.
        image: the factual image.
        graph: its causal graph.
        base_prompt: the prompt Y their generation prompts edit; None: the scene summary.
        max_attempts: questions asked before giving up on unusable answers.

    Returns:
        The interventions, each checked against ``graph``.

    Raises:
        VLMError: the backend failed.
        VLMOutputError: no three valid interventions within ``max_attempts``.
    """
    user = prompts.propose_user(graph, base_prompt or graph.scene_summary)
    return ask_until_valid(vlm, prompts.PROPOSE, user, [image], lambda answer: parse_proposals(graph, answer),
                           max_attempts=max_attempts)


def propagate_intervention(vlm: VLM, image: Image.Image, graph: CausalGraph, target: str, new_value: str, *,
                           base_prompt: str | None = None, max_attempts: int = DEFAULT_ATTEMPTS) -> Intervention:
    """do(target = new_value) as the user named it; the VLM only works out the descendants.

    The user's target and value win over whatever the VLM writes; changes outside De(target) are
    stripped into ``violations``.

    Args:
        vlm: the backend.
        image: the factual image.
        graph: its causal graph.
        target: the concept's id or name.
        new_value: its new value.
        base_prompt: the prompt Y the generation prompt edits; None: the scene summary.
        max_attempts: questions asked before giving up on unusable answers.

    Returns:
        The checked intervention.

    Raises:
        GraphError: ``target`` is not in the graph.
        InputError: ``new_value`` is empty or the target's current value.
        VLMError: the backend failed.
        VLMOutputError: no valid answer within ``max_attempts``.
    """
    concept, value = _user_target(graph, target, new_value)
    user = prompts.propagate_user(graph, base_prompt or graph.scene_summary, concept, value)
    return ask_until_valid(vlm, prompts.PROPAGATE, user, [image],
                           lambda answer: parse_propagation(graph, concept, value, answer), max_attempts=max_attempts)


def manual_intervention(graph: CausalGraph, target: str, new_value: str, *, generation_prompt: str = "",
                        intervention_id: str = "user_intervention") -> Intervention:
    """do(target = new_value) without a VLM: nothing is propagated, so CSG edits the target alone.

    Args:
        graph: the causal graph.
        target: the concept's id or name.
        new_value: its new value; also the target's guidance prompt, so a phrase such as "black hair"
            guides better than "black".
        generation_prompt: only needed by the full-prompt baselines.
        intervention_id: the intervention's id.

    Returns:
        The checked intervention.

    Raises:
        GraphError: ``target`` is not in the graph.
        InputError: ``new_value`` is empty or the target's current value.
    """
    concept, value = _user_target(graph, target, new_value)
    intervention = Intervention(
        id=intervention_id, target_concept_id=concept.id, target_concept_name=concept.name,
        intervention_description=f"Set {concept.name} to {value}.", original_value=concept.current_value,
        new_value=value, final_concept_states={concept.id: value}, generation_prompt=generation_prompt.strip())
    return check_intervention(graph, intervention)
