"""Every shipped workflow (workflows/*.json), as the frontend saved it, executed by ComfyUI's own engine.

Small enough for the CPU: the random-weight SDXL test checkpoint, the photo scaled to 64x64, four
inversion steps and one warm-up step; every other setting is the one the file ships with. The
VLM node talks to a real OpenAI-compatible server on 127.0.0.1 that answers with the hand-written
portrait fixture (tests/fixtures/vlm/portrait.json), the judge's checklists answered line by line;
hand_written_graph.json needs no VLM at all. LPIPS Distance finds random-weight files under TORCH_HOME.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.comfyui.test_evaluation_nodes import judge_reply
from tests.test_vlm_stages import load_scene, scene_server
from tools.comfy_sdxl import write_random_lpips_weights
from tools.comfyui_harness import WorkflowFailed

ROOT = Path(__file__).resolve().parents[2]
WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
SIDE, STEPS, WARMUP = 64, 4, 1
OUTPUT_NODES = {"SaveImage", "PreviewImage", "PreviewAny"}
PREDICTIONS = {"CSGCausalCounterfactual", "CSGCausalCounterfactuals"}


@pytest.fixture(scope="module")
def vlm_server():
    """The portrait fixture's answers; the judge's checklist answered line by line (yes, no, yes, ...)."""
    with scene_server(load_scene("portrait"), judge=judge_reply) as server:
        yield server


@pytest.fixture(scope="module")
def torch_home(comfyui, tmp_path_factory) -> Path:
    """A TORCH_HOME whose hub/checkpoints hold random LPIPS weights, for LPIPS Distance's default search."""
    home = tmp_path_factory.mktemp("torch-home")
    write_random_lpips_weights(home / "hub" / "checkpoints")
    return home


@pytest.fixture(scope="module")
def example_photo(comfyui) -> str:
    """The example portrait in ComfyUI's input folder, under the name the workflows load."""
    import folder_paths

    from tools.build_workflows import EXAMPLE_IMAGE

    shutil.copy(ROOT / "csg" / "examples" / "portrait.png", Path(folder_paths.get_input_directory()) / EXAMPLE_IMAGE)
    return EXAMPLE_IMAGE


def small(comfyui, workflow: dict, checkpoint: str, base_url: str) -> dict:
    """The workflow on the test checkpoint and the fixture VLM, at 64x64 with four steps."""
    for class_type, values in {
        "CheckpointLoaderSimple": {"ckpt_name": checkpoint},
        "ImageScale": {"width": SIDE, "height": SIDE},
        "CSGOpenAIVLM": {"base_url": base_url, "model": "fixture-vlm", "retries": 0, "timeout": 10.0},
        "CSGCausalInversion": {"steps": STEPS},
        "CSGCausalCounterfactual": {"warmup": WARMUP},
        "CSGCausalCounterfactuals": {"warmup": WARMUP},
        "CSGBaselineEdit": {"steps": STEPS},
    }.items():
        workflow = comfyui.with_widgets(workflow, class_type, **values)
    return workflow


def ids_of(workflow: dict, types: set[str]) -> list[str]:
    return [str(node["id"]) for node in workflow["nodes"] if node["type"] in types]


def patches_of(model) -> dict:
    """Everything through which a ModelPatcher changes its model: weight, object and attention patches."""
    options = model.model_options.get("transformer_options", {})
    return {"weights": dict(model.patches), "objects": dict(model.object_patches),
            "attention": {key: options.get(key) for key in ("patches", "patches_replace") if options.get(key)}}


