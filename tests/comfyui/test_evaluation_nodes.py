"""The evaluation nodes executed by ComfyUI's engine.

Counterfactual Judge runs against a real OpenAI-compatible server on 127.0.0.1 that answers the
judge's checklist with hand-written yes/no answers; the node must give what ``csg.vlm`` and
``csg.metrics`` give on the same answers. LPIPS Distance loads random-weight VGG16 and LPIPS heads
files written in their publishers' formats and must give what ``csg.metrics`` gives on them.
"""

import base64
import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.test_vlm_stages import load_scene, stage_of, wrap
from tests.vlm_server import VLMServer, completion
from tools.comfy_sdxl import write_random_lpips_weights
from tools.comfyui_harness import WorkflowFailed

EXAMPLES = Path(__file__).resolve().parents[2] / "csg" / "examples"
COLOURS = {"red": 0xFF0000, "green": 0x00FF00, "blue": 0x0000FF}
SIDE = 48


@pytest.fixture(scope="module")
def scene():
    return load_scene("portrait")


@pytest.fixture(scope="module")
def core(comfyui):
    """The pack's own csg modules, as ComfyUI loaded them (so isinstance checks hold)."""
    return {name: comfyui.pack_module(f"csg.{name}") for name in ("graph", "metrics", "vlm")}


# -- Counterfactual Judge ---------------------------------------------------------------------------


def endpoint(server) -> dict:
    return {"class_type": "CSGOpenAIVLM", "inputs": {"base_url": server.base_url, "model": "fixture-vlm",
                                                     "api_key_env": "", "timeout": 10.0, "retries": 0,
                                                     "cache_answers": False}}


def solid(colour: str, batch: int = 1) -> dict:
    return {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": batch,
                                                   "color": COLOURS[colour]}}


def colour_of(request) -> str:
    """The colour of the (solid) image a judge request carries."""
    (url,) = request.image_urls()
    picture = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).convert("RGB")
    return list(COLOURS)[int(np.argmax(picture.getpixel((32, 32))))]


def checklist_of(request) -> tuple[str, list[tuple[str, str]]]:
    """The intervention id and the (concept, expected value) lines the judge was asked about."""
    text = request.text()
    lines = text.split("<checklist>\n", 1)[1].split("\n</checklist>", 1)[0].splitlines()
    items = [tuple(line.removeprefix("- ").split(": ", 1)) for line in lines]
    return re.search(r'intervention_id "([^"]+)"', text).group(1), items


def judge_reply(request) -> str:
    """Every other checklist line is shown: yes, no, yes, ...; the verdict follows from them."""
    intervention_id, items = checklist_of(request)
    checks = [{"concept_name": name, "expected_value": value, "present": "no" if k % 2 else "yes"}
              for k, (name, value) in enumerate(items)]
    shown = sum(c["present"] == "yes" for c in checks)
    verdict = "success" if shown == len(checks) else "failure" if shown == 0 else "partial"
    return json.dumps({"intervention_id": intervention_id, "concept_checks": checks, "verdict": verdict,
                       "reasoning": f"{shown} of {len(checks)} visible."})


class JudgeServer(VLMServer):
    """Serves the scene's proposals and the alternating judge answers; ``judged`` lists (intervention, colour)."""

    def __init__(self, scene, on_judgement=None):
        self.judged: list[tuple[str, str]] = []

        def respond(request):
            stage = stage_of(request)
            if stage != "judgement":
                return completion(wrap(scene[stage], scene["wrapping"]))
            if on_judgement is not None:
                on_judgement()
            self.judged.append((checklist_of(request)[0], colour_of(request)))
            return completion(wrap(json.loads(judge_reply(request)), scene["wrapping"]))

        super().__init__(respond)


def batch_prompt(server, scene, colours=("red", "green", "blue")) -> dict:
    """Graph -> three proposals -> a batch of solid images, one colour per row -> the judge."""
    prompt = {
        "1": {"class_type": "LoadImage", "inputs": {"image": "portrait.png"}},
        "2": endpoint(server),
        "3": {"class_type": "CSGCausalGraphFromJSON", "inputs": {"graph_json": json.dumps(scene["extraction"]),
                                                                 "preview_width": 0}},
        "4": {"class_type": "CSGInterventionProposer", "inputs": {"vlm": ["2", 0], "image": ["1", 0],
                                                                  "causal_graph": ["3", 0], "max_attempts": 3}},
    }
    images = None
    for k, colour in enumerate(colours):
        prompt[f"c{k}"] = solid(colour)
        if images is None:
            images = [f"c{k}", 0]
        else:
            prompt[f"b{k}"] = {"class_type": "ImageBatch", "inputs": {"image1": images, "image2": [f"c{k}", 0]}}
            images = [f"b{k}", 0]
    prompt["10"] = {"class_type": "CSGCounterfactualJudge", "inputs": {
        "vlm": ["2", 0], "image": images, "causal_graph": ["3", 0], "interventions": ["4", 0], "max_attempts": 3}}
    return prompt


