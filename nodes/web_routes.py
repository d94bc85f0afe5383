"""The pack's HTTP route: the graph editor in the frontend (web/) asks the server to check and lay out a
graph the user is editing, so the browser uses the same validation (``CausalGraph``) and the same layout
(``csg.render``) as the nodes, before anything runs.

    POST /causal_counterfactuals/graph_view   {"graph_json": "..."}
        -> {"view": csg.view.graph_view(graph)}   or   {"error": "why the graph is refused"}

A refused graph is an answer, not a failed request (status 200), so the browser logs no error for it.
A body that is not such a request gets 400 (413 over ``MAX_BODY_BYTES``) with {"error": "what is wrong"}.

ComfyUI answers every request on one event loop, and laying out the largest graph the limits allow takes
a few tenths of a second, so the layout runs on ``LAYOUT_WORKERS`` threads of its own. At most
``MAX_PENDING`` requests are laid out or wait for a thread; one more is answered at once with 503 and
``Retry-After``, so a flood of requests costs bounded memory and delay and the server stays answering.
A browser tab sends at most six requests at a time, so only many users at once, or a flood, meet that bound.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from ..csg.errors import GraphError
from ..csg.files import MAX_JSON_DEPTH, json_depth
from ..csg.graph import CausalGraph
from ..csg.view import graph_view

GRAPH_VIEW_ROUTE = "/causal_counterfactuals/graph_view"
LAYOUT_WORKERS = 2  # the layout holds the GIL most of the time: more threads would not lay out more per second
MAX_PENDING = 32  # requests laid out or waiting; the largest graphs take about 10 s to drain at this depth
RETRY_AFTER_S = 1
MAX_BODY_BYTES = 3 * 2**20  # a graph file may have 1 MiB (csg.cli.MAX_JSON_BYTES); escaping at most doubles it

USAGE = 'Send {"graph_json": "<the graph as JSON text>"}.'

_layout_threads = ThreadPoolExecutor(LAYOUT_WORKERS, thread_name_prefix="causal-graph-view")
_pending = asyncio.Semaphore(MAX_PENDING)  # only ever tested and taken at once, so it never waits


class _BadRequest(Exception):
    """A body that is not a graph view request: the HTTP status and what to tell the sender."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


def _error(message: str, status: int, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _too_large(size: str) -> _BadRequest:
    return _BadRequest(f"The request body has {size} bytes, more than the {MAX_BODY_BYTES // 2**20} MiB allowed; a "
                       "causal graph takes a few kB. " + USAGE, status=413)


def _read_json(text: str, what: str) -> object:
    """json.loads for the route: any failure is a ``_BadRequest`` naming the problem."""
    depth = json_depth(text)  # checked first, json.loads cannot overflow the stack
    if depth > MAX_JSON_DEPTH:
        raise _BadRequest(f"The {what} is nested {depth:,} levels deep, more than the {MAX_JSON_DEPTH} allowed. "
                          f"{USAGE}")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise _BadRequest(f"The {what} is not valid JSON ({exc.msg}: line {exc.lineno}, column {exc.colno}). "
                          f"{USAGE}") from None
    except ValueError as exc:  # an integer of more digits than Python converts
        raise _BadRequest(f"The {what} cannot be read: {str(exc).split(';')[0]}. {USAGE}") from None


def _graph_json_in(body: bytes) -> str:
    try:
        text = body.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _BadRequest(f"The request body is not UTF-8 text ({exc.reason} at byte {exc.start:,}). {USAGE}") from None
    if not text.strip():
        raise _BadRequest(f"The request body is empty. {USAGE}")
    request = _read_json(text, "request body")
    if not isinstance(request, dict):
        raise _BadRequest(f"The request body is a JSON {type(request).__name__}, not an object. {USAGE}")
    if "graph_json" not in request:
        raise _BadRequest(f"The request has no field 'graph_json'. {USAGE}")
    if not isinstance(request["graph_json"], str):
        raise _BadRequest(f"graph_json is a JSON {type(request['graph_json']).__name__}; it must be the graph as JSON "
                          f"text (a string). {USAGE}")
    return request["graph_json"]


def _answer(body: bytes) -> tuple[int, str]:
    """(status, JSON text) for a request body: on a layout thread, as it may take a while."""
    try:
        graph_json = _graph_json_in(body)
    except _BadRequest as refused:
        return refused.status, json.dumps({"error": str(refused)})
    try:
        graph = CausalGraph.from_json(graph_json)
    except GraphError as error:
        return 200, json.dumps({"error": str(error)})
    return 200, json.dumps({"view": graph_view(graph)})


async def _body(request: web.Request) -> bytes:
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise _too_large(f"{request.content_length:,}")  # refused before a byte of it is read
    chunks, size = [], 0
    async for chunk in request.content.iter_any():  # a chunked body has no length to check first
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large(f"over {MAX_BODY_BYTES:,}")
        chunks.append(chunk)
    return b"".join(chunks)


async def graph_view_route(request: web.Request) -> web.Response:
    try:
        body = await _body(request)
    except _BadRequest as refused:
        return _error(str(refused), refused.status)
    if _pending.locked():
        return _error(f"The server is already laying out or queueing {MAX_PENDING} graphs, the most it takes at once. "
                      f"Try again in {RETRY_AFTER_S} s.", 503, {"Retry-After": str(RETRY_AFTER_S)})
    async with _pending:
        status, text = await asyncio.get_running_loop().run_in_executor(_layout_threads, _answer, body)
    return web.Response(text=text, status=status, content_type="application/json")


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
