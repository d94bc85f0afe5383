"""Any server that speaks the OpenAI chat-completions API: vLLM, Ollama, LM Studio, llama-server, ...

Only the standard library is used. URL rule: a base URL ending in ``/chat/completions`` is used as
is; a bare host (no path) gets ``/v1/chat/completions``; any other path gets ``/chat/completions``
appended. So ``http://127.0.0.1:8000`` and ``http://127.0.0.1:8000/v1`` reach the same endpoint,
and provider paths such as ``https://host/openai/v1`` keep their prefix.

The API key, when needed, is read from an environment variable whose *name* is given
(``api_key_env="OPENAI_API_KEY"``), at request time. The key goes only into the Authorization
header: never into ``repr``, ``identity`` (the cache key), log lines or error messages.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Sequence
from urllib.parse import urlsplit, urlunsplit

from PIL import Image

from ..errors import InputError, VLMError
from .parsing import quote
from .protocol import MAX_IMAGE_SIDE, Turn, prepare_image

log = logging.getLogger("csg.vlm")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # worth asking again; other errors are final
BODY_QUOTE_LIMIT = 400


def chat_completions_url(base_url: str) -> str:
    """The endpoint for a user-given base URL, by the rule in the module docstring."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise InputError("The VLM server URL is empty. Give its base URL, e.g. http://127.0.0.1:8000/v1.")
    parts = urlsplit(base_url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InputError(f"The VLM server URL {redact_url(base_url)!r} is not an http(s) URL. "
                         "Give it like http://127.0.0.1:8000/v1.")
    path = parts.path.rstrip("/")
    if not path.endswith("/chat/completions"):
        path = (path or "/v1") + "/chat/completions"
    return urlunsplit((parts.scheme, parts.netloc, path, parts.query, ""))


def redact_url(url: str) -> str:
    """A URL without user-info, query or fragment, the places where credentials hide."""
    parts = urlsplit(url.strip())
    host = parts.hostname or ""
    if parts.port:
        host += f":{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def image_data_url(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def chat_messages(system: str, turns: Sequence[Turn], images: Sequence[Image.Image], max_side: int | None) -> list[dict]:
    """OpenAI chat messages; the images ride on the first user turn, before its text."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    pictures = [{"type": "image_url", "image_url": {"url": image_data_url(prepare_image(i, max_side))}} for i in images]
    for turn in turns:
        if turn.role == "user" and pictures:
            messages.append({"role": "user", "content": [*pictures, {"type": "text", "text": turn.text}]})
            pictures = []
        else:
            messages.append({"role": turn.role, "content": turn.text})
    return messages


class OpenAICompatibleVLM:
    """A VLM behind an OpenAI-compatible ``/chat/completions`` endpoint.

    ``timeout`` bounds one HTTP exchange (seconds). Refused connections, timeouts and the statuses
    in ``RETRY_STATUSES`` are tried ``retries`` more times, waiting ``backoff``, 2·``backoff``, ...
    seconds in between. There is deliberately no way to pass the key's value: only the name of the
    environment variable that holds it, so no workflow, cache or log can ever contain it.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout: float = 300.0,
                 retries: int = 2, backoff: float = 1.0, max_image_side: int | None = MAX_IMAGE_SIDE):
        if not isinstance(model, str) or not model.strip():
            raise InputError("The VLM model name is empty. Give the name the server serves (see its /v1/models).")
        if timeout <= 0 or retries < 0 or backoff < 0:
            raise InputError(f"timeout must be > 0 and retries, backoff >= 0 (got {timeout}, {retries}, {backoff}).")
        self._endpoint = chat_completions_url(base_url)
        self.url = redact_url(self._endpoint)
        self.model = model.strip()
        self.api_key_env = api_key_env or None
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_image_side = max_image_side

    def __repr__(self) -> str:
        return f"OpenAICompatibleVLM(url={self.url!r}, model={self.model!r}, api_key_env={self.api_key_env!r})"

    @property
    def identity(self) -> str:
        return f"openai:{self.url}:{self.model}"

    # -- secrets ----------------------------------------------------------------------------------

    def _key(self) -> str | None:
        if not self.api_key_env:
            return None
        key = os.environ.get(self.api_key_env, "").strip()
        if not key:
            raise InputError(f"The environment variable {self.api_key_env} that should hold the VLM server's API key "
                             "is not set. Set it before starting, or leave api_key_env empty for servers without a key.")
        return key

    def _redact(self, text: str) -> str:
        """Mask the key wherever a server echoed it back (some error pages quote request headers)."""
        secret = os.environ.get(self.api_key_env, "").strip() if self.api_key_env else ""
        return text.replace(secret, "***") if secret else text

    # -- the request ------------------------------------------------------------------------------

    def generate(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *,
                 temperature: float, max_tokens: int) -> str:
        payload = {
            "model": self.model,
            "messages": chat_messages(system, turns, images, self.max_image_side),
            "temperature": float(temperature),
            "max_tokens": int(max_tokens),
            "stream": False,
        }
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        log.debug("POST %s model=%s images=%d temperature=%s max_tokens=%d", self.url, self.model, len(images),
                  temperature, max_tokens)
        body = self._post(json.dumps(payload).encode("utf-8"), headers)
        return self._answer_text(body)

    def _post(self, data: bytes, headers: dict[str, str]) -> bytes:
        """POST with bounded retries; returns the 200 body or raises VLMError."""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self._endpoint, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return response.read()
            except urllib.error.HTTPError as exc:
                body = exc.read().decode("utf-8", errors="replace")
                problem = f"answered HTTP {exc.code} {exc.reason}: {quote(self._redact(body), BODY_QUOTE_LIMIT)}"
                final = exc.code not in RETRY_STATUSES
                hint = self._status_hint(exc.code)
            except (urllib.error.URLError, TimeoutError, socket.timeout, ConnectionError) as exc:
                reason = getattr(exc, "reason", exc)
                final = False
                if isinstance(reason, (TimeoutError, socket.timeout)):
                    problem = f"did not answer within {self.timeout:g} s"
                    hint = "It may still be loading the model, or the answer is long: raise the timeout."
                else:
                    problem = f"is not reachable ({self._redact(str(reason))})"
                    hint = "Start the server or fix the URL."
            if final or attempt == self.retries:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise VLMError(f"The VLM server at {self.url} {problem}{tries}. {hint}") from None
            delay = self.backoff * 2 ** attempt
            log.warning("VLM server at %s %s; retrying in %.2g s", self.url, problem, delay)
            time.sleep(delay)
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _status_hint(self, status: int) -> str:
        if status in (401, 403):
            where = f"the environment variable {self.api_key_env}" if self.api_key_env else "api_key_env"
            return f"Check the API key in {where}."
        if status == 404:
            return f"Check the URL (the endpoint was {self.url}) and that the server serves the model {self.model!r}."
        if status in RETRY_STATUSES:
            return "The server failed; look at its log."
        return "Check the model name and the server's limits (image size, max_tokens)."

    def _answer_text(self, body: bytes) -> str:
        text = body.decode("utf-8", errors="replace")
        malformed = f"The VLM server at {self.url} sent a response that is not a chat completion"
        try:
            data = json.loads(text)
        except ValueError:
            raise VLMError(f"{malformed} (not JSON): {quote(self._redact(text), BODY_QUOTE_LIMIT)}. "
                           "Check that the URL points at an OpenAI-compatible API.") from None
        try:
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise VLMError(f"{malformed} (no choices[0].message.content): {quote(self._redact(text), BODY_QUOTE_LIMIT)}.") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str) or not content.strip():
            finish = choice.get("finish_reason") if isinstance(choice, dict) else None
            raise VLMError(f"The VLM server at {self.url} returned no text (finish_reason={finish!r}). "
                           "If it is a reasoning model, turn its thinking mode off (e.g. a non-thinking "
                           "variant or the server's reasoning switch): each stage has a fixed token budget that "
                           "long reasoning can use up.")
        return content
