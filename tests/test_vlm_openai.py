"""OpenAICompatibleVLM against a real HTTP server: what it sends, and each way a server can fail."""

import base64
import email.utils
import io
import json
import logging
import time

import pytest
from PIL import Image

from csg.errors import InputError, VLMError
from csg.vlm import CachedVLM, OpenAICompatibleVLM, Turn, VLMOutputError, ask_until_valid, chat_completions_url
from csg.vlm.openai_backend import MAX_RETRY_AFTER
from csg.vlm.prompts import Stage
from tests.vlm_server import Reply, VLMServer, closed_port_url, completion

KEY = "sk-test-5f0c1e9d-never-print-me"
FAST = {"backoff": 0.01}  # keep retry waits short


def ask(vlm, image=None, text="hello"):
    images = [image] if image is not None else []
    return vlm.generate("system prompt", [Turn("user", text)], images, temperature=0.2, max_tokens=77)


@pytest.fixture
def key_env(monkeypatch):
    monkeypatch.setenv("CSG_TEST_VLM_KEY", KEY)
    return "CSG_TEST_VLM_KEY"


@pytest.mark.parametrize("base, endpoint", [
    ("http://127.0.0.1:8000", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/v1", "http://127.0.0.1:8000/v1/chat/completions"),
    ("http://127.0.0.1:8000/v1/", "http://127.0.0.1:8000/v1/chat/completions"),
    ("https://host/openai/v1", "https://host/openai/v1/chat/completions"),
    ("http://h:1/v1/chat/completions", "http://h:1/v1/chat/completions"),
])
def test_url_rule(base, endpoint):
    assert chat_completions_url(base) == endpoint


@pytest.mark.parametrize("base", ["", "localhost:8000", "ftp://host/v1", "http://127.0.0.1:99999/v1",
                                  "http://127.0.0.1:8000/my models/v1", "http://127.0.0.1:8000/v1\x00"])
def test_unusable_urls_are_input_errors(base):
    with pytest.raises(InputError, match="URL"):
        OpenAICompatibleVLM(base, "m")


def test_a_good_answer_and_what_was_sent(key_env):
    image = Image.new("RGBA", (40, 30), (255, 0, 0, 128))  # transparency must be flattened before sending
    with VLMServer(lambda request: completion("the answer")) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "qwen3-vl-test", api_key_env=key_env, **FAST)
        assert ask(vlm, image, "describe it") == "the answer"
    [request] = server.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    body = request.body
    assert body["model"] == "qwen3-vl-test" and body["temperature"] == 0.2 and body["max_tokens"] == 77
    assert body["messages"][0] == {"role": "system", "content": "system prompt"}
    [url] = request.image_urls()
    assert url.startswith("data:image/png;base64,")
    sent = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert sent.mode == "RGB" and sent.size == image.size
    assert body["messages"][1]["content"][-1] == {"type": "text", "text": "describe it"}


def test_conversation_turns_keep_their_roles_and_the_image_stays_on_the_first():
    with VLMServer(lambda request: completion("ok")) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", **FAST)
        vlm.generate("sys", [Turn("user", "q1"), Turn("assistant", "a1"), Turn("user", "q2")],
                     [Image.new("L", (8, 8))], temperature=0.0, max_tokens=5)
    messages = server.requests[0].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "a1" and messages[3]["content"] == "q2"
    assert len(server.requests[0].image_urls()) == 1
    assert "Authorization" not in server.requests[0].headers  # no key configured, none sent


def test_http_500_is_retried_then_named(key_env):
    with VLMServer(lambda request: Reply(500, "backend exploded")) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", api_key_env=key_env, retries=2, **FAST)
        with pytest.raises(VLMError) as caught:
            ask(vlm)
    assert len(server.requests) == 3
    message = str(caught.value)
    assert "HTTP 500" in message and "backend exploded" in message and "3 tries" in message
    assert server.base_url in message


def test_a_client_error_is_not_retried():
    with VLMServer(lambda request: Reply(400, json.dumps({"error": "max_tokens too large"}))) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", retries=3, **FAST)
        with pytest.raises(VLMError, match="HTTP 400.*max_tokens too large"):
            ask(vlm)
    assert len(server.requests) == 1