@pytest.fixture(scope="module")
def portrait(comfyui) -> str:
    import shutil

    import folder_paths

    shutil.copy(EXAMPLES / "portrait.png", Path(folder_paths.get_input_directory()) / "portrait.png")
    return "portrait.png"


def test_a_batch_is_judged_row_by_row_and_scores_what_the_core_scores(comfyui, core, scene, portrait):
    with JudgeServer(scene) as server:
        run = comfyui.run(batch_prompt(server, scene), outputs=["3", "4", "10"], fresh=True)
        graph, interventions = run.outputs["3"][0], run.outputs["4"][0]
        node_judged = list(server.judged)
        oracle = core["vlm"].OpenAICompatibleVLM(server.base_url, "fixture-vlm")
        expected = [core["vlm"].judge_counterfactual(oracle, Image.new("RGB", (64, 64), colour), item, graph)
                    for colour, item in zip(("red", "lime", "blue"), interventions)]

    assert [i.id for i in interventions] == ["intervention_1", "intervention_2", "intervention_3"]
    assert node_judged == [("intervention_1", "red"), ("intervention_2", "green"), ("intervention_3", "blue")]
    effectiveness, report, judgements_json = run.outputs["10"]
    assert effectiveness == core["metrics"].vlm_effectiveness(expected)
    # every other changed concept shown: per image ceil(n / 2) of n
    sizes = [len(j.concept_checks) for j in expected]
    assert effectiveness == pytest.approx(sum(-(-n // 2) / n for n in sizes) / 3)
    assert 0 < effectiveness < 1

    judgements = json.loads(judgements_json)
    assert judgements == [{"image": k, **j.to_dict()} for k, j in enumerate(expected, start=1)]
    assert core["metrics"].vlm_effectiveness(judgements) == effectiveness

    assert report.startswith(f"VLM effectiveness: {effectiveness:.3f} over 3 counterfactuals")
    for k, (item, judgement) in enumerate(zip(interventions, expected), start=1):
        assert f"[{k}] {item.id}: do({item.target_concept_id} {item.target_concept_name} = {item.new_value})" in report
        assert f"verdict: {judgement.verdict}" in report
        for check in judgement.concept_checks:
            state = "changed as intended" if check.present else "NOT changed"
            assert re.search(rf"{state} +{re.escape(check.concept_name)}: {re.escape(check.expected_value)}", report)
    assert list(run.ui["10"]["text"]) == [report]
    assert [(v, t) for node, v, t in run.progress if node == "10"] == [(100, 300), (200, 300), (300, 300)]


def test_one_intervention_and_one_image(comfyui, core, scene):
    graph_json = (EXAMPLES / "portrait_graph.json").read_text()
    intervention_json = (EXAMPLES / "portrait_intervention.json").read_text()
    answer = scene["judgement"]  # age yes, hair color yes, skin texture no

    with VLMServer(lambda request: completion(wrap(answer, scene["wrapping"]))) as server:
        prompt = {
            "1": {"class_type": "CSGCausalGraphFromJSON", "inputs": {"graph_json": graph_json, "preview_width": 0}},
            "2": {"class_type": "CSGInterventionFromJSON", "inputs": {
                "causal_graph": ["1", 0], "intervention_json": intervention_json, "preview_width": 0}},
            "3": endpoint(server),
            "4": solid("red"),
            "5": {"class_type": "CSGCounterfactualJudge", "inputs": {
                "vlm": ["3", 0], "image": ["4", 0], "causal_graph": ["1", 0], "intervention": ["2", 0],
                "max_attempts": 3}},
        }
        run = comfyui.run(prompt, outputs=["1", "2", "5"], fresh=True)
        oracle = core["vlm"].OpenAICompatibleVLM(server.base_url, "fixture-vlm")
        expected = core["vlm"].judge_counterfactual(oracle, Image.new("RGB", (64, 64), "red"), run.outputs["2"][0],
                                                    run.outputs["1"][0])
    effectiveness, report, judgements_json = run.outputs["5"]
    assert effectiveness == core["metrics"].vlm_effectiveness([expected]) == pytest.approx(2 / 3)
    assert json.loads(judgements_json) == [{"image": 1, **expected.to_dict()}]
    assert "over 1 counterfactual (2 of 3 changed concepts shown as intended); verdicts: 0 success, 1 partial" in report
    assert re.search(r"NOT changed +skin texture: wrinkled skin", report)
    assert "reasoning: She looks older" in report


@pytest.mark.parametrize("connect, fragment", [
    ("neither", "connect a CSG_INTERVENTION"),
    ("both", "has both a CSG_INTERVENTION and a CSG_INTERVENTIONS list"),
])
def test_exactly_one_of_intervention_and_interventions(comfyui, scene, portrait, connect, fragment):
    with JudgeServer(scene) as server:
        prompt = batch_prompt(server, scene, colours=("red",))
        prompt["5"] = {"class_type": "CSGSelectIntervention", "inputs": {"interventions": ["4", 0], "number": 1}}
        judge = prompt["10"]["inputs"]
        if connect == "neither":
            del judge["interventions"]
        else:
            judge["intervention"] = ["5", 0]
        with pytest.raises(WorkflowFailed, match=fragment):
            comfyui.run(prompt, outputs=["10"], fresh=True)
        assert not server.judged


def test_an_image_count_that_does_not_match_the_interventions_is_refused(comfyui, scene, portrait):
    with JudgeServer(scene) as server:
        with pytest.raises(WorkflowFailed, match=r"holds 2 image\(s\) but 3 interventions are connected") as failed:
            comfyui.run(batch_prompt(server, scene, colours=("red", "green")), outputs=["10"], fresh=True)
        assert not server.judged, "nothing is asked before the counts are checked"
    assert failed.value.error["exception_type"].endswith("InputError")
    assert "Causal Counterfactuals (batched)" in failed.value.error["exception_message"]


def test_cancel_stops_the_judge_between_images(comfyui, scene, portrait):
    import comfy.model_management

    # the user presses Cancel while the VLM judges the first image
    with JudgeServer(scene, on_judgement=comfy.model_management.interrupt_current_processing) as server:
        try:
            with pytest.raises(WorkflowFailed, match="interrupted"):
                comfyui.run(batch_prompt(server, scene), outputs=["10"], fresh=True)
            assert [colour for _, colour in server.judged] == ["red"]
        finally:
            comfy.model_management.interrupt_current_processing(False)


# -- LPIPS Distance ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weight_files(comfyui, tmp_path_factory):
    return write_random_lpips_weights(tmp_path_factory.mktemp("lpips-weights"))


@pytest.fixture(scope="module")
def pictures(comfyui) -> dict[str, torch.Tensor]:
    """Random pictures in ComfyUI's input folder (for LoadImage), and each as a (1, 3, H, W) tensor."""
    import folder_paths

    rng = np.random.default_rng(0)
    tensors = {}
    for name, side in (("a", SIDE), ("b", SIDE), ("c", SIDE), ("small", 32)):
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(Path(folder_paths.get_input_directory()) / f"lpips_{name}.png")
        tensors[name] = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    return tensors


def batch_of(prompt: dict, names: list[str]) -> list:
    """Load the named pictures and batch them in order; returns the link to the batch."""
    link = None
    for name in names:
        if f"load_{name}" not in prompt:
            prompt[f"load_{name}"] = {"class_type": "LoadImage", "inputs": {"image": f"lpips_{name}.png"}}
        if link is None:
            link = [f"load_{name}", 0]
        else:
            key = f"batch{len(prompt)}"
            prompt[key] = {"class_type": "ImageBatch", "inputs": {"image1": link, "image2": [f"load_{name}", 0]}}
            link = [key, 0]
    return link


def lpips_prompt(factual: list[str], counterfactual: list[str], vgg="", heads="", device="cpu") -> dict:
    prompt: dict = {}
    prompt["lpips"] = {"class_type": "CSGLPIPSDistance", "inputs": {
        "factual": batch_of(prompt, factual), "counterfactual": batch_of(prompt, counterfactual),
        "vgg_weights": str(vgg), "lpips_weights": str(heads), "device": device}}
    return prompt


def listed(distances: str) -> list[float]:
    return [float(value) for value in re.findall(r"image \d+: ([0-9.]+)", distances)]


def test_lpips_is_the_core_distance_and_a_single_factual_broadcasts(comfyui, core, weight_files, pictures):
    run = comfyui.run(lpips_prompt(["a"], ["b", "c", "a"], *weight_files), outputs=["lpips"], fresh=True)
    mean, distances = run.outputs["lpips"]
    model = core["metrics"].load_lpips_vgg(*weight_files)
    expected = core["metrics"].lpips_distance(model, pictures["a"],
                                              torch.cat([pictures["b"], pictures["c"], pictures["a"]]))
    assert listed(distances) == pytest.approx(expected.tolist(), abs=1e-6)
    assert mean == pytest.approx(float(expected.mean()), rel=1e-5)
    assert expected[0] > 0 and expected[1] > 0 and expected[2] == pytest.approx(0, abs=1e-9)
    assert "image 3: 0.000000" in distances and "over 3 images" in distances
    assert list(run.ui["lpips"]["text"]) == [distances]


def test_batches_pair_row_by_row_and_identical_images_are_at_zero(comfyui, core, weight_files, pictures):
    run = comfyui.run(lpips_prompt(["a", "b"], ["c", "b"], *weight_files), outputs=["lpips"], fresh=True)
    model = core["metrics"].load_lpips_vgg(*weight_files)
    expected = core["metrics"].lpips_distance(model, torch.cat([pictures["a"], pictures["b"]]),
                                              torch.cat([pictures["c"], pictures["b"]]))
    assert listed(run.outputs["lpips"][1]) == pytest.approx(expected.tolist(), abs=1e-6)
    same = comfyui.run(lpips_prompt(["a"], ["a"], *weight_files), outputs=["lpips"], fresh=True)
    assert same.outputs["lpips"][0] == 0.0


def test_the_model_is_loaded_once_and_weights_are_found_under_torch_home(comfyui, core, weight_files, pictures,
                                                                         tmp_path, monkeypatch):
    evaluation = comfyui.pack_module("nodes.evaluation_nodes")
    loads = []

    def counting(*args, **kwargs):
        loads.append(args)
        return core["metrics"].load_lpips_vgg(*args, **kwargs)

    monkeypatch.setattr(evaluation, "load_lpips_vgg", counting)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    checkpoints = tmp_path / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    for path in weight_files:
        (checkpoints / path.name).symlink_to(path)
    given = comfyui.run(lpips_prompt(["a"], ["b"], *weight_files), outputs=["lpips"], fresh=True)
    again = comfyui.run(lpips_prompt(["a"], ["b"], *weight_files), outputs=["lpips"], fresh=True)
    searched = comfyui.run(lpips_prompt(["a"], ["b"], device="auto"), outputs=["lpips"], fresh=True)
    assert given.outputs["lpips"] == again.outputs["lpips"] == searched.outputs["lpips"]
    assert loads == [(str(weight_files[0]), str(weight_files[1])), (None, None)]  # the second run reused the first


def test_lpips_loads_through_comfyuis_memory_manager_with_room_for_the_images(comfyui, weight_files, pictures,
                                                                             memory_requests):
    comfyui.run(lpips_prompt(["a"], ["b", "c"], *weight_files), outputs=["lpips"], fresh=True)
    [request] = memory_requests  # once for the batch
    evaluation = comfyui.pack_module("nodes.evaluation_nodes")
    assert request.kinds == ["LPIPS"] and request.memory_required == evaluation.LPIPS_BYTES_PER_PIXEL * SIDE * SIDE
    lpips = request.models[0]()
    assert any(m is lpips for m in comfyui.models_in_memory())  # kept for later runs; ComfyUI may offload it


@pytest.mark.parametrize("factual, counterfactual, fragment", [
    (["a"], ["small"], r"factual image is 48x48 and the counterfactual 32x32"),
    (["a", "b"], ["a", "b", "c"], "factual holds 2 images and counterfactual 3"),
])
def test_images_that_cannot_be_compared_are_refused(comfyui, weight_files, pictures, factual, counterfactual,
                                                   fragment):
    with pytest.raises(WorkflowFailed, match=fragment):
        comfyui.run(lpips_prompt(factual, counterfactual, *weight_files), outputs=["lpips"], fresh=True)


def test_missing_weights_say_what_to_put_where(comfyui, core, weight_files, pictures, tmp_path, monkeypatch):
    metrics = core["metrics"]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(WorkflowFailed) as failed:
        comfyui.run(lpips_prompt(["a"], ["b"], heads=weight_files[1]), outputs=["lpips"], fresh=True)
    assert failed.value.error["exception_type"].endswith("WeightsMissingError")
    message = failed.value.error["exception_message"]
    assert str(tmp_path / "hub" / "checkpoints" / metrics.VGG16_FILE) in message and metrics.VGG16_URL in message
    assert metrics.LPIPS_HEADS_FILE not in message  # the heads were given

    nowhere = tmp_path / "nowhere" / "heads.pth"
    with pytest.raises(WorkflowFailed, match=re.escape(str(nowhere))):
        comfyui.run(lpips_prompt(["a"], ["b"], weight_files[0], f'"{nowhere}"'), outputs=["lpips"], fresh=True)
