"""The understanding nodes executed by ComfyUI's engine against a real OpenAI-compatible server on 127.0.0.1.

The server answers with the hand-written portrait answers of tests/fixtures/vlm (the same ones the
core's stage tests use), so the nodes must give exactly what ``csg.vlm`` gives on them. The API key
sits in an environment variable; it must reach the server and appear nowhere else: not in the
prompt, the outputs, the UI, the messages to the frontend, or the answer cache.
"""

import json
import logging
import secrets
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.test_vlm_stages import load_scene, scene_server, stage_of, wrap
from tests.test_vlm_transformers import build_tiny_qwen25_vl
from tests.vlm_server import Reply, VLMServer, closed_port_url, completion
from tools.comfyui_harness import WorkflowFailed

ROOT = Path(__file__).resolve().parents[2]
KEY_VARIABLE = "CSG_TEST_VLM_KEY"


@pytest.fixture(scope="module")
def scene():
    return load_scene("portrait")


@pytest.fixture(scope="module")
def portrait(comfyui, scene) -> str:
    """The scene's photo in ComfyUI's input folder, for LoadImage."""
    import folder_paths

    source = ROOT / scene["image"]
    shutil.copy(source, Path(folder_paths.get_input_directory()) / source.name)
    return source.name


@pytest.fixture
def api_key(monkeypatch) -> str:
    key = f"sk-test-{secrets.token_hex(16)}"
    monkeypatch.setenv(KEY_VARIABLE, key)
    return key


@pytest.fixture
def answer_cache(comfyui) -> Path:
    """The nodes' answer cache, emptied so each test starts cold."""
    folder = comfyui.pack_module("nodes.vlm_nodes").answer_cache_folder()
    shutil.rmtree(folder, ignore_errors=True)
    return folder


def endpoint(server, *, key_variable=KEY_VARIABLE, cache=True) -> dict:
    return {"class_type": "CSGOpenAIVLM", "inputs": {"base_url": server.base_url, "model": "fixture-vlm",
                                                     "api_key_env": key_variable, "timeout": 10.0, "retries": 0,
                                                     "cache_answers": cache}}


def understanding_prompt(server, image_name: str, caption: str = "", preview: bool = True) -> dict:
    """Load -> VLM -> extract -> propose -> select; manual do(age = old) propagated by the VLM; a preview.

    The preview is an output node, so it makes the manual intervention run; without it only the
    nodes a test asks for run.
    """
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": endpoint(server),
        "3": {"class_type": "CSGConceptExtractor", "inputs": {"vlm": ["2", 0], "image": ["1", 0], "caption": caption,
                                                              "max_attempts": 3, "preview_width": 0}},
        "4": {"class_type": "CSGInterventionProposer", "inputs": {"vlm": ["2", 0], "image": ["1", 0],
                                                                  "causal_graph": ["3", 0], "base_prompt": ["3", 3],
                                                                  "max_attempts": 3}},
        "5": {"class_type": "CSGSelectIntervention", "inputs": {"interventions": ["4", 0], "number": 2}},
        "6": {"class_type": "CSGManualIntervention", "inputs": {"causal_graph": ["3", 0], "target": "age",
                                                                "new_value": "old", "vlm": ["2", 0], "image": ["1", 0],
                                                                "max_attempts": 3, "preview_width": 0}},
    }
    if preview:
        prompt["7"] = {"class_type": "CSGCausalGraphPreview", "inputs": {"causal_graph": ["3", 0],
                                                                         "intervention": ["6", 0], "preview_width": 0}}
    return prompt


def everything_written(run, cache_folder: Path) -> str:
    """All a run leaves behind that a user could save, share or read."""
    outputs = [value.to_json() if hasattr(value, "to_json") else repr(value)
               for values in run.outputs.values() for value in values]
    cached = [p.read_text() for p in cache_folder.rglob("*") if p.is_file()] if cache_folder.exists() else []
    return "\n".join([json.dumps(run.prompt), *outputs, json.dumps(run.ui, default=str),
                      json.dumps(run.messages, default=str), *cached])


