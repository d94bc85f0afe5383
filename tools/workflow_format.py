"""The workflow a user saves from ComfyUI's frontend, turned into the API prompt the backend executes.

A saved workflow lists nodes with their widget values in *widget order* (``widgets_values``) and
the links between sockets; the backend wants ``{node_id: {"class_type", "inputs": {name: value or
[origin_id, slot]}}}``. The frontend does this translation in ``graphToPrompt``; we redo it from
the node definitions (``INPUT_TYPES``), following what frontend 1.27 does:

- widgets are the widget-typed inputs (INT, FLOAT, STRING, BOOLEAN, COMBO), required then
  optional, in declaration order, except ``forceInput`` ones;
- an INT with ``control_after_generate`` (by default any INT named ``seed`` or ``noise_seed``) and a
  COMBO with ``control_after_generate`` are followed by the hidden "control after generate" value
  ("fixed", "randomize", ...), which is saved but never sent;
- a COMBO with an upload option (LoadImage's ``image_upload``) is followed by its upload button,
  saved but never sent;
- a widget converted to a socket keeps its saved value, but a link into it wins;
- Note, MarkdownNote and PrimitiveNode exist only in the frontend; a PrimitiveNode's value goes
  to the widgets it feeds; a legacy Reroute node passes its link through;
- muted nodes (mode 2) are dropped; a bypassed node (mode 4) passes, for each output, the input
  of the same type (same slot first) through, as the frontend does; a link from a dropped node
  is dropped.

Subgraphs and legacy group nodes are not translated: they raise ``WorkflowFormatError``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_OPTIONS = ("image_upload", "video_upload", "animated_image_upload")
SEED_NAMES = ("seed", "noise_seed")
MODE_MUTED, MODE_BYPASSED = 2, 4
NOTE_TYPES = {"Note", "MarkdownNote"}
PRIMITIVE, REROUTE = "PrimitiveNode", "Reroute"
FRONTEND_ONLY = NOTE_TYPES | {PRIMITIVE, REROUTE}


class WorkflowFormatError(ValueError):
    """The workflow cannot be translated; the message names the node and the problem."""


@dataclass(frozen=True)
class Widget:
    name: str | None  # the input it sets; None for a saved-but-never-sent companion widget


def input_entries(input_types: Mapping[str, Any]) -> list[tuple[str, Any, dict]]:
    entries = []
    for section in ("required", "optional"):
        for name, spec in (input_types.get(section) or {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], Mapping) else {}
            entries.append((name, kind, dict(options)))
    return entries


def widget_layout(input_types: Mapping[str, Any]) -> list[Widget]:
    """The node's widgets in the order the frontend creates them (and saves their values)."""
    widgets: list[Widget] = []
    for name, kind, options in input_entries(input_types):
        is_combo = isinstance(kind, (list, tuple)) or kind == "COMBO"
        if options.get("forceInput") or not (is_combo or kind in WIDGET_TYPES):
            continue
        widgets.append(Widget(name))
        if kind == "INT" and options.get("control_after_generate", name in SEED_NAMES):
            widgets.append(Widget(None))
        elif is_combo and options.get("control_after_generate"):
            widgets.append(Widget(None))
        if is_combo and any(options.get(upload) for upload in UPLOAD_OPTIONS):
            widgets.append(Widget(None))
    return widgets


def _links(workflow: Mapping[str, Any]) -> dict[int, tuple[int, int]]:
    """link id -> (origin node id, origin slot); links are saved as lists (0.4) or objects (1.0)."""
    found = {}
    for link in workflow.get("links") or []:
        if isinstance(link, Mapping):
            found[int(link["id"])] = (int(link["origin_id"]), int(link["origin_slot"]))
        else:
            link_id, origin, slot = link[:3]
            found[int(link_id)] = (int(origin), int(slot))
    return found


def _widget_values(node: Mapping[str, Any], layout: list[Widget]) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        values = []
    if isinstance(values, Mapping):  # some nodes save their widgets by name
        return {w.name: values[w.name] for w in layout if w.name is not None and w.name in values}
    if len(values) != len(layout):
        expected = [w.name or "(control/upload)" for w in layout]
        raise WorkflowFormatError(
            f"Node {node['id']} ({node['type']}) saves {len(values)} widget values {values!r}, but its definition "
            f"has {len(layout)} widgets {expected}. Re-save the workflow with this version of the pack.")
    return {w.name: v for w, v in zip(layout, values) if w.name is not None}


