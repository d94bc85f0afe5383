"""A real HTTP server on 127.0.0.1 that plays an OpenAI-compatible VLM for the tests.

It records every request (path, headers, JSON body) and answers with whatever the test's
``responder`` returns for it, optionally after a delay, so tests can exercise good answers,
HTTP errors, malformed bodies and timeouts through the real urllib client. A ``Reply`` can also
misbehave below HTTP: send raw bytes that are no valid response, trickle its bytes one by one,
or end the connection with a TCP reset.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON payload

    @property
    def messages(self) -> list[dict]:
        return self.body["messages"]

    def text(self) -> str:
        """All text of the conversation, to route a request to the right canned answer."""
        parts = []
        for message in self.messages:
            content = message["content"]
            if isinstance(content, str):
                parts.append(content)
            else:
                parts += [p["text"] for p in content if p.get("type") == "text"]
        return "\n".join(parts)

    def image_urls(self) -> list[str]:
        return [p["image_url"]["url"] for m in self.messages if isinstance(m["content"], list)
                for p in m["content"] if p.get("type") == "image_url"]


@dataclass
class Reply:
    status: int = 200
    body: str | bytes = ""
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=lambda: {"Content-Type": "application/json"})
    raw: bytes | None = None  # sent as it is instead of status, headers and body: garbage, lying lengths
    trickle: float = 0.0  # seconds between the single bytes of the reply, from byte ``trickle_from`` on
    trickle_from: int = 0
    reset: bool = False  # end with a TCP reset instead of a close, as a crashing server does

    def wire_bytes(self) -> bytes:
        """The reply as it goes onto the socket."""
        if self.raw is not None:
            return self.raw
        body = self.body.encode() if isinstance(self.body, str) else self.body
        head = [f"HTTP/1.0 {self.status} {HTTPStatus(self.status).phrase}",
                *(f"{key}: {value}" for key, value in self.headers.items()), f"Content-Length: {len(body)}"]
        return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


def completion(text: str | None, model: str = "test-vlm", reasoning: dict[str, str] | None = None,
               finish_reason: str = "stop") -> Reply:
    """A 200 reply in the chat-completions shape carrying ``text`` as the assistant's answer, and the model's
    thoughts in the message fields ``reasoning`` names (``{"reasoning_content": "..."}``)."""
    message = {"role": "assistant", "content": text, **(reasoning or {})}
    body = {"id": "cmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": finish_reason, "message": message}]}
    return Reply(body=json.dumps(body))


class VLMServer:
    """``with VLMServer(responder) as server:`` serves on ``server.base_url`` until the block ends."""

    def __init__(self, responder: Callable[[Request], Reply]):
        self.responder = responder
        self.requests: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length", 0))
                raw = self.rfile.read(length)
                request = Request(self.path, dict(self.headers.items()), json.loads(raw))
                server.requests.append(request)
                reply = server.responder(request)
                if reply.delay:
                    time.sleep(reply.delay)
                data = reply.wire_bytes()
                try:
                    if not reply.trickle:
                        self.wfile.write(data)
                    else:
                        self.wfile.write(data[:reply.trickle_from])
                        for index in range(reply.trickle_from, len(data)):
                            time.sleep(reply.trickle)
                            self.wfile.write(data[index:index + 1])
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client gave up (a timeout test); nothing to answer
                if reply.reset:  # a zero linger time makes close() send RST instead of FIN
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def __enter__(self) -> VLMServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# -- how real servers take a response_format ----------------------------------------------------------
# Each persona answers with ``answer(request)`` when it takes the request's response_format, and refuses
# the forms it lacks the way that server does (status and body as its source or docs give them).

Answer = Callable[[Request], str]


def _error(status: int, body: dict) -> Reply:
    return Reply(status=status, body=json.dumps(body))


def _requested_form(request: Request) -> str:
    """"schema", "json" or "off": what the request's response_format asks for."""
    kind = (request.body.get("response_format") or {}).get("type", "text")
    return {"json_schema": "schema", "json_object": "json"}.get(kind, "off")


