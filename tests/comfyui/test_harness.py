"""The harness itself: the saved-workflow translation and a plain SDXL text-to-image run through ComfyUI's engine.

The workflow below is written the way frontend 1.27 saves one: widget values in widget order
(with the seed's hidden "control after generate" value and LoadImage's upload button), a widget
converted to a socket and fed by a PrimitiveNode, a legacy Reroute, a Note and a MarkdownNote, a
bypassed node and a muted one.
"""

import pytest
import torch

from tools.comfyui_harness import WorkflowFailed
from tools.workflow_format import WorkflowFormatError, widget_layout, workflow_to_prompt

SIZE = 64


def node(node_id, node_type, widgets=None, inputs=(), outputs=(), mode=0, title=None):
    saved = {"id": node_id, "type": node_type, "pos": [0, 0], "size": [200, 100], "flags": {}, "order": node_id,
             "mode": mode, "inputs": [dict(i) for i in inputs], "outputs": [dict(o) for o in outputs],
             "properties": {"Node name for S&R": node_type}}
    if widgets is not None:
        saved["widgets_values"] = widgets
    if title:
        saved["title"] = title
    return saved


def socket(name, kind, link=None, widget=False):
    entry = {"name": name, "type": kind, "link": link}
    if widget:
        entry["widget"] = {"name": name}
    return entry


def saved_workflow(ckpt_name: str) -> dict:
    """Checkpoint -> prompts -> KSampler -> (bypassed upscale) -> VAEDecode -> SaveImage, with frontend extras."""
    links = [
        # id, origin, origin slot, target, target slot, type
        [1, 1, 0, 11, 0, "MODEL"],
        [2, 11, 0, 5, 0, "MODEL"],
        [3, 1, 1, 2, 0, "CLIP"],
        [4, 1, 1, 3, 0, "CLIP"],
        [5, 2, 0, 5, 1, "CONDITIONING"],
        [6, 3, 0, 5, 2, "CONDITIONING"],
        [7, 4, 0, 5, 3, "LATENT"],
        [8, 5, 0, 14, 0, "LATENT"],
        [9, 14, 0, 6, 0, "LATENT"],
        [10, 1, 2, 6, 1, "VAE"],
        [11, 6, 0, 7, 0, "IMAGE"],
        [12, 10, 0, 3, 1, "STRING"],
        [13, 6, 0, 12, 0, "IMAGE"],
    ]
    nodes = [
        node(1, "CheckpointLoaderSimple", [ckpt_name],
             outputs=[{"name": "MODEL", "type": "MODEL", "links": [1]},
                      {"name": "CLIP", "type": "CLIP", "links": [3, 4]},
                      {"name": "VAE", "type": "VAE", "links": [10]}]),
        node(2, "CLIPTextEncode", ["a photo of a cat"], inputs=[socket("clip", "CLIP", 3)], title="Positive"),
        node(3, "CLIPTextEncode", ["stale text the primitive overrides"],
             inputs=[socket("clip", "CLIP", 4), socket("text", "STRING", 12, widget=True)]),
        node(4, "EmptyLatentImage", [SIZE, SIZE, 1]),
        node(5, "KSampler", [42, "randomize", 2, 5.0, "euler", "normal", 1.0],
             inputs=[socket("model", "MODEL", 2), socket("positive", "CONDITIONING", 5),
                     socket("negative", "CONDITIONING", 6), socket("latent_image", "LATENT", 7)]),
        node(6, "VAEDecode", [], inputs=[socket("samples", "LATENT", 9), socket("vae", "VAE", 10)]),
        node(7, "SaveImage", ["csg_test"], inputs=[socket("images", "IMAGE", 11)]),
        node(8, "Note", ["Notes live only in the frontend."]),
        node(9, "MarkdownNote", ["# Nor do *markdown* notes"]),
        node(10, "PrimitiveNode", ["blurry"], outputs=[{"name": "STRING", "type": "STRING", "links": [12],
                                                        "widget": {"name": "text"}}]),
        node(11, "Reroute", None, inputs=[socket("", "*", 1)], outputs=[{"name": "", "type": "MODEL", "links": [2]}]),
        node(12, "PreviewImage", [], inputs=[socket("images", "IMAGE", 13)], mode=2),
        node(13, "LoadImage", ["example.png", "image"]),
        node(14, "LatentUpscaleBy", ["nearest-exact", 1.5], inputs=[socket("samples", "LATENT", 8)],
             outputs=[{"name": "LATENT", "type": "LATENT", "links": [9]}], mode=4),
    ]
    return {"last_node_id": 14, "last_link_id": 13, "nodes": nodes, "links": links, "groups": [
        {"title": "sampling", "bounding": [0, 0, 800, 600], "color": "#3f789e"}], "config": {}, "extra": {},
        "version": 0.4}


