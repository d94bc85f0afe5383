"""The plan of an edit: which causal graph, which interventions, and the prompt the inversion is guided by.

One step for ``csg-counterfactual`` and ``csg-evaluate``: what the user wrote by hand is taken as it is,
and the VLM's stages fill in the rest (extract the graph, then propagate the user's ``do`` or propose
interventions). Every intervention is checked against the graph before it is returned.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .graph import CausalGraph, Intervention, check_intervention


@dataclass(frozen=True)
class Plan:
    graph: CausalGraph
    interventions: list[Intervention]  # checked against the graph
    source_prompt: str  # the caption the inversion is guided by


def pick_interventions(items: list, pick: int | None, source: str) -> list:
    """The ``pick``-th of ``items`` (1-based), or all of them for None; ``source`` says where they came from."""
    if pick is None:
        return list(items)
    if pick > len(items):
        raise InputError(f"--pick {pick}: {source} only {len(items)} intervention(s).")
    return [items[pick - 1]]


def needs_vlm(graph: CausalGraph | None, interventions: list | None) -> bool:
    return graph is None or interventions is None


def make_plan(vlm: Any, image, caption: str | None, graph: CausalGraph | None = None,
              interventions: list[Intervention] | None = None, do: tuple[str, str] | None = None,
              pick: int | None = None, log: Callable[[str], None] = lambda message: None) -> Plan:
    """The plan for ``image``: the hand-written ``graph`` and ``interventions`` where given, else the VLM's.

    ``caption`` is the inversion's prompt (None: the VLM's description, or the graph's scene summary);
    ``do`` is the user's (concept, value) for the VLM to propagate; ``pick`` chooses among the VLM's
    proposals (1-based, None for all). ``vlm`` may be None when ``needs_vlm`` says so."""
    from . import vlm as stages

    if graph is None:
        log("extracting the causal graph" + ("" if caption else " (after describing the scene)"))
        extraction = stages.extract_graph(vlm, image, caption)
        graph, caption = extraction.graph, extraction.base_prompt
    if interventions is None and do is not None:
        log(f"propagating do({do[0]} = {do[1]})")
        interventions = [stages.propagate_intervention(vlm, image, graph, do[0], do[1], base_prompt=caption)]
    elif interventions is None:
        log("proposing interventions")
        interventions = pick_interventions(stages.propose_interventions(vlm, image, graph, caption), pick,
                                           "the VLM proposed")
    source = caption if caption is not None else graph.scene_summary
    return Plan(graph, [check_intervention(graph, i) for i in interventions], source)