def vllm(answer: Answer, *, supports_schema: bool = True, reasoning: str = "") -> Callable[[Request], Reply]:
    """vLLM: takes json_schema and json_object. Before it knew json_schema, its pydantic model refused it with a 400
    (ErrorResponse: object "error", type "BadRequestError"). With a reasoning parser the thoughts come in
    ``reasoning_content`` and the schema holds the content only."""
    def respond(request: Request) -> Reply:
        if _requested_form(request) == "schema" and not supports_schema:
            detail = [{"type": "literal_error", "loc": ["body", "response_format", "type"],
                       "msg": "Input should be 'text' or 'json_object'", "input": "json_schema"}]
            return _error(400, {"object": "error", "message": str(detail), "type": "BadRequestError", "param": None,
                                "code": 400})
        return completion(answer(request), reasoning={"reasoning_content": reasoning} if reasoning else None)
    return respond


def llama_cpp(answer: Answer, *, supports_schema: bool = True) -> Callable[[Request], Reply]:
    """llama.cpp's llama-server: takes json_object and json_schema (each turned into a grammar). Builds before its
    json_schema support threw 'response_format type must be one of "text" or "json_object"', answered as HTTP 500
    with type "server_error"."""
    def respond(request: Request) -> Reply:
        if _requested_form(request) == "schema" and not supports_schema:
            message = 'response_format type must be one of "text" or "json_object", but got: json_schema'
            return _error(500, {"error": {"code": 500, "message": message, "type": "server_error"}})
        return completion(answer(request))
    return respond


def ollama(answer: Answer, *, thinking: str = "") -> Callable[[Request], Reply]:
    """Ollama's /v1 endpoint: json_schema becomes its ``format`` schema and json_object its ``format: "json"``.
    Versions before structured outputs knew only json_object and silently ignored any other type, answering
    freely (``answer`` then gives the free answer). With think on, the thoughts come in ``thinking``."""
    def respond(request: Request) -> Reply:
        return completion(answer(request), reasoning={"thinking": thinking} if thinking else None)
    return respond


def lm_studio(answer: Answer) -> Callable[[Request], Reply]:
    """LM Studio: takes json_schema (and text); json_object is a 400 whose "error" is a bare string."""
    def respond(request: Request) -> Reply:
        if _requested_form(request) == "json":
            return _error(400, {"error": "'response_format.type' must be 'json_schema' or 'text'"})
        return completion(answer(request))
    return respond


def openai(answer: Answer, *, supports_schema: bool = True, supports_json: bool = True) -> Callable[[Request], Reply]:
    """OpenAI: json_schema on the models that have Structured Outputs; with ``strict`` the schema must close every
    object (additionalProperties false, every property required) or the request is a 400 naming it. Other models
    refuse the type with "Invalid parameter: 'response_format' of type ... is not supported with this model"."""
    def refuse(message: str) -> Reply:
        return _error(400, {"error": {"message": message, "type": "invalid_request_error", "param": "response_format",
                                      "code": None}})

    def respond(request: Request) -> Reply:
        form = _requested_form(request)
        if (form == "schema" and not supports_schema) or (form == "json" and not supports_json):
            kind = request.body["response_format"]["type"]
            return refuse(f"Invalid parameter: 'response_format' of type '{kind}' is not supported with this model.")
        if form == "schema":
            spec = request.body["response_format"]["json_schema"]
            problem = _not_strict(spec["schema"], ()) if spec.get("strict") else None
            if problem:
                return refuse(f"Invalid schema for response_format '{spec['name']}': {problem}")
        return completion(answer(request))
    return respond


def _not_strict(schema: dict, context: tuple) -> str | None:
    """Where a schema breaks OpenAI's strict rules, worded as OpenAI words it; None when it keeps them."""
    if schema.get("type") == "object":
        if schema.get("additionalProperties") is not False:
            return f"In context={context}, 'additionalProperties' is required to be supplied and to be false."
        missing = [name for name in schema.get("properties", {}) if name not in schema.get("required", [])]
        if missing:
            return (f"In context={context}, 'required' is required to be supplied and to be an array including "
                    f"every key in properties. Missing '{missing[0]}'.")
        for name, value in schema["properties"].items():
            problem = _not_strict(value, (*context, "properties", name))
            if problem:
                return problem
    if schema.get("type") == "array":
        return _not_strict(schema["items"], (*context, "items"))
    for keyword in ("minLength", "maxLength", "maxProperties"):
        if keyword in schema:
            return f"In context={context}, '{keyword}' is not permitted."
    return None