def test_widget_layout_follows_the_frontend(comfyui):
    names = [w.name for w in widget_layout(comfyui.input_types("KSampler"))]
    assert names == ["seed", None, "steps", "cfg", "sampler_name", "scheduler", "denoise"]
    assert [w.name for w in widget_layout(comfyui.input_types("KSamplerAdvanced"))][:3] == ["add_noise", "noise_seed",
                                                                                           None]
    assert [w.name for w in widget_layout(comfyui.input_types("LoadImage"))] == ["image", None]
    assert [w.name for w in widget_layout(comfyui.input_types("VAEDecode"))] == []


def test_saved_workflow_becomes_the_prompt_the_frontend_would_queue(comfyui):
    prompt = comfyui.to_prompt(saved_workflow("model.safetensors"))
    assert sorted(prompt, key=int) == ["1", "2", "3", "4", "5", "6", "7", "13"]  # no notes, primitive, reroute,
    assert prompt["5"]["inputs"] == {"seed": 42, "steps": 2, "cfg": 5.0, "sampler_name": "euler",  # muted, bypassed
                                     "scheduler": "normal", "denoise": 1.0, "model": ["1", 0],
                                     "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0]}
    assert prompt["3"]["inputs"] == {"text": "blurry", "clip": ["1", 1]}  # the primitive wins over the stale value
    assert prompt["6"]["inputs"] == {"samples": ["5", 0], "vae": ["1", 2]}  # through the bypassed upscale
    assert prompt["13"]["inputs"] == {"image": "example.png"}  # the upload button is not sent
    assert prompt["2"]["_meta"] == {"title": "Positive"}


def test_link_objects_of_the_newer_format_are_read_too(comfyui):
    workflow = saved_workflow("model.safetensors")
    keys = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")
    workflow["links"] = [dict(zip(keys, link)) for link in workflow["links"]]
    assert comfyui.to_prompt(workflow) == comfyui.to_prompt(saved_workflow("model.safetensors"))


def test_translation_refuses_what_it_cannot_do_faithfully(comfyui):
    workflow = saved_workflow("model.safetensors")
    workflow["nodes"][4]["widgets_values"] = [42, 2, 5.0, "euler", "normal", 1.0]  # control value missing
    with pytest.raises(WorkflowFormatError, match="KSampler.*6 widget values.*7 widgets"):
        comfyui.to_prompt(workflow)
    workflow = saved_workflow("model.safetensors")
    workflow["nodes"].append(node(20, "SomeUninstalledNode", []))
    with pytest.raises(WorkflowFormatError, match="SomeUninstalledNode.*not installed"):
        workflow_to_prompt(workflow, comfyui.input_types)
    workflow = saved_workflow("model.safetensors")
    workflow["definitions"] = {"subgraphs": [{"id": "x"}]}
    with pytest.raises(WorkflowFormatError, match="subgraphs"):
        comfyui.to_prompt(workflow)


def test_widgets_of_a_saved_workflow_can_be_set_by_name(comfyui):
    workflow = saved_workflow("model.safetensors")
    edited = comfyui.with_widgets(workflow, "KSampler", steps=1, cfg=2.5)
    assert edited["nodes"][4]["widgets_values"] == [42, "randomize", 1, 2.5, "euler", "normal", 1.0]
    assert workflow["nodes"][4]["widgets_values"][2] == 2  # the original is untouched
    with pytest.raises(WorkflowFormatError, match="no widgets \\['stepz'\\]"):
        comfyui.with_widgets(workflow, "KSampler", stepz=1)


def test_plain_sdxl_text_to_image_runs_through_comfyuis_engine(comfyui, sdxl_checkpoint):
    workflow = comfyui.with_widgets(saved_workflow("some_sdxl.safetensors"), "CheckpointLoaderSimple",
                                    ckpt_name=sdxl_checkpoint)
    run = comfyui.run(workflow, outputs=["1", "6"], fresh=True)
    model = run.outputs["1"][0]
    assert type(model.model.model_config).__name__ == "SDXL"  # CheckpointLoaderSimple detected the file as SDXL
    image = run.outputs["6"][0]
    assert image.shape == (1, SIZE, SIZE, 3) and torch.isfinite(image).all()
    assert image.std() > 0  # random weights still draw something, not a flat or NaN picture
    assert run.ui["7"]["images"][0]["filename"].startswith("csg_test")  # SaveImage wrote into the test's output dir
    assert "12" not in run.executed() and "14" not in run.executed()  # muted and bypassed nodes never ran
    steps = [(value, total) for node_id, value, total in run.progress if node_id == "5"]
    assert steps[-1] == (2, 2)  # KSampler reported its steps to the progress bar


def test_a_failing_node_is_reported_with_its_error(comfyui, sdxl_checkpoint):
    workflow = saved_workflow(sdxl_checkpoint)
    workflow["nodes"][0]["widgets_values"] = ["missing.safetensors"]
    with pytest.raises(WorkflowFailed, match="ComfyUI rejected") as refused:
        comfyui.run(workflow)
    assert "missing.safetensors" in str(refused.value)
    assert "1" in refused.value.error["node_errors"]  # the loader node is named as the culprit
