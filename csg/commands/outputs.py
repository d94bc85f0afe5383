"""Where ``csg-counterfactual`` writes: the layout of its output folder, the plan saved before SDXL runs, and
the images, masks and report after it."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from ..output import make_folder, save_image, write_text
from ..plan import Plan


def log(message: str) -> None:
    print(f"csg-counterfactual: {message}", file=sys.stderr, flush=True)



@dataclass(frozen=True)
class ItemFiles:
    """Where one intervention's files go, and which intervention and concepts they belong to."""

    intervention_id: str
    folder: Path
    intervention: Path  # its intervention.json
    counterfactual: Path
    graph: Path  # the graph drawn with this intervention
    masks: tuple[tuple[str, Path], ...]  # (concept id, mask image), in the edit's order


@dataclass(frozen=True)
class OutputLayout:
    """Every path the command writes. Files are named by position, never after an id or name that a model or
    a file chose (an id ".." or "a/b" must not become a folder), so every path lies inside the output folder,
    no two items share one, and a rerun of the same plan writes the same paths. report.json maps each id to
    its files."""

    original: Path
    graph_json: Path
    report: Path
    items: tuple[ItemFiles, ...]


def output_layout(out: Path, items: Sequence[tuple[str, Sequence[str]]]) -> OutputLayout:
    """The layout for interventions given as (id, edit concept ids): a single one writes into ``out``, several
    into ``out/intervention_1``, ``out/intervention_2``, ...; masks are ``mask_1.png``, ``mask_2.png``, ... in
    the order of the edit's concepts."""
    several = len(items) > 1
    files = []
    for number, (intervention_id, concept_ids) in enumerate(items, start=1):
        folder = out / f"intervention_{number}" if several else out
        masks = tuple((concept_id, folder / f"mask_{k}.png") for k, concept_id in enumerate(concept_ids, start=1))
        files.append(ItemFiles(intervention_id, folder, folder / "intervention.json", folder / "counterfactual.png",
                               folder / "graph.png", masks))
    return OutputLayout(out / "original.png", out / "graph.json", out / "report.json", tuple(files))


def plan_layout(out: Path, plan: Plan) -> OutputLayout:
    return output_layout(out, [(i.id, [c.concept_id for c in i.edit_concepts(plan.graph)])
                               for i in plan.interventions])


def write_json(path: Path, text: str) -> None:
    # A lone surrogate (which a model can write as "\ud800") has no UTF-8 form; written back as that same
    # escape, the file stays valid JSON and reads back identically.
    write_text(path, text, errors="backslashreplace")


def save_plan(layout: OutputLayout, plan: Plan) -> None:
    """The graph and each intervention as JSON, before SDXL runs: an interrupted or failed edit keeps
    the VLM's work, and ``--graph-json`` / ``--intervention-json`` replay it without a VLM."""
    make_folder(layout.graph_json.parent)
    write_json(layout.graph_json, plan.graph.to_json())
    for files, intervention in zip(layout.items, plan.interventions):
        make_folder(files.folder)
        write_json(files.intervention, intervention.to_json())


def save_item(files: ItemFiles, result, graph, intervention) -> dict:
    """The counterfactual, the graph with its intervention, and one mask per edited concept; the report's
    record of where they went."""
    from ..render import render_graph

    save_image(result.image, files.counterfactual)
    save_image(render_graph(graph, intervention), files.graph)
    masks = [(concept_id, path) for concept_id, path in files.masks
             if concept_id in getattr(result, "masks", {})]  # the baselines have no masks
    for concept_id, path in masks:
        save_image(result.mask_image(concept_id), path)
    return {"folder": str(files.folder), "intervention": str(files.intervention),
            "counterfactual": str(files.counterfactual), "graph": str(files.graph),
            "masks": [{"concept_id": concept_id, "file": str(path)} for concept_id, path in masks]}


def write_outputs(layout: OutputLayout, plan: Plan, results: list, report_fields: dict) -> Path:
    """Images, masks and graph per intervention (a sub-folder each when there are several), and the report."""
    save_image(results[0].source_image, layout.original)
    entries = []
    for files, intervention, result in zip(layout.items, plan.interventions, results):
        entries.append({
            "intervention": intervention.to_dict(),
            "stripped_changes": [v.to_dict() for v in intervention.violations],
            "edit_concepts": [asdict(c) for c in intervention.edit_concepts(plan.graph)],
            "files": save_item(files, result, plan.graph, intervention),
        })
        for v in intervention.violations:
            log(f"note: {intervention.id!r}: dropped the change {v.concept_id!r} -> {v.new_value!r}: {v.problem}")
    report = {
        "original": str(layout.original),
        "edited_size": list(results[0].source_image.size),
        "source_prompt": plan.source_prompt,
        "graph": plan.graph.to_dict(),
        "interventions": entries,
        **report_fields,
    }
    write_json(layout.report, json.dumps(report, indent=2, ensure_ascii=False))
    return layout.report
