"""The graph editor's route (nodes/web_routes.py) in a real ComfyUI server on 127.0.0.1.

Every hostile body gets a 4xx naming the problem, never a 500; a flood of the largest graphs the limits allow
is laid out off ComfyUI's event loop, a bounded number at once, while the server keeps answering.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from csg.graph import MAX_CONCEPTS
from csg.view import graph_view
from tests.comfyui.browser import running_comfyui
from tests.test_render import largest_graph, make_graph

FLOOD = 50  # requests at once, each the largest graph the limits allow
PING_EVERY_S = 0.1
ROUTE = "/causal_counterfactuals/graph_view"  # what web/causal_graph.js asks


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_comfyui(tmp_path_factory.mktemp("comfyui-base")) as url:
        yield url


@pytest.fixture(scope="module")
def routes(comfyui):
    return comfyui.pack_module("nodes.web_routes")


def post(server, body, headers=None):
    """(status, headers, the answer's JSON text) of one request to the route."""
    request = urllib.request.Request(server + ROUTE, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, answer.headers, answer.read()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers, error.read()


def request_for(graph_json):
    return json.dumps({"graph_json": graph_json}).encode()


def test_a_graph_is_checked_and_laid_out(server):
    graph = make_graph(3, [(0, 1), (1, 2)])
    status, _, answer = post(server, request_for(graph.to_json()))
    assert status == 200
    assert json.loads(answer)["view"] == graph_view(graph)
    status, _, answer = post(server, request_for('{"concepts": [{"id": "c1"}]}'))
    assert (status, json.loads(answer)) == (200, {"error": "concept 'c1' is missing the field 'name'. Add it as a "
                                                           "string."}), "a refused graph is an answer"


DEEP = "[" * 100_000 + "]" * 100_000
HOSTILE = {
    "nested 100,000 deep": (DEEP, "is nested 100,000 levels deep, more than the"),
    "nested inside the request": ('{"graph_json": ' + DEEP + "}", "is nested 100,001 levels deep"),
    "not JSON": ("graph_json=c1", "is not valid JSON (Expecting value: line 1, column 1)"),
    "cut off": ('{"graph_json": "{\\"concepts', "is not valid JSON (Unterminated string"),
    "not UTF-8": (b'{"graph_json": "\xff"}', "is not UTF-8 text (invalid start byte at byte 16)"),
    "empty": ("", "The request body is empty"),
    "a list": ("[1, 2]", "is a JSON list, not an object"),
    "a string": ('"{}"', "is a JSON str, not an object"),
    "no graph_json": ('{"graph": "{}"}', "has no field 'graph_json'"),
    "the graph as an object": ('{"graph_json": {"concepts": []}}', "graph_json is a JSON dict; it must be the graph"),
    "graph_json null": ('{"graph_json": null}', "graph_json is a JSON NoneType"),
    "a 5,000-digit number": ('{"graph_json": "{}", "n": ' + "7" * 5000 + "}", "cannot be read: Exceeds the limit"),
}


@pytest.mark.parametrize("body, problem", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_body_that_is_not_a_request_gets_400_naming_the_problem(server, body, problem):
    status, headers, answer = post(server, body if isinstance(body, bytes) else body.encode())
    assert (status, headers["Content-Type"]) == (400, "application/json; charset=utf-8")
    message = json.loads(answer)["error"]
    assert problem in message
    assert message.endswith('Send {"graph_json": "<the graph as JSON text>"}.'), "it says what to send"


def test_a_graph_nested_100000_deep_is_refused_as_a_graph(server, routes):
    status, _, answer = post(server, request_for(DEEP))
    expected = (f"The graph JSON is nested too deeply (100,000 levels; at most {routes.MAX_JSON_DEPTH} are allowed, "
                "and a graph needs 4). Fix the brackets.")
    assert (status, json.loads(answer)) == (200, {"error": expected})


def test_a_body_over_the_limit_gets_413_unread(server, routes):
    address = urllib.parse.urlsplit(server)
    connection = http.client.HTTPConnection(address.hostname, address.port, timeout=30)
    connection.putrequest("POST", ROUTE)
    connection.putheader("Content-Length", str(10 * 2**30))  # announced, never sent
    connection.endheaders()
    answer = connection.getresponse()
    assert answer.status == 413
    assert json.loads(answer.read())["error"].startswith(
        f"The request body has 10,737,418,240 bytes, more than the {routes.MAX_BODY_BYTES // 2**20} MiB allowed; a "
        "causal graph takes a few kB.")
    connection.close()
    chunks = (b" " * 2**16 for _ in range(routes.MAX_BODY_BYTES // 2**16 + 1))  # chunked: no length to check first
    status, _, answer = post(server, chunks)
    assert status == 413
    assert json.loads(answer)["error"].startswith(f"The request body has over {routes.MAX_BODY_BYTES:,} bytes")


def test_a_flood_of_the_largest_graphs_leaves_the_server_answering(server, routes):
    """The issue's load test: while 50 requests with the largest graph run, /system_stats answers within 1 s."""
    graph = largest_graph()
    body = request_for(graph.to_json())
    pings = []
    with ThreadPoolExecutor(FLOOD) as clients:
        started = time.monotonic()
        flood = [clients.submit(post, server, body) for _ in range(FLOOD)]
        while not all(request.done() for request in flood):
            sent = time.monotonic()
            with urllib.request.urlopen(f"{server}/system_stats", timeout=30) as answer:
                assert answer.status == 200
            pings.append(time.monotonic() - sent)
            time.sleep(PING_EVERY_S)
        answers = [request.result() for request in flood]
    took = time.monotonic() - started
    laid_out = [json.loads(answer)["view"] for status, _, answer in answers if status == 200]
    busy = [(headers["Retry-After"], json.loads(answer)["error"]) for status, headers, answer in answers
            if status == 503]
    print(f"\n{FLOOD} requests of the largest graph: {len(laid_out)} laid out, {len(busy)} refused as busy, in "
          f"{took:.1f} s; {len(pings)} pings of /system_stats meanwhile, the slowest {max(pings):.3f} s")
    assert len(laid_out) + len(busy) == FLOOD, "every request is laid out or refused as busy, none fails"
    assert len(laid_out) >= routes.MAX_PENDING, "as many as the route queues are laid out"
    assert all(len(view["layout"]["concepts"]) == MAX_CONCEPTS for view in laid_out)
    assert set(busy) <= {("1", f"The server is already laying out or queueing {routes.MAX_PENDING} graphs, the most it "
                               "takes at once. Try again in 1 s.")}
    assert len(pings) >= 5, "the flood lasted long enough to ping the server several times"
    assert max(pings) < 1.0, f"/system_stats waited {max(pings):.2f} s behind the layouts"
    status, _, answer = post(server, body)
    assert status == 200 and "view" in json.loads(answer), "after the flood the route lays out again"