@pytest.mark.parametrize("reply", [
    Reply(404, "404: Not Found"),  # aiohttp's page, e.g. ComfyUI's own port given as the VLM server
    Reply(404, "<html><body><h1>Not Found</h1></body></html>"),
    Reply(405, "405: Method Not Allowed"),  # a route there that takes GET only
], ids=["404-text", "404-html", "405"])
def test_a_server_that_is_not_openai_compatible_is_named_so_with_the_v1_hint(reply):
    with VLMServer(lambda request: reply) as server:
        vlm = OpenAICompatibleVLM(server.base_url.removesuffix("/v1") + "/api", "m", retries=3, **FAST)
        with pytest.raises(VLMError) as caught:
            ask(vlm)
    message = str(caught.value)
    assert f"HTTP {reply.status}" in message and "is not an OpenAI-compatible chat completions endpoint" in message
    assert "usually ends in /v1" in message and "model name" not in message
    assert len(server.requests) == 1  # no retry changes the path


def test_an_unknown_model_is_a_404_that_names_the_model():
    body = {"object": "error", "message": "The model `qwen9` does not exist.", "type": "NotFoundError", "code": 404}
    with VLMServer(lambda request: Reply(404, json.dumps(body))) as server:  # vLLM's answer
        with pytest.raises(VLMError, match="does not exist.*serves the model 'qwen9'.*/v1/models"):
            ask(OpenAICompatibleVLM(server.base_url, "qwen9", **FAST))


def test_a_transient_failure_recovers():
    replies = iter([Reply(503, "warming up"), completion("fine")])
    with VLMServer(lambda request: next(replies)) as server:
        assert ask(OpenAICompatibleVLM(server.base_url, "m", retries=1, **FAST)) == "fine"
    assert len(server.requests) == 2


@pytest.mark.parametrize("body, fragment", [
    ("<html>not json</html>", "not JSON"),
    (json.dumps({"choices": []}), "no choices"),
    (json.dumps({"object": "error", "message": "model not found"}), "no choices"),
])
def test_malformed_response_bodies(body, fragment):
    with VLMServer(lambda request: Reply(200, body)) as server:
        with pytest.raises(VLMError, match=fragment):
            ask(OpenAICompatibleVLM(server.base_url, "m", **FAST))


def test_empty_content_names_the_finish_reason():
    body = {"choices": [{"finish_reason": "length", "message": {"role": "assistant", "content": None}}]}
    with VLMServer(lambda request: Reply(200, json.dumps(body))) as server:
        with pytest.raises(VLMError, match="finish_reason='length'"):
            ask(OpenAICompatibleVLM(server.base_url, "m", **FAST))


def test_a_slow_server_times_out_after_retries():
    with VLMServer(lambda request: Reply(200, "{}", delay=1.0)) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", timeout=0.2, retries=1, **FAST)
        start = time.monotonic()
        with pytest.raises(VLMError, match=r"did not answer within 0.2 s after 2 tries.*raise the timeout"):
            ask(vlm)
        assert time.monotonic() - start < 3
    assert len(server.requests) == 2


def test_a_refused_connection_says_start_it_or_fix_the_url():
    url = closed_port_url()
    vlm = OpenAICompatibleVLM(url, "m", retries=1, **FAST)
    with pytest.raises(VLMError, match="not reachable.*Start the server or fix the URL") as caught:
        ask(vlm)
    assert url in str(caught.value)


def test_a_named_but_unset_key_variable_is_an_input_error(monkeypatch):
    monkeypatch.delenv("CSG_TEST_UNSET_KEY", raising=False)
    with VLMServer(lambda request: completion("x")) as server:
        with pytest.raises(InputError, match="CSG_TEST_UNSET_KEY"):
            ask(OpenAICompatibleVLM(server.base_url, "m", api_key_env="CSG_TEST_UNSET_KEY"))
    assert server.requests == []


