"""Any server that speaks the OpenAI chat-completions API: vLLM, Ollama, LM Studio, llama-server, ...

Only the standard library is used. URL rule: a base URL ending in ``/chat/completions`` is used as
is; a bare host (no path) gets ``/v1/chat/completions``; any other path gets ``/chat/completions``
appended. So ``http://127.0.0.1:8000`` and ``http://127.0.0.1:8000/v1`` reach the same endpoint,
and provider paths such as ``https://host/openai/v1`` keep their prefix.

The API key, when needed, is read from an environment variable whose *name* is given
(``api_key_env="OPENAI_API_KEY"``), at request time. The key goes only into the Authorization
header: never into ``repr``, ``identity`` (the cache key), log lines or error messages. A server
can still send it back (error pages that quote the request, a model that repeats its prompt
headers), so everything the server sends is masked here, at the boundary, before any error,
log line, cache entry or stage sees it: the key and the URL's query values (where some providers
put theirs) become ``***``. Values shorter than ``SHORTEST_SECRET`` are placeholders, not secrets
("EMPTY", "ollama"), and are left alone: masking such common words would garble answers.

Structured answers: with a stage's JSON Schema, the request carries ``response_format`` of type
``json_schema`` (``strict`` where the schema fits OpenAI's strict subset, see ``schemas.strict_form``).
A server that refuses it, with an error that names the field, is asked again at once with
``json_object``, and then with plain text; each refusal is final for that form, so it is never
retried as a failure. What worked is remembered per endpoint, model and mode for the life of the
process (``accepted_form``), so only the first question pays for a refusal. A server that ignores
the field (older Ollama does) answers freely, and the stage's parser and re-asking take over.

Reasoning models put their thoughts in ``reasoning_content`` (vLLM, SGLang), ``reasoning``
(Ollama's OpenAI endpoint, newer vLLM) or ``thinking`` (Ollama), and the answer in ``content``;
thoughts in ``<think>`` tags inside the content are left to the parser. A reply whose content is
empty because the token budget went to reasoning gets its own error.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import io
import json
import logging
import os
import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from datetime import timezone
from typing import Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from PIL import Image

from ..errors import InputError, VLMError
from .parsing import quote
from .protocol import MAX_IMAGE_SIDE, Turn, image_for_vlm
from .schemas import STRUCTURED_MODES, Schema, check_mode, strict_form

log = logging.getLogger("csg.vlm")

RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})  # worth asking again; other errors are final
RETRY_AFTER_STATUSES = frozenset({429, 503})  # where a Retry-After header says how long to wait
MAX_RETRY_AFTER = 60.0  # seconds; a server asking for a longer wait gets a final error naming it instead
BODY_QUOTE_LIMIT = 400
SHORTEST_SECRET = 8  # characters; shorter keys are placeholders, see the module docstring
SERVER_LOG_HINT = "The server may have crashed or restarted; look at its log."
REASONING_FIELDS = ("reasoning_content", "reasoning", "thinking")
ALL_REASONING = "raise max_tokens or use an instruct model"

# The answer forms to try, tightest first: "schema" (response_format json_schema), "json" (json_object),
# "off" (no response_format). A refused form is never asked for again under the same endpoint, model and mode.
FORMS = {"auto": ("schema", "json", "off"), "schema": ("schema",), "json": ("json",), "off": ("off",)}
assert set(FORMS) == set(STRUCTURED_MODES)
REFUSAL_STATUSES = frozenset({400, 422, 500, 501})  # llama.cpp before its json_schema support answered 500
REFUSAL_WORDS = ("response_format", "json_schema", "json_object", "schema")
_ACCEPTED: dict[tuple[str, str, str], str] = {}  # (endpoint, model, mode) -> the form that server took
_ACCEPTED_LOCK = threading.Lock()


def response_format(form: str, schema: Schema) -> dict[str, Any] | None:
    """The ``response_format`` of a request in ``form``, holding the answer to ``schema``."""
    if form == "off":
        return None
    if form == "json":
        return {"type": "json_object"}
    strict = strict_form(schema)
    return {"type": "json_schema",
            "json_schema": {"name": "csg_answer", "schema": strict or schema, "strict": strict is not None}}


class FormRefused(VLMError):
    """The server refused a ``response_format`` (an error status whose body names it)."""


def chat_completions_url(base_url: str) -> str:
    """The endpoint for a user-given base URL, by the rule in the module docstring."""
    if not isinstance(base_url, str) or not base_url.strip():
        raise InputError("The VLM server URL is empty. Give its base URL, e.g. http://127.0.0.1:8000/v1.")
    if any(c.isspace() or not c.isprintable() for c in base_url.strip()):
        raise InputError("The VLM server URL contains spaces or control characters, which no request can carry. "
                         "Give it like http://127.0.0.1:8000/v1 (write a space in a path as %20).")
    parts = urlsplit(base_url.strip())
    try:
        _ = parts.port  # parsed on access: raises for a port out of range or not a number
    except ValueError:
        raise InputError("The VLM server URL has a port that is not a number from 0 to 65535. "
                         "Give it like http://127.0.0.1:8000/v1.") from None
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


def chat_messages(system: str, turns: Sequence[Turn], images: Sequence[Image.Image],
                  max_side: int | None) -> list[dict]:
    """OpenAI chat messages; the images ride on the first user turn, before its text."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": system}]
    pictures = [{"type": "image_url", "image_url": {"url": image_data_url(image_for_vlm(i, max_side))}} for i in images]
    for turn in turns:
        if turn.role == "user" and pictures:
            messages.append({"role": "user", "content": [*pictures, {"type": "text", "text": turn.text}]})
            pictures = []
        else:
            messages.append({"role": turn.role, "content": turn.text})
    return messages