def test_the_understanding_chain_gives_what_the_core_gives_and_keeps_the_key_secret(comfyui, scene, portrait,
                                                                                    api_key, answer_cache):
    vlm = comfyui.pack_module("csg.vlm")
    with scene_server(scene) as server:
        run = comfyui.run(understanding_prompt(server, portrait), outputs=["3", "4", "5", "6"], fresh=True)
        served = list(server.requests)
        picture = Image.open(ROOT / scene["image"]).convert("RGB")
        oracle = vlm.OpenAICompatibleVLM(server.base_url, "fixture-vlm", api_key_env=KEY_VARIABLE)
        extraction = vlm.extract_graph(oracle, picture)
        proposals = vlm.propose_interventions(oracle, picture, extraction.graph, extraction.base_prompt)
        propagated = vlm.propagate_intervention(oracle, picture, extraction.graph, "age", "old")

    graph, preview, graph_json, base_prompt = run.outputs["3"]
    assert graph == extraction.graph and base_prompt == extraction.base_prompt == scene["description"]["description"]
    assert json.loads(graph_json) == extraction.graph.to_dict()
    assert preview.dim() == 4 and run.ui["3"]["causal_graph"][0]["graph"] == extraction.graph.to_dict()
    interventions, interventions_json = run.outputs["4"]
    assert interventions == proposals and json.loads(interventions_json) == [p.to_dict() for p in proposals]
    assert run.outputs["5"][0] == proposals[1]
    intervention, _, report, _ = run.outputs["6"]
    assert intervention == propagated
    assert [c.concept_id for c in intervention.propagated_changes] == ["c2", "c3"]
    assert "do(c1 age = old)" in report
    assert run.ui["7"]["causal_graph"][0]["intervention"] == propagated.to_dict()

    assert sorted(stage_of(r) for r in served) == ["description", "extraction", "propagation", "proposals"]
    assert all(r.headers["Authorization"] == f"Bearer {api_key}" for r in served)  # the key did reach the server
    assert run.prompt["2"]["inputs"]["api_key_env"] == KEY_VARIABLE
    assert api_key not in everything_written(run, answer_cache)
    assert any(answer_cache.rglob("*.json")), "answers were cached"
    extractor_progress = [(value, total) for node_id, value, total in run.progress if node_id == "3"]
    assert extractor_progress == [(100, 200), (200, 200)]  # two questions: describe, then extract


def test_a_rerun_is_answered_from_the_cache_without_asking_the_server(comfyui, scene, portrait, api_key, answer_cache):
    with scene_server(scene) as server:
        first = comfyui.run(understanding_prompt(server, portrait), outputs=["3", "4", "6"], fresh=True)
        asked = len(server.requests)
        second = comfyui.run(understanding_prompt(server, portrait), outputs=["3", "4", "6"], fresh=True)
        assert len(server.requests) == asked == 4
    assert second.outputs["3"][0] == first.outputs["3"][0] and second.outputs["4"][0] == first.outputs["4"][0]
    assert second.outputs["6"][0] == first.outputs["6"][0]


def test_a_rerun_after_a_corrected_answer_asks_nothing(comfyui, scene, portrait, api_key, answer_cache):
    """The extractor's first answer is refused and the corrected one accepted: the cache serves that to the rerun."""
    answer_the_scene = scene_server(scene).responder
    refused = []

    def respond(request):
        if stage_of(request) == "extraction" and not refused:
            refused.append(request)
            return completion("No JSON from me today.")
        return answer_the_scene(request)

    with VLMServer(respond) as server:
        prompt = understanding_prompt(server, portrait, caption="a portrait", preview=False)
        first = comfyui.run(prompt, outputs=["3"], fresh=True)
        assert len(server.requests) == 2  # the refused answer and its correction
        second = comfyui.run(prompt, outputs=["3"], fresh=True)
        assert len(server.requests) == 2
    assert second.outputs["3"][0] == first.outputs["3"][0]


def test_a_caption_is_the_base_prompt_and_saves_the_description_question(comfyui, scene, portrait, api_key,
                                                                         answer_cache):
    caption = "an astronaut portrait"
    with scene_server(scene) as server:
        run = comfyui.run(understanding_prompt(server, portrait, caption, preview=False), outputs=["3"], fresh=True)
        assert [stage_of(r) for r in server.requests] == ["extraction"]
    assert run.outputs["3"][3] == caption


