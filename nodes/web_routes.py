"""The pack's HTTP route: the graph editor in the frontend (web/) asks the server to check and lay out a
graph the user is editing, so the browser uses the same validation (``CausalGraph``) and the same layout
(``csg.render``) as the nodes, before anything runs.

    POST /causal_counterfactuals/graph_view   {"graph_json": "..."}
        -> {"view": csg.view.graph_view(graph)}   or   {"error": "why the graph is refused"}

A refused graph is an answer, not a failed request (status 200), so the browser logs no error for it.
"""

from __future__ import annotations

import logging
import sys

from aiohttp import web

from ..csg.errors import GraphError
from ..csg.graph import CausalGraph
from ..csg.view import graph_view

GRAPH_VIEW_ROUTE = "/causal_counterfactuals/graph_view"


async def graph_view_route(request: web.Request) -> web.Response:
    try:
        body = await request.json()
        graph_json = body["graph_json"]
    except (ValueError, KeyError, TypeError):
        return web.json_response({"error": 'Send {"graph_json": "<the graph as JSON text>"}.'}, status=400)
    if not isinstance(graph_json, str):
        return web.json_response({"error": "graph_json must be the graph as JSON text."}, status=400)
    try:
        graph = CausalGraph.from_json(graph_json)
    except GraphError as error:
        return web.json_response({"error": str(error)})
    return web.json_response({"view": graph_view(graph)})


def register_routes() -> None:
    """Add the route to ComfyUI's server. A headless executor (scripts, the test harness) has no server.

    ComfyUI's main.py imports its ``server`` module and creates the PromptServer before it loads custom
    nodes; importing ``server`` here ourselves would start pulling in the web app where there is none.
    """
    server_module = sys.modules.get("server")
    server = getattr(getattr(server_module, "PromptServer", None), "instance", None)
    if server is None:
        logging.debug("causal counterfactuals: no PromptServer, so the graph editor's route is not registered")
        return
    server.routes.post(GRAPH_VIEW_ROUTE)(graph_view_route)