def retry_after_seconds(value: str | None) -> float | None:
    """The wait a ``Retry-After`` header asks for, in seconds: either form of RFC 9110, delay-seconds
    (``"120"``) or an HTTP-date (``"Wed, 21 Oct 2026 07:28:00 GMT"``). None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # HTTP-dates are always GMT
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


class Deadline:
    """One exchange's time limit, over all of it: connecting, sending, waiting and reading the body.

    A socket timeout bounds each read, not the exchange, so a server trickling a byte at a time can
    hold a client for ever. Instead a timer shuts the exchange's socket down when the time is up; that
    wakes whatever read or write is blocked on it, the exchange fails, and ``expired`` tells why.
    """

    def __init__(self, seconds: float):
        self.expired = False
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        """Shut ``sock`` down at the deadline, or now if the connecting already used it up."""
        with self._lock:
            self._socket = sock
            expired = self.expired
        if expired:
            self._shut(sock)

    def cancel(self) -> None:
        self._timer.cancel()

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            sock = self._socket
        if sock is not None:
            self._shut(sock)

    @staticmethod
    def _shut(sock: socket.socket) -> None:
        try:  # the plain socket's shutdown, also for a TLS socket: its own drops the TLS state under the reader
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
        except OSError:
            pass  # already closed: the exchange is over


class _Watched:
    """An HTTP(S) connection whose socket a ``Deadline`` shuts down when the exchange runs late."""

    def __init__(self, *args: Any, deadline: Deadline, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deadline = deadline

    def connect(self) -> None:
        super().connect()  # each step bounded by the socket timeout, which is the whole deadline
        self.deadline.watch(self.sock)  # from here on, the exchange as a whole


class _WatchedHTTPConnection(_Watched, http.client.HTTPConnection):
    pass


class _WatchedHTTPSConnection(_Watched, http.client.HTTPSConnection):
    pass


_WATCHED = {http.client.HTTPConnection: _WatchedHTTPConnection, http.client.HTTPSConnection: _WatchedHTTPSConnection}


class _WatchedOpen:
    """urllib's HTTP(S) handler opening watched connections (proxies and TLS settings work as usual)."""

    def __init__(self, deadline: Deadline):
        super().__init__()
        self.deadline = deadline

    def do_open(self, http_class: type, req: urllib.request.Request, **kwargs: Any) -> http.client.HTTPResponse:
        return super().do_open(_WATCHED[http_class], req, deadline=self.deadline, **kwargs)


class _WatchedHTTPHandler(_WatchedOpen, urllib.request.HTTPHandler):
    pass


class _WatchedHTTPSHandler(_WatchedOpen, urllib.request.HTTPSHandler):
    pass