def test_the_key_never_leaves_the_authorization_header(key_env, tmp_path, caplog):
    """The key reaches the server, but no repr, identity, error, log line or cache file holds it,
    not even when the server echoes the request headers back in an error page."""
    def echo_headers(request):
        if request.text().endswith("fail"):
            return Reply(401, json.dumps({"error": "bad key", "headers": request.headers}))
        return completion("cached answer")

    caplog.set_level(logging.DEBUG)
    saved = []
    with VLMServer(echo_headers) as server:
        backend = OpenAICompatibleVLM(server.base_url + "?tenant=" + KEY, "m", api_key_env=key_env, **FAST)
        cached = CachedVLM(backend, tmp_path / "cache")
        assert ask(cached, Image.new("RGB", (8, 8)), "works") == "cached answer"
        with pytest.raises(VLMError) as caught:
            ask(cached, None, "fail")
        saved += [str(caught.value), repr(caught.value), repr(backend), repr(cached), backend.identity]
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert "HTTP 401" in saved[0] and "***" in saved[0] and "API key" in saved[0]
    files = [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files
    saved += [p.read_text() for p in files]
    saved.append(caplog.text)
    for text in saved:
        assert KEY not in text


# -- failures below HTTP: every one a VLMError that names it, retried like a refused connection ------------------

HEAD_THEN_SHORT_BODY = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"choices\""
HEAD_OF_A_LONG_BODY = b"HTTP/1.0 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 50_000


@pytest.mark.parametrize("reply, fragment", [
    (Reply(raw=b"HTCPCP/1.0 418 I am a teapot\r\n\r\n"), r"sent a reply that is not HTTP \(BadStatusLine"),
    (Reply(raw=HEAD_THEN_SHORT_BODY), r"broke off its answer \(IncompleteRead\(10 bytes read, 90 more expected\)\)"),
    (Reply(raw=HEAD_OF_A_LONG_BODY, reset=True), r"dropped the connection \(ConnectionResetError"),
    (Reply(raw=b""), "closed the connection without answering"),
], ids=["garbage status line", "body shorter than its length", "reset mid-body", "closed before answering"])
def test_a_broken_reply_is_a_retried_vlm_error(reply, fragment):
    with VLMServer(lambda request: reply) as server:
        with pytest.raises(VLMError, match=fragment + ".* after 2 tries") as caught:
            ask(OpenAICompatibleVLM(server.base_url, "m", retries=1, **FAST))
    assert len(server.requests) == 2
    assert server.base_url in str(caught.value)


def test_tls_to_a_plain_http_server_is_final_and_says_check_the_scheme():
    with VLMServer(lambda request: completion("never")) as server:
        vlm = OpenAICompatibleVLM(server.base_url.replace("http://", "https://"), "m", retries=2, **FAST)
        with pytest.raises(VLMError, match=r"could not agree on TLS .*Check http:// versus https://") as caught:
            ask(vlm)
    assert "tries" not in str(caught.value)  # not retried: it cannot get better


# -- the timeout is a deadline for the whole exchange ----------------------------------------------------------

ANSWER = completion("late")


@pytest.mark.parametrize("trickle_from", [0, ANSWER.wire_bytes().index(b"\r\n\r\n") + 4], ids=["head", "body"])
def test_a_trickling_server_is_cut_off_at_the_deadline(trickle_from):
    """One byte every 0.25 s never trips a per-read timeout; the deadline ends each try after 1 s."""
    trickling = Reply(body=ANSWER.body, trickle=0.25, trickle_from=trickle_from)
    with VLMServer(lambda request: trickling) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", timeout=1.0, retries=1, **FAST)
        start = time.monotonic()
        with pytest.raises(VLMError, match=r"did not answer within 1 s after 2 tries"):
            ask(vlm)
        elapsed = time.monotonic() - start
    assert 2.0 <= elapsed < 2.0 + 0.8  # two deadlines, a 0.01 s backoff, and slack
    assert len(server.requests) == 2


# -- Retry-After ------------------------------------------------------------------------------------------------

def timed_ask(vlm):
    start = time.monotonic()
    answer = ask(vlm)
    return answer, time.monotonic() - start


@pytest.mark.parametrize("status", [429, 503])
def test_retry_after_seconds_is_waited_for(status, caplog):
    replies = iter([Reply(status, "slow down", headers={"Retry-After": "1"}), completion("fine")])
    with VLMServer(lambda request: next(replies)) as server:
        answer, elapsed = timed_ask(OpenAICompatibleVLM(server.base_url, "m", retries=1, **FAST))
    assert answer == "fine" and len(server.requests) == 2
    assert 1.0 <= elapsed < 1.8
    assert f"HTTP {status}" in caplog.text and "retrying in 1 s" in caplog.text


def test_retry_after_as_an_http_date_is_waited_for():
    def respond(request):
        if len(server.requests) == 1:  # the date is made when asked: whole seconds, so 1 to 2 s from now
            return Reply(503, "restarting",
                         headers={"Retry-After": email.utils.formatdate(time.time() + 2, usegmt=True)})
        return completion("back")
    with VLMServer(respond) as server:
        answer, elapsed = timed_ask(OpenAICompatibleVLM(server.base_url, "m", retries=1, **FAST))
    assert answer == "back" and len(server.requests) == 2
    assert 1.0 <= elapsed < 2.8


def test_a_retry_after_above_the_maximum_fails_at_once_naming_the_wait():
    wait = int(MAX_RETRY_AFTER * 60)
    with VLMServer(lambda request: Reply(429, "quota used up", headers={"Retry-After": str(wait)})) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", retries=3, **FAST)
        start = time.monotonic()
        with pytest.raises(VLMError, match=fr"HTTP 429.*quota used up.*asking to wait {wait} s before the next try "
                                           fr"\(this client waits at most {MAX_RETRY_AFTER:g} s\)"):
            ask(vlm)
        assert time.monotonic() - start < 1
    assert len(server.requests) == 1


# -- a server that echoes the key ---------------------------------------------------------------------------------

ESCAPED_KEY = "".join(f"\\u{ord(c):04x}" for c in KEY)  # the key as JSON \\uXXXX escapes, invisible to a text search


def test_an_echoed_key_reaches_no_error_log_or_cache_file(key_env, tmp_path, caplog):
    """Wherever the server puts the key (answer, escaped answer, error page, status line), it arrives as ***."""
    def echo(request):
        sent = request.headers["Authorization"]
        question = request.text()
        if "status line" in question:
            return Reply(raw=f"HTTP/1.0 {sent}\r\n\r\n".encode())
        if "error page" in question:
            return Reply(500, f"cannot serve {sent}")
        if "escaped" in question:
            return Reply(body='{"choices": [{"message": {"content": "key: ' + ESCAPED_KEY + '"}}]}')
        return completion(f"You sent {sent}. No JSON today.")

    def refuse(answer):
        raise VLMOutputError("This is not JSON.", output=answer)

    caplog.set_level(logging.DEBUG)
    with VLMServer(echo) as server:
        backend = OpenAICompatibleVLM(server.base_url, "m", api_key_env=key_env, retries=1, **FAST)
        cached = CachedVLM(backend, tmp_path / "cache")
        with pytest.raises(VLMOutputError) as refused:
            ask_until_valid(cached, Stage("echo", "system", 0.0, 50), "answer", [], refuse, max_attempts=2)
        escaped = ask(cached, text="escaped")
        errors = [refused.value]
        for question in ("status line", "error page"):
            with pytest.raises(VLMError) as caught:
                ask(cached, text=question)
            errors.append(caught.value)
    assert all(r.headers["Authorization"] == f"Bearer {KEY}" for r in server.requests)
    assert refused.value.output == "You sent Bearer ***. No JSON today." and escaped == "key: ***"
    assert all("Bearer ***" in str(error) for error in errors)
    files = [p.read_text() for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    assert files
    for text in [*map(str, errors), *map(repr, errors), *files, caplog.text]:
        assert KEY not in text


def test_a_key_a_header_cannot_carry_is_refused_without_quoting_it(monkeypatch):
    monkeypatch.setenv("CSG_TEST_VLM_KEY", "sk-pasted\nwith-a-line-break")
    with VLMServer(lambda request: completion("x")) as server:
        with pytest.raises(InputError, match="CSG_TEST_VLM_KEY has characters an HTTP header cannot carry") as caught:
            ask(OpenAICompatibleVLM(server.base_url, "m", api_key_env="CSG_TEST_VLM_KEY"))
    assert "pasted" not in str(caught.value) and server.requests == []