def test_the_proposals_report_the_change_the_graph_forbids(comfyui, scene, portrait, api_key, answer_cache):
    with scene_server(scene) as server:
        run = comfyui.run(understanding_prompt(server, portrait), outputs=["4"], fresh=True)
    chef = run.outputs["4"][0][0]  # the fixture's first proposal also ages the person: c1 is no descendant of c6
    assert [v.concept_id for v in chef.violations] == ["c1"]
    assert "c1" not in [c.concept_id for c in chef.propagated_changes]
    assert "CAUSAL VIOLATIONS" in run.ui["4"]["text"][0]


def test_a_propagated_change_outside_the_descendants_is_stripped_and_reported(comfyui, scene, portrait, api_key,
                                                                              answer_cache):
    answer = json.loads(json.dumps(scene["propagation"]["answer"]))
    answer["interventions"][0]["propagated_changes"].append(
        {"concept_id": "c9", "concept_name": "facial expression", "original_value": "smiling", "new_value": "grumpy",
         "reason": "old people are grumpy"})

    def respond(request):
        stage = stage_of(request)
        return completion(wrap(answer if stage == "propagation" else scene[stage], scene["wrapping"]))

    with VLMServer(respond) as server:
        run = comfyui.run(understanding_prompt(server, portrait), outputs=["6"], fresh=True)
    intervention, _, report, _ = run.outputs["6"]
    assert [(v.concept_id, v.new_value) for v in intervention.violations] == [("c9", "grumpy")]
    assert "CAUSAL VIOLATIONS" in report and "grumpy" in report
    assert list(run.ui["6"]["text"]) == [report]


def test_cancel_stops_the_node_between_questions(comfyui, scene, portrait, api_key, answer_cache):
    import comfy.model_management

    def respond(request):
        comfy.model_management.interrupt_current_processing()  # the user presses Cancel while the VLM thinks
        return completion(wrap(scene[stage_of(request)], scene["wrapping"]))

    with VLMServer(respond) as server:
        with pytest.raises(WorkflowFailed, match="interrupted"):
            comfyui.run(understanding_prompt(server, portrait, preview=False), outputs=["3"], fresh=True)
        assert len(server.requests) == 1
    comfy.model_management.interrupt_current_processing(False)


def test_a_pasted_key_is_refused_without_being_repeated(comfyui, scene, portrait, answer_cache):
    pasted = f"sk-{secrets.token_hex(12)}"
    with scene_server(scene) as server:
        prompt = understanding_prompt(server, portrait, preview=False) | {"2": endpoint(server, key_variable=pasted)}
        with pytest.raises(WorkflowFailed, match="name of an environment variable") as refused:
            comfyui.run(prompt, outputs=["3"], fresh=True)
        assert not server.requests
    assert raised_by_the_vlm_node(refused)
    assert pasted not in refused.value.error["exception_message"]


def raised_by_the_vlm_node(failed: pytest.ExceptionInfo) -> bool:
    """ComfyUI's execution error names the node that raised: the VLM node ("2"), which ComfyUI then outlines."""
    return failed.value.error["node_id"] == "2" and failed.value.error["node_type"] == "CSGOpenAIVLM"


def test_an_unset_key_variable_is_named_by_the_vlm_node(comfyui, scene, portrait, monkeypatch, answer_cache):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    with scene_server(scene) as server:
        with pytest.raises(WorkflowFailed, match=f"{KEY_VARIABLE}.*is not set") as failed:
            comfyui.run(understanding_prompt(server, portrait, preview=False), outputs=["3"], fresh=True)
        assert not server.requests
    assert raised_by_the_vlm_node(failed) and failed.value.error["exception_type"].endswith("InputError")


def test_an_unreachable_server_is_the_vlm_nodes_error(comfyui, scene, portrait, api_key, answer_cache):
    with scene_server(scene) as server:
        prompt = understanding_prompt(server, portrait, preview=False)
    prompt["2"]["inputs"]["base_url"] = closed_port_url()
    with pytest.raises(WorkflowFailed, match="is not reachable.*Start the server or fix the URL") as failed:
        comfyui.run(prompt, outputs=["3"], fresh=True)
    assert raised_by_the_vlm_node(failed) and failed.value.error["exception_type"].endswith("VLMError")


