"""Structured answers through OpenAICompatibleVLM, against a real HTTP server on 127.0.0.1 that takes or refuses
``response_format`` the way vLLM, llama.cpp, Ollama, LM Studio and OpenAI do (tests/vlm_server.py's personas):
what is sent, in which fallback order, what is remembered, and how reasoning replies are read."""

import json
from pathlib import Path

import jsonschema
import pytest
from PIL import Image

from csg.errors import InputError, VLMError
from csg.vlm import OpenAICompatibleVLM, extract_graph
from csg.vlm import schemas as stage_schemas
from csg.vlm.prompts import DESCRIBE, EXTRACT, JUDGE, PROPAGATE, PROPOSE
from tests import vlm_server
from tests.vlm_server import VLMServer, completion

SCENE = json.loads((Path(__file__).parent / "fixtures" / "vlm" / "portrait.json").read_text())
GRAPH_ANSWER = json.dumps(SCENE["extraction"])
PHOTO = Image.new("RGB", (48, 32), (120, 90, 60))
FAST = {"backoff": 0.01}


def forms(server) -> list[str]:
    return [vlm_server._requested_form(request) for request in server.requests]


def extract(vlm):
    return extract_graph(vlm, PHOTO, caption="a portrait of a young woman", max_attempts=3)


def graph_answer(request):
    return GRAPH_ANSWER


@pytest.mark.parametrize("stage, answer", [(DESCRIBE, SCENE["description"]), (EXTRACT, SCENE["extraction"]),
                                           (PROPOSE, SCENE["proposals"]), (PROPAGATE, SCENE["propagation"]["answer"]),
                                           (JUDGE, SCENE["judgement"])], ids=lambda value: getattr(value, "name", ""))
def test_each_stage_has_a_valid_schema_that_its_good_answer_fits(stage, answer):
    jsonschema.Draft202012Validator.check_schema(stage.schema)
    jsonschema.validate(answer, stage.schema)
    jsonschema.validate(answer, stage_schemas.strict_form(stage.schema) or stage.schema)


def test_the_schemas_carry_the_packs_limits():
    concepts = stage_schemas.GRAPH["properties"]["concepts"]
    assert concepts["maxItems"] == stage_schemas.MAX_CONCEPTS
    assert stage_schemas.GRAPH["properties"]["relationships"]["maxItems"] == stage_schemas.MAX_RELATIONSHIPS
    assert concepts["items"]["properties"]["name"]["maxLength"] == stage_schemas.MAX_TEXT_CHARS
    assert stage_schemas.PROPOSAL["properties"]["interventions"]["minItems"] == 3
    assert stage_schemas.PROPOSAL["properties"]["interventions"]["maxItems"] == 3
    assert stage_schemas.JUDGEMENT["properties"]["verdict"]["enum"] == ["success", "partial", "failure"]
    too_many = {**SCENE["extraction"], "concepts": SCENE["extraction"]["concepts"] * 60}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(too_many, stage_schemas.GRAPH)


@pytest.mark.parametrize("persona", [vlm_server.vllm, vlm_server.llama_cpp, vlm_server.ollama, vlm_server.lm_studio,
                                     vlm_server.openai])
def test_a_server_that_takes_the_schema_gets_it_once_and_nothing_is_re_asked(persona):
    with VLMServer(persona(graph_answer)) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", **FAST)
        extraction = extract(vlm)
    assert len(extraction.graph.concepts) == len(SCENE["extraction"]["concepts"])
    assert forms(server) == ["schema"] and vlm.accepted_form == "schema"
    sent = server.requests[0].body["response_format"]
    assert sent["type"] == "json_schema" and sent["json_schema"]["strict"] is True
    assert sent["json_schema"]["schema"] == stage_schemas.strict_form(stage_schemas.GRAPH)