class OpenAICompatibleVLM:
    """A VLM behind an OpenAI-compatible ``/chat/completions`` endpoint.

    ``timeout`` is a deadline in seconds for one whole exchange: connecting, sending the question and
    receiving the complete answer, however slowly the server sends it. (Only the DNS lookup, which no
    standard-library call bounds, comes on top; a TLS handshake is bounded step by step.)

    A failed exchange is tried ``retries`` more times, each try with a fresh deadline: after a
    timeout, a refused or broken connection, a reply that is not HTTP, or one of the
    ``RETRY_STATUSES``. Between tries it waits ``backoff``, 2·``backoff``, 4·``backoff``, ... seconds,
    or what a 429/503 reply's ``Retry-After`` asks for; a server asking for more than
    ``MAX_RETRY_AFTER`` seconds gets a final error naming its wait instead. So one call takes at most
    (retries + 1)·timeout plus those waits: with the defaults (300 s, 2 retries, 1 s backoff) 903 s,
    or 1020 s if the server asks for the longest Retry-After waits.

    There is deliberately no way to pass the key's value: only the name of the environment variable
    that holds it, so no workflow, cache or log can ever contain it.

    Args:
        base_url: the server, e.g. "http://127.0.0.1:11434/v1".
        model: the model name the server knows.
        api_key_env: the environment variable holding the API key; None: no key.
        timeout: seconds for one whole exchange.
        retries: further tries after a failed exchange.
        backoff: the first wait between tries, in seconds.
        max_image_side: longer side images are downscaled to before sending; None: never.
        structured: "auto" (the schema, else a JSON object, else plain text, as the server allows),
            "schema" or "json" (that form only: a refusal is an error), "off" (plain text).

    Raises:
        InputError: an unusable URL, timeout, retries or backoff.
        VLMError: from each question, when the server fails after the retries.
    """

    def __init__(self, base_url: str, model: str, *, api_key_env: str | None = None, timeout: float = 300.0,
                 retries: int = 2, backoff: float = 1.0, max_image_side: int | None = MAX_IMAGE_SIDE,
                 structured: str = "auto"):
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
        self.structured = check_mode(structured)

    def check_setting(self, wait: float = 5.0) -> None:
        """Raise now what the first question would: the API key variable unset or unusable, or nothing
        listening at the URL's host and port (a TCP connection, at most ``wait`` seconds; nothing is sent).

        A host calls this where the setting is made, so the error lands there and not on the first stage."""
        self._key()
        parts = urlsplit(self._endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname, port), timeout=min(wait, self.timeout)).close()
        except OSError as exc:
            problem, hint, _ = self._transport_failure(urllib.error.URLError(exc), isinstance(exc, TimeoutError))
            raise VLMError(self._redact(f"The VLM server at {self.url} {problem}. {hint}")) from None

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
                             "is not set. Set it before starting, or leave api_key_env empty for servers "
                             "without a key.")
        if not (key.isascii() and key.isprintable()) or any(c.isspace() for c in key):
            # http.client would refuse the header with a ValueError that quotes the key
            raise InputError(f"The API key in the environment variable {self.api_key_env} has characters an HTTP "
                             "header cannot carry (spaces, line breaks or non-ASCII letters). Copy the key again.")
        return key

    def _redact(self, text: str) -> str:
        """``text`` from the server with every secret it echoed masked (see the module docstring)."""
        key = os.environ.get(self.api_key_env, "").strip() if self.api_key_env else ""
        query_values = [value for _, value in parse_qsl(urlsplit(self._endpoint).query)]
        for secret in sorted({key, *query_values}, key=len, reverse=True):  # a longer one may contain a shorter
            if len(secret) >= SHORTEST_SECRET:
                text = text.replace(secret, "***")
        return text

    # -- the request ------------------------------------------------------------------------------

    @property
    def accepted_form(self) -> str | None:
        """The answer form this server took last under this model and mode, None before the first answer."""
        return _ACCEPTED.get((self._endpoint, self.model, self.structured))

    def generate(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *,
                 temperature: float, max_tokens: int, schema: Schema | None = None) -> str:
        payload: dict[str, Any] = {
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
        if schema is None:
            return self._ask(payload, headers, "off", len(images))
        key = (self._endpoint, self.model, self.structured)
        forms = FORMS[self.structured]
        forms = forms[forms.index(_ACCEPTED.get(key, forms[0])):]
        for form in forms:
            fmt = response_format(form, schema)
            try:
                answer = self._ask({**payload, "response_format": fmt} if fmt else payload, headers, form, len(images))
            except FormRefused as refusal:
                if form == forms[-1]:
                    raise VLMError(f"{refusal} Choose structured 'auto' (or 'off') so that the answer is asked for "
                                   "in a form the server takes.") from None
                log.warning("%s; asking again for the answer as %s", refusal, forms[forms.index(form) + 1])
                continue
            with _ACCEPTED_LOCK:
                _ACCEPTED[key] = form
            return answer
        raise AssertionError("unreachable")  # the last form returns or raises

    def _ask(self, payload: dict[str, Any], headers: dict[str, str], form: str, images: int) -> str:
        log.debug("POST %s model=%s images=%d temperature=%s max_tokens=%d form=%s", self.url, self.model, images,
                  payload["temperature"], payload["max_tokens"], form)
        return self._answer_text(self._post(json.dumps(payload).encode("utf-8"), headers, form))

    def _post(self, data: bytes, headers: dict[str, str], form: str = "off") -> bytes:
        """POST with bounded retries; returns the 2xx body or raises VLMError (``FormRefused`` when the
        server refuses the request's ``response_format``, which no retry would change)."""
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt
            deadline = Deadline(self.timeout)
            try:
                status, reason, reply_headers, body = self._exchange(data, headers, deadline)
            except (OSError, http.client.HTTPException) as exc:  # every failure below HTTP, TLS included
                problem, hint, final = self._transport_failure(exc, deadline.expired)
            else:
                if 200 <= status < 300:
                    return body
                text = body.decode("utf-8", errors="replace")
                page = quote(text, BODY_QUOTE_LIMIT)
                problem = f"answered HTTP {status} {reason}: {page}"
                if form != "off" and status in REFUSAL_STATUSES and any(w in text.lower() for w in REFUSAL_WORDS):
                    raise FormRefused(self._redact(f"The VLM server at {self.url} refused the response_format "
                                                   f"{'json_schema' if form == 'schema' else 'json_object'}: "
                                                   f"HTTP {status} {reason}: {page}"))
                hint, final = self._status_hint(status, text), status not in RETRY_STATUSES
                asked = (retry_after_seconds(reply_headers.get("Retry-After")) if status in RETRY_AFTER_STATUSES
                         else None)
                if asked is not None and asked > MAX_RETRY_AFTER:
                    problem += (f", asking to wait {asked:.0f} s before the next try "
                                f"(this client waits at most {MAX_RETRY_AFTER:g} s)")
                    hint, final = "Try again once the server is ready, or ask its operator about its limits.", True
                elif asked is not None:
                    wait = asked
            finally:
                deadline.cancel()
            problem = self._redact(problem)  # status lines, bodies and error texts all come from the server
            if final or attempt == self.retries:
                tries = f" after {attempt + 1} tries" if attempt else ""
                raise VLMError(f"The VLM server at {self.url} {problem}{tries}. {hint}") from None
            log.warning("VLM server at %s %s; retrying in %.2g s", self.url, problem, wait)
            time.sleep(wait)
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _exchange(self, data: bytes, headers: dict[str, str], deadline: Deadline) -> tuple[int, str, Any, bytes]:
        """One POST under ``deadline``: status, reason, headers and body, whatever the status."""
        opener = urllib.request.build_opener(_WatchedHTTPHandler(deadline), _WatchedHTTPSHandler(deadline))
        request = urllib.request.Request(self._endpoint, data=data, headers=headers, method="POST")
        try:
            response = opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as error:  # an error status: still a reply, with headers and a body
            response = error
        with response:
            return response.status, response.reason, response.headers, response.read()

    def _transport_failure(self, exc: BaseException, timed_out: bool) -> tuple[str, str, bool]:
        """(problem, hint, final) for a failure below HTTP: no connection, a broken one, or no HTTP on it."""
        # urllib wraps what fails while connecting and sending; what fails later comes as it is
        cause = exc.reason if isinstance(exc, urllib.error.URLError) and isinstance(exc.reason, BaseException) else exc
        if timed_out or isinstance(cause, TimeoutError):
            return (f"did not answer within {self.timeout:g} s",
                    "It may still be loading the model, or the answer is long: raise the timeout.", False)
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (f"has a TLS certificate this machine does not trust ({cause.verify_message})",
                    "Install the certificate of the authority that signed it, or fix the host name in the URL.", True)
        broken_tls = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)  # a connection that broke
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, broken_tls):
            return (f"could not agree on TLS ({cause})", "Check http:// versus https:// in the URL.", True)
        if isinstance(cause, http.client.IncompleteRead):
            return f"broke off its answer ({cause!r})", SERVER_LOG_HINT, False
        if isinstance(cause, http.client.RemoteDisconnected):
            return "closed the connection without answering", SERVER_LOG_HINT, False
        if isinstance(cause, http.client.HTTPException):
            return (f"sent a reply that is not HTTP ({type(cause).__name__}: {quote(str(cause), BODY_QUOTE_LIMIT)})",
                    "Check that the URL points at the OpenAI-compatible API and not at another service.", False)
        if isinstance(exc, urllib.error.URLError):
            return f"is not reachable ({cause})", "Start the server or fix the URL.", False
        return f"dropped the connection ({type(cause).__name__}: {cause})", SERVER_LOG_HINT, False

    def _status_hint(self, status: int, body: str) -> str:
        if status in (401, 403):
            where = f"the environment variable {self.api_key_env}" if self.api_key_env else "api_key_env"
            return f"Check the API key in {where}."
        # OpenAI, vLLM and Ollama answer an unknown model with a 404 whose body names the model; a 404 without
        # one, or a 405 (no POST there), comes from a server that has no chat completions at that path.
        if status == 404 and "model" in body.lower():
            return f"Check that the server serves the model {self.model!r} (its /v1/models lists what it serves)."
        if status in (404, 405):
            return (f"{self.url} is not an OpenAI-compatible chat completions endpoint. Check the URL: the base_url "
                    "usually ends in /v1 (e.g. http://127.0.0.1:8000/v1 for vLLM, http://127.0.0.1:11434/v1 for "
                    "Ollama), and the server must be an OpenAI-compatible one.")
        if status in RETRY_STATUSES:
            return "The server failed; look at its log."
        return "Check the model name and the server's limits (image size, max_tokens)."

    def _answer_text(self, body: bytes) -> str:
        text = self._redact(body.decode("utf-8", errors="replace"))
        malformed = f"The VLM server at {self.url} sent a response that is not a chat completion"
        try:
            data = json.loads(text)
        except ValueError:
            raise VLMError(f"{malformed} (not JSON): {quote(text, BODY_QUOTE_LIMIT)}. "
                           "Check that the URL points at an OpenAI-compatible API.") from None
        try:
            choice = data["choices"][0]
            message = choice["message"]
            content = message.get("content")
        except (KeyError, IndexError, TypeError, AttributeError):
            raise VLMError(f"{malformed} (no choices[0].message): {quote(text, BODY_QUOTE_LIMIT)}.") from None
        if isinstance(content, list):  # some servers return content parts
            content = "".join(part.get("text", "") for part in content if isinstance(part, dict))
        if not isinstance(content, str) or not content.strip():
            finish = choice.get("finish_reason") if isinstance(choice, dict) else None
            reasoning = next((message[f] for f in REASONING_FIELDS if isinstance(message.get(f), str)
                              and message[f].strip()), "")
            if reasoning:
                raise VLMError(f"The VLM server at {self.url} returned only reasoning ({len(reasoning):,} characters "
                               f"in the thoughts, none in the answer; finish_reason={finish!r}): the stage's token "
                               f"budget went to thinking. To fix it, {ALL_REASONING}, or turn the server's "
                               "thinking switch off.")
            raise VLMError(f"The VLM server at {self.url} returned no text (finish_reason={finish!r}). "
                           "If it is a reasoning model, turn its thinking mode off (e.g. a non-thinking "
                           "variant or the server's reasoning switch): each stage has a fixed token budget that "
                           "long reasoning can use up.")
        return self._redact(content)  # again: JSON escapes in the raw body can hide a secret from the first pass