def test_the_shipped_workflows_are_what_tools_build_workflows_writes(comfyui):
    """A node definition changed without re-running the builder would leave stale widgets in the files."""
    from tools.build_workflows import WORKFLOWS as BUILDERS
    from tools.build_workflows import Canvas

    assert sorted(BUILDERS) == [path.stem for path in WORKFLOWS]
    for path in WORKFLOWS:
        canvas = Canvas(comfyui)
        BUILDERS[path.stem](canvas)
        assert json.loads(json.dumps(canvas.workflow(path.stem))) == json.loads(path.read_text()), path.name


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda path: path.stem)
def test_workflow_runs_through_comfyuis_engine(path, comfyui, sdxl_checkpoint, vlm_server, example_photo, torch_home,
                                               monkeypatch):
    import folder_paths

    monkeypatch.setenv("TORCH_HOME", str(torch_home))

    workflow = small(comfyui, json.loads(path.read_text()), sdxl_checkpoint, vlm_server.base_url)
    checkpoints = ids_of(workflow, {"CheckpointLoaderSimple"})
    predictions = ids_of(workflow, PREDICTIONS)
    baselines = ids_of(workflow, {"CSGBaselineEdit"})
    scores = ids_of(workflow, {"CSGCounterfactualJudge", "CSGLPIPSDistance"})
    output_folder = Path(folder_paths.get_output_directory())
    saved_before = set(output_folder.rglob("*.png"))

    execution = comfyui.run(workflow, outputs=[*checkpoints, *predictions, *baselines, *scores], fresh=True)

    assert set(ids_of(workflow, OUTPUT_NODES)) <= set(execution.ui), "every preview and save node showed something"
    assert len(set(output_folder.rglob("*.png")) - saved_before) >= 1
    assert predictions, "every workflow renders a causal counterfactual"
    long_loops = {*ids_of(workflow, {"CSGCausalInversion"}), *predictions, *baselines}
    assert long_loops <= {node for node, _, _ in execution.progress}, "long loops move the progress bar"
    for node_id in predictions:
        image, latent, masks, mask_preview = execution.outputs[node_id]
        rows = image.shape[0]
        assert image.shape == (rows, SIDE, SIDE, 3) and torch.isfinite(image).all()
        assert latent["samples"].shape == (rows, 4, SIDE // 8, SIDE // 8)
        assert masks.shape[1:] == (SIDE, SIDE) and masks.shape[0] >= rows  # one per changed concept
        assert (masks.flatten(1).amax(dim=1) > 0).all(), "every concept's mask covers some pixels"
        assert mask_preview.shape == (masks.shape[0], SIDE, SIDE, 3)
    if path.stem == "three_counterfactuals":
        assert execution.outputs[predictions[0]][0].shape[0] == 3
    for node_id in baselines:
        image, latent = execution.outputs[node_id]
        assert image.shape == (1, SIDE, SIDE, 3) and torch.isfinite(image).all()
    for node_id in ids_of(workflow, {"CSGCounterfactualJudge"}):
        effectiveness, report, _ = execution.outputs[node_id]
        assert 0.0 <= effectiveness <= 1.0 and report.count("do(") == 3, "one verdict per counterfactual"
    for node_id in ids_of(workflow, {"CSGLPIPSDistance"}):
        mean, distances = execution.outputs[node_id]
        assert mean > 0.0 and distances.count("image ") == 3, "every counterfactual differs from the photo"
    for node_id in checkpoints:
        model = execution.outputs[node_id][0]
        assert patches_of(model) == {"weights": {}, "objects": {}, "attention": {}}, "the user's MODEL is unpatched"


def test_cancel_during_the_counterfactual_stops_it_cleanly_and_keeps_the_inversion(comfyui, sdxl_checkpoint,
                                                                                   example_photo):
    """The user presses Cancel mid-sampling: the run stops, the MODEL is clean, and the re-run does not re-invert."""
    import comfy.model_management
    import comfy.utils
    from comfy_execution.utils import get_executing_context

    workflow = small(comfyui, json.loads((ROOT / "workflows" / "hand_written_graph.json").read_text()),
                     sdxl_checkpoint, "http://127.0.0.1:9/unused")
    inversion, prediction = ids_of(workflow, {"CSGCausalInversion"})[0], ids_of(workflow, PREDICTIONS)[0]
    checkpoint = ids_of(workflow, {"CheckpointLoaderSimple"})[0]

    def cancel_midway(value, total, preview, prompt_id=None, node_id=None):
        context = get_executing_context()
        if (node_id or (context and context.node_id)) == prediction and value >= 2:
            comfy.model_management.interrupt_current_processing()
        comfyui._on_progress(value, total, preview, prompt_id, node_id)

    comfy.utils.set_progress_bar_global_hook(cancel_midway)
    try:
        with pytest.raises(WorkflowFailed, match="interrupted"):
            comfyui.run(workflow, outputs=[checkpoint, prediction], fresh=True)
    finally:
        comfy.utils.set_progress_bar_global_hook(comfyui._on_progress)
        comfy.model_management.interrupt_current_processing(False)
    assert any(node == prediction for node, _, _ in comfyui.progress), "it was stopped while sampling"

    rerun = comfyui.run(workflow, outputs=[checkpoint, prediction])
    assert prediction in rerun.executed() and inversion not in rerun.executed()
    assert rerun.outputs[prediction][0].shape == (1, SIDE, SIDE, 3)
    assert patches_of(rerun.outputs[checkpoint][0]) == {"weights": {}, "objects": {}, "attention": {}}


def test_changing_an_edit_setting_re_runs_the_edit_but_not_the_inversion(comfyui, sdxl_checkpoint, example_photo):
    workflow = small(comfyui, json.loads((ROOT / "workflows" / "hand_written_graph.json").read_text()),
                     sdxl_checkpoint, "http://127.0.0.1:9/unused")
    inversion, prediction = ids_of(workflow, {"CSGCausalInversion"})[0], ids_of(workflow, PREDICTIONS)[0]
    first = comfyui.run(workflow, outputs=[prediction], fresh=True)
    stronger = comfyui.run(comfyui.with_widgets(workflow, "CSGCausalCounterfactual", scale=12.0), outputs=[prediction])
    assert inversion in first.executed() and inversion not in stronger.executed()
    assert prediction in stronger.executed()
    assert not torch.equal(first.outputs[prediction][1]["samples"], stronger.outputs[prediction][1]["samples"])