@pytest.mark.parametrize("persona, taken", [
    (lambda answer: vlm_server.vllm(answer, supports_schema=False), "json"),  # HTTP 400 BadRequestError
    (lambda answer: vlm_server.llama_cpp(answer, supports_schema=False), "json"),  # HTTP 500 server_error
    (lambda answer: vlm_server.openai(answer, supports_schema=False), "json"),  # HTTP 400 invalid_request_error
    (lambda answer: vlm_server.openai(answer, supports_schema=False, supports_json=False), "off"),
], ids=["old-vllm", "old-llama.cpp", "openai-json-mode-model", "openai-plain-model"])
def test_a_refusal_falls_back_in_order_and_is_remembered(persona, taken):
    with VLMServer(persona(graph_answer)) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "fallback-model", **FAST)
        extract(vlm)
        first = forms(server)
        extract(vlm)  # a second question, and a second backend for the same server and model
        extract(OpenAICompatibleVLM(server.base_url, "fallback-model", **FAST))
    order = ["schema", "json", "off"]
    assert first == order[:order.index(taken) + 1]  # tightest first, one request per refusal
    assert forms(server)[len(first):] == [taken, taken]  # the refusal is not paid again
    assert vlm.accepted_form == taken


def test_the_cache_key_holds_the_url_the_model_and_the_mode():
    with VLMServer(vlm_server.vllm(graph_answer, supports_schema=False)) as server:
        extract(OpenAICompatibleVLM(server.base_url, "model-a", **FAST))
        extract(OpenAICompatibleVLM(server.base_url, "model-b", **FAST))  # another model pays its own refusal
        json_only = OpenAICompatibleVLM(server.base_url, "model-c", structured="json", **FAST)
        extract(json_only)
        extract(OpenAICompatibleVLM(server.base_url, "model-c", **FAST))  # json mode's success says nothing of auto
    assert forms(server) == ["schema", "json", "schema", "json", "json", "schema", "json"]


def test_a_forced_form_that_the_server_refuses_is_an_error_naming_the_fix():
    with VLMServer(vlm_server.lm_studio(graph_answer)) as server:
        vlm = OpenAICompatibleVLM(server.base_url, "m", structured="json", **FAST)
        with pytest.raises(VLMError, match="refused the response_format json_object.*structured 'auto'"):
            extract(vlm)
    assert forms(server) == ["json"]  # refused once, not retried


def test_off_sends_no_response_format_and_an_unknown_mode_is_refused():
    with VLMServer(vlm_server.vllm(graph_answer)) as server:
        extract(OpenAICompatibleVLM(server.base_url, "m", structured="off", **FAST))
    assert forms(server) == ["off"] and "response_format" not in server.requests[0].body
    with pytest.raises(InputError, match="structured-output mode"):
        OpenAICompatibleVLM("http://127.0.0.1:1/v1", "m", structured="grammar")


def test_an_old_ollama_ignores_the_schema_and_the_parser_repairs_its_free_answer():
    free = f"Sure! Here is the graph:\n```json\n{GRAPH_ANSWER}\n```"
    with VLMServer(vlm_server.ollama(lambda request: free)) as server:
        extraction = extract(OpenAICompatibleVLM(server.base_url, "qwen2.5vl:7b", **FAST))
    assert extraction.graph.concepts and forms(server) == ["schema"]


@pytest.mark.parametrize("persona", [
    lambda answer: vlm_server.vllm(answer, reasoning="The hair is brown, so the age node matters."),
    lambda answer: vlm_server.ollama(answer, thinking="First the concepts, then the edges."),
    lambda answer: vlm_server.llama_cpp(lambda request: "<think>Concepts first.</think>\n" + answer(request)),
], ids=["reasoning_content", "thinking", "think-tags"])
def test_reasoning_models_answers_parse_with_the_schema_on(persona):
    with VLMServer(persona(graph_answer)) as server:
        extraction = extract(OpenAICompatibleVLM(server.base_url, "qwen3-vl-thinking", **FAST))
    assert len(extraction.graph.concepts) == len(SCENE["extraction"]["concepts"])
    assert forms(server) == ["schema"]


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning", "thinking"])
def test_an_all_reasoning_reply_gets_the_clear_error(field):
    reply = completion("", reasoning={field: "Let me think. " * 50}, finish_reason="length")
    with VLMServer(lambda request: reply) as server:
        with pytest.raises(VLMError, match="only reasoning.*raise max_tokens or use an instruct model"):
            extract(OpenAICompatibleVLM(server.base_url, "m", retries=0, **FAST))
    assert len(server.requests) == 1  # no re-asking the same budget


def test_an_all_think_tag_reply_gets_the_clear_error():
    with VLMServer(lambda request: completion("<think>The concepts are " + "many " * 40)) as server:
        with pytest.raises(VLMError, match="raise max_tokens or use an instruct model"):
            extract_graph(OpenAICompatibleVLM(server.base_url, "m", **FAST), PHOTO, caption="c", max_attempts=1)
