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


def completion(text: str, model: str = "test-vlm") -> Reply:
    """A 200 reply in the chat-completions shape carrying ``text`` as the assistant's answer."""
    body = {"id": "cmpl-test", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}]}
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