def test_a_server_that_is_not_openai_compatible_is_named_so(comfyui, portrait, api_key, answer_cache):
    with VLMServer(lambda request: Reply(404, "404: Not Found")) as server:  # e.g. ComfyUI's own port
        with pytest.raises(WorkflowFailed, match="not an OpenAI-compatible.*usually ends in /v1"):
            comfyui.run(understanding_prompt(server, portrait, preview=False), outputs=["3"], fresh=True)


def test_manual_intervention_with_a_vlm_needs_the_image(comfyui, scene, api_key, answer_cache):
    with scene_server(scene) as server:
        prompt = {"1": {"class_type": "CSGCausalGraphFromJSON", "inputs": {
            "graph_json": json.dumps(scene["extraction"]), "preview_width": 0}}, "2": endpoint(server),
            "3": {"class_type": "CSGManualIntervention", "inputs": {
                "causal_graph": ["1", 0], "target": "age", "new_value": "old", "vlm": ["2", 0], "max_attempts": 3,
                "preview_width": 0}}}
        with pytest.raises(WorkflowFailed, match="no image"):
            comfyui.run(prompt, outputs=["3"], fresh=True)


# -- the local model ----------------------------------------------------------------------------------------


@pytest.fixture
def llm_folders(monkeypatch, tmp_path):
    """Point the "LLM" folder type at an empty folder of this test's own."""
    import folder_paths

    monkeypatch.setitem(folder_paths.folder_names_and_paths, "LLM", ([str(tmp_path)], set()))
    return tmp_path


def local_prompt(image_name: str, model: str, unload: bool) -> dict:
    return {
        "1": {"class_type": "LoadImage", "inputs": {"image": image_name}},
        "2": {"class_type": "CSGLocalVLM", "inputs": {"model": model, "device": "cpu", "dtype": "float32",
                                                      "unload_after_use": unload, "cache_answers": False}},
        "3": {"class_type": "CSGConceptExtractor", "inputs": {"vlm": ["2", 0], "image": ["1", 0],
                                                              "caption": "a portrait", "max_attempts": 1,
                                                              "preview_width": 0}},
    }


def test_without_a_local_model_the_loader_says_where_to_put_one(comfyui, portrait, llm_folders):
    vlm_nodes = comfyui.pack_module("nodes.vlm_nodes")
    options = comfyui.input_types("CSGLocalVLM")["required"]["model"][1]["options"]
    assert options == [vlm_nodes.NO_LOCAL_MODEL]
    with pytest.raises(WorkflowFailed, match="models/LLM holds no VLM folder.*hf download") as failed:
        comfyui.run(local_prompt(portrait, vlm_nodes.NO_LOCAL_MODEL, True), outputs=["3"], fresh=True)
    assert failed.value.error["exception_type"].endswith("WeightsMissingError")


def shared_model(comfyui, folder: Path):
    shared = comfyui.pack_module("nodes.vlm_nodes")._LOCAL_MODELS
    (model,) = [m for key, m in shared.items() if key[0] == str(folder.resolve())]
    return model


def test_a_local_model_from_models_llm_runs_with_token_progress_and_is_unloaded_after_use(comfyui, portrait,
                                                                                       llm_folders, memory_requests):
    build_tiny_qwen25_vl(llm_folders / "tiny-qwen")
    assert comfyui.input_types("CSGLocalVLM")["required"]["model"][1]["options"] == ["tiny-qwen"]
    # random weights talk nonsense, so the stage ends in its typed error
    with pytest.raises(WorkflowFailed, match="no usable concept extraction answer") as failed:
        comfyui.run(local_prompt(portrait, "tiny-qwen", True), outputs=["2", "3"], fresh=True)
    assert failed.value.error["exception_type"].endswith("VLMOutputError")
    assert any(node == "3" and 0 < value < total for node, value, total in comfyui.progress)  # token by token
    model = shared_model(comfyui, llm_folders / "tiny-qwen")
    assert not model.loaded  # freed for SDXL although the stage failed
    assert model.on_token is None  # the node's progress callback does not outlive it
    # it was loaded through ComfyUI's memory manager, with room to generate in; now it is gone from memory
    need = comfyui.pack_module("csg.vlm").memory_needed(llm_folders / "tiny-qwen", torch.float32)
    assert memory_requests and all(r.memory_required == need.working for r in memory_requests)
    assert {kind for r in memory_requests for kind in r.kinds} == {"Qwen2_5_VLForConditionalGeneration"}
    assert all(ref() is None for r in memory_requests for ref in r.models)
    assert not any(type(m).__name__ == "Qwen2_5_VLForConditionalGeneration" for m in comfyui.models_in_memory())