def _sent_value(value: Any) -> Any:
    """A list widget value travels wrapped, since a bare two-item list means a link."""
    return {"__value__": value} if isinstance(value, list) else value


def workflow_to_prompt(workflow: Mapping[str, Any], input_types: Callable[[str], Mapping[str, Any] | None]) -> dict:
    """The API prompt for a saved UI workflow.

    ``input_types(class_type)`` returns the node's ``INPUT_TYPES()`` or None when no such node is
    installed (e.g. ``lambda t: nodes.NODE_CLASS_MAPPINGS[t].INPUT_TYPES()`` guarded for absence).
    """
    if not isinstance(workflow, Mapping) or "nodes" not in workflow:
        raise WorkflowFormatError("Not a saved UI workflow: expected an object with 'nodes' and 'links'.")
    if (workflow.get("definitions") or {}).get("subgraphs") or (workflow.get("extra") or {}).get("groupNodes"):
        raise WorkflowFormatError("The workflow uses subgraphs or group nodes, which this converter does not expand. "
                                  "Unpack them in the frontend and save again.")
    by_id = {int(n["id"]): n for n in workflow["nodes"]}
    links = _links(workflow)

    def origin_of(link_id: int | None, wanted_type: str | None, seen: frozenset = frozenset()) -> Any:
        """What a link delivers: [origin_id, slot], a PrimitiveNode's value, or None (dropped)."""
        if link_id is None or int(link_id) not in links:
            return None
        origin_id, slot = links[int(link_id)]
        if origin_id in seen:
            raise WorkflowFormatError(f"Links loop through node {origin_id}.")
        origin = by_id.get(origin_id)
        if origin is None:
            return None
        seen = seen | {origin_id}
        if origin["type"] == PRIMITIVE:
            values = origin.get("widgets_values") or [None]
            return _sent_value(values[0])
        if origin["type"] == REROUTE:
            inputs = origin.get("inputs") or [{}]
            return origin_of(inputs[0].get("link"), wanted_type, seen)
        if origin.get("mode") == MODE_MUTED:
            return None
        if origin.get("mode") == MODE_BYPASSED:
            inputs = origin.get("inputs") or []
            output_type = (origin.get("outputs") or [{}] * (slot + 1))[slot].get("type", wanted_type)
            for index in [slot, *range(len(inputs))]:
                if index < len(inputs) and inputs[index].get("type") == output_type:
                    return origin_of(inputs[index].get("link"), output_type, seen)
            return None
        return [str(origin_id), slot]

    prompt: dict[str, dict] = {}
    for node_id, node in by_id.items():
        class_type = node["type"]
        if class_type in FRONTEND_ONLY or node.get("mode") in (MODE_MUTED, MODE_BYPASSED):
            continue
        types = input_types(class_type)
        if types is None:
            raise WorkflowFormatError(f"Node {node_id} has type '{class_type}', which is not installed.")
        inputs = {name: _sent_value(value) for name, value in _widget_values(node, widget_layout(types)).items()}
        for socket in node.get("inputs") or []:
            if socket.get("link") is None:
                continue
            delivered = origin_of(socket["link"], socket.get("type"))
            if delivered is None:
                inputs.pop(socket["name"], None)
            else:
                inputs[socket["name"]] = delivered
        prompt[str(node_id)] = {"class_type": class_type, "inputs": inputs,
                                "_meta": {"title": node.get("title") or class_type}}
    return prompt


def set_widgets(workflow: Mapping[str, Any], class_type: str, values: Mapping[str, Any],
                input_types: Callable[[str], Mapping[str, Any] | None]) -> dict:
    """A copy of ``workflow`` with the named widgets of every ``class_type`` node set.

    For tests that run a shipped workflow on their own files, e.g. ``{"ckpt_name": <test checkpoint>}``
    on CheckpointLoaderSimple.
    """
    types = input_types(class_type)
    if types is None:
        raise WorkflowFormatError(f"'{class_type}' is not installed.")
    position = {w.name: i for i, w in enumerate(widget_layout(types)) if w.name is not None}
    unknown = set(values) - set(position)
    if unknown:
        raise WorkflowFormatError(f"{class_type} has no widgets {sorted(unknown)}; it has {sorted(position)}.")
    edited = copy.deepcopy(dict(workflow))
    for node in edited["nodes"]:
        if node["type"] != class_type:
            continue
        saved = node.setdefault("widgets_values", [])
        for name, value in values.items():
            if isinstance(saved, dict):
                saved[name] = value
            else:
                saved[position[name]] = value
    return edited
