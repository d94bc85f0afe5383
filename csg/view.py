"""What the ComfyUI frontend needs to draw a causal graph inside a node: plain JSON, no pixels.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

The layout is ``csg.render``'s, so a node's drawing and the PNG preview agree. The intervention
is passed through ``check_intervention`` first, so stripped changes arrive as ``violations``.
``descendants`` lets the frontend show, before anything runs, what an intervention on a concept
may change.
"""

from __future__ import annotations

from typing import Any

from .graph import CausalGraph, Intervention, check_intervention
from .render import layout_with_routes


def graph_view(graph: CausalGraph, intervention: Intervention | None = None) -> dict[str, Any]:
    """{"graph", "layout": {"concepts": {id: [x, row]}, "edges": [...]}, "descendants": {id: [ids]}, "intervention"}.

    x is in box widths from the left edge and row 0 is the top (see ``csg.render.layout_graph``).
    """
    positions, routes = layout_with_routes(graph)
    return {
        "graph": graph.to_dict(),
        "layout": {
            "concepts": {cid: list(position) for cid, position in positions.items()},
            "edges": [{**route, "waypoints": [list(point) for point in route["waypoints"]]} for route in routes],
        },
        "descendants": {cid: graph.descendants(cid) for cid in graph.ids},
        "intervention": check_intervention(graph, intervention).to_dict() if intervention else None,
    }