def test_a_local_model_kept_after_use_stays_among_comfyuis_loaded_models(comfyui, portrait, llm_folders,
                                                                         memory_requests):
    build_tiny_qwen25_vl(llm_folders / "tiny-qwen")
    with pytest.raises(WorkflowFailed, match="no usable concept extraction answer"):
        comfyui.run(local_prompt(portrait, "tiny-qwen", False), outputs=["3"], fresh=True)
    model = shared_model(comfyui, llm_folders / "tiny-qwen")
    try:
        assert model.loaded
        in_memory = [m for m in comfyui.models_in_memory() if m is model._model]
        assert len(in_memory) == 1  # ComfyUI may evict it (to system memory) when SDXL needs the room
        assert [ref() for ref in memory_requests[0].models] == in_memory  # asked for before the first answer
    finally:
        model.unload()
    assert not any(m is model._model for m in comfyui.models_in_memory())


def test_under_novram_a_gpu_device_is_refused_before_anything_loads(comfyui, portrait, llm_folders, monkeypatch):
    """ComfyUI's --novram loads every model only partly, also when asked for a full load; a VLM of plain
    torch layers would then fail deep inside generation with a device mismatch."""
    import comfy.model_management

    build_tiny_qwen25_vl(llm_folders / "tiny-qwen")
    monkeypatch.setattr(comfy.model_management, "vram_state", comfy.model_management.VRAMState.NO_VRAM)
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("cuda", 0))  # no GPU here
    node = local_prompt(portrait, "tiny-qwen", True)["2"]
    with pytest.raises(WorkflowFailed, match="ComfyUI runs with --novram.*Set the node's device to cpu") as refused:
        comfyui.run({"2": {**node, "inputs": {**node["inputs"], "device": "auto"}}}, outputs=["2"], fresh=True)
    assert refused.value.error["exception_type"].endswith("InputError")
    comfyui.run({"2": node}, outputs=["2"], fresh=True)  # device cpu: fine


def test_the_local_node_logs_the_memory_its_model_needs_and_refuses_a_device_too_small(comfyui, portrait,
                                                                                      llm_folders, caplog,
                                                                                      monkeypatch):
    import comfy.model_management

    folder = build_tiny_qwen25_vl(llm_folders / "tiny-qwen")
    need = comfyui.pack_module("csg.vlm").memory_needed(folder, torch.float32)
    caplog.set_level(logging.INFO, logger="csg.vlm")
    comfyui.run({"2": local_prompt(portrait, "tiny-qwen", True)["2"]}, outputs=["2"], fresh=True)
    total = comfy.model_management.get_total_memory(torch.device("cpu"))
    assert f"VLM tiny-qwen needs {need}; cpu has {total / 2**30:.1f} GiB in all" in caplog.text
    assert not shared_model(comfyui, folder).loaded  # the node itself loads nothing: the first question does

    monkeypatch.setattr(comfy.model_management, "get_total_memory", lambda device=None, torch_total_too=False: 2**29)
    with pytest.raises(WorkflowFailed, match="tiny-qwen cannot fit on cpu") as refused:
        comfyui.run({"2": local_prompt(portrait, "tiny-qwen", True)["2"]}, outputs=["2"], fresh=True)
    assert refused.value.error["node_id"] == "2"
    assert "Qwen2.5-VL-3B-Instruct" in refused.value.error["exception_message"]
