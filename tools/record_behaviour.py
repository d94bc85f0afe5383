"""Record the latents of fixed-seed runs on the tiny random SDXL, for the "behaviour unchanged" tests.

    python tools/record_behaviour.py core        # writes tests/fixtures/behaviour_core.safetensors
    COMFYUI_PATH=/path/to/ComfyUI comfy-venv/bin/python tools/record_behaviour.py comfyui
                                                 # writes tests/fixtures/behaviour_comfyui.safetensors

The runs are defined here once (``core_runs``, ``comfyui_runs``); tests/test_behaviour_unchanged.py and
tests/comfyui/test_nodes_unchanged.py run them again and compare with the recording. Re-record only
when a change of results is intended, and say why in the commit. Each run is made twice here and the
recording refused unless both agree bit for bit, so the fixture never holds a result that this CPU
cannot reproduce.

Core: ``csg-counterfactual`` on the example portrait with its hand-written graph and intervention, at 32
pixels and 6 steps, for --method csg, ddpm and ddim: the PNG it writes (8-bit pixels), and the latents of
the same call through the Python API it makes (``counterfactuals`` / ``baseline_counterfactuals`` with the
CSGParams its flags give), since the command line writes no latents. ComfyUI: the Causal Inversion node
(x_T and noise maps; reference and exact mode), the all-in-one Causal Counterfactual node, the batched
Causal Counterfactuals node (two interventions) and Baseline Edit (both methods), on the small SDXL the
ComfyUI tests use, at 64 pixels and 6 steps.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures"
CORE_FIXTURE = FIXTURES / "behaviour_core.safetensors"
COMFYUI_FIXTURE = FIXTURES / "behaviour_comfyui.safetensors"

EXAMPLES = REPO / "csg" / "examples"
CLI_FLAGS = ["--steps", "6", "--warmup", "2", "--max-side", "32", "--device", "cpu", "--dtype", "float32"]
CLI_METHODS = ("csg", "ddpm", "ddim")
COMFY_SIZE, COMFY_STEPS, COMFY_WARMUP = 64, 6, 1


# -- core --------------------------------------------------------------------------------------------------


def core_runs() -> dict[str, torch.Tensor]:
    """The CLI's PNG pixels and the API's latents for each method (see the module docstring)."""
    from PIL import Image

    from csg.cli import main
    from csg.counterfactual import CSGParams, baseline_counterfactuals, counterfactuals
    from csg.diffusers_host import DiffusersSDXLHost
    from csg.graph import CausalGraph, Intervention
    from tools.random_sdxl import build_sdxl_components

    torch.set_num_threads(1)
    components = build_sdxl_components("tiny", seed=0)
    graph = CausalGraph.from_json((EXAMPLES / "portrait_graph.json").read_text())
    intervention = Intervention.from_json((EXAMPLES / "portrait_intervention.json").read_text())
    image = EXAMPLES / "portrait.png"
    out: dict[str, torch.Tensor] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "sdxl"
        for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2"):
            getattr(components, sub).save_pretrained(folder / sub)
        for method in CLI_METHODS:
            target = Path(tmp) / method
            code = main([str(image), "--graph-json", str(EXAMPLES / "portrait_graph.json"), "--intervention-json",
                         str(EXAMPLES / "portrait_intervention.json"), "--sdxl", str(folder), "--out", str(target),
                         "--method", method, *CLI_FLAGS])
            if code != 0:
                raise RuntimeError(f"csg-counterfactual --method {method} exited {code}")
            with Image.open(target / "counterfactual.png") as png:
                out[f"cli_{method}_png"] = torch.from_numpy(np.asarray(png.convert("RGB")).copy())
    host = DiffusersSDXLHost.from_components(components)
    params = CSGParams(num_steps=6, warmup=2, max_side=32)  # what CLI_FLAGS give; the rest are the flags' defaults
    source = graph.scene_summary
    out["api_csg_latent"] = counterfactuals(host, image, graph, [intervention], source_prompt=source,
                                            params=params)[0].latent
    for method in ("ddpm", "ddim"):
        out[f"api_{method}_latent"] = baseline_counterfactuals(host, image, [intervention], method=method,
                                                               source_prompt=source, params=params)[0].latent
    return {name: value.detach().cpu().contiguous() for name, value in out.items()}


# -- ComfyUI -----------------------------------------------------------------------------------------------


def comfyui_story(graph_module):
    graph = graph_module.CausalGraph.from_dict({
        "concepts": [{"id": "c1", "name": "hair color", "current_value": "blond"},
                     {"id": "c2", "name": "beard", "current_value": "no beard"},
                     {"id": "c3", "name": "sky", "current_value": "blue"}],
        "relationships": [{"id": "r1", "cause_id": "c1", "effect_id": "c2"}],
        "scene_summary": "a photo of a man"})
    hair = graph_module.Intervention.from_dict({
        "id": "i1", "target_concept_id": "c1", "target_concept_name": "hair color",
        "intervention_description": "make the hair black", "original_value": "blond", "new_value": "black",
        "propagated_changes": [{"concept_id": "c2", "concept_name": "beard", "original_value": "no beard",
                                "new_value": "black beard"}],
        "final_concept_states": {"c1": "black hair", "c2": "black beard"},
        "generation_prompt": "a photo of a man with black hair and a black beard"})
    sky = graph_module.Intervention.from_dict({
        "id": "i2", "target_concept_id": "c3", "target_concept_name": "sky", "intervention_description": "grey sky",
        "original_value": "blue", "new_value": "gray", "final_concept_states": {"c3": "gray sky"},
        "generation_prompt": "a photo of a man under a gray sky"})
    return graph, hair, sky


def comfyui_runs() -> dict[str, torch.Tensor]:
    """The pack's nodes on the small ComfyUI SDXL (see the module docstring)."""
    from tools.comfy_sdxl import build_comfy_sdxl, node_output, pack_module
    from tools.comfyui_harness import import_comfy_like_main

    import_comfy_like_main()
    torch.set_num_threads(1)
    small = build_comfy_sdxl(seed=0)
    nodes = pack_module("nodes.csg_nodes")
    baselines = pack_module("nodes.baseline_nodes").BaselineEdit
    graph, hair, sky = comfyui_story(pack_module("csg.graph"))
    image = torch.rand(1, COMFY_SIZE, COMFY_SIZE, 3, generator=torch.Generator().manual_seed(0))
    edit = (8.0, 0.7, COMFY_WARMUP, "intersect", False, False)
    out: dict[str, torch.Tensor] = {}
    for mode, exact in (("reference", False), ("exact", True)):
        inversion = node_output(nodes.CausalInversion.execute(small.model, small.clip, small.vae, image,
                                                              "a photo of a man", COMFY_STEPS, 0.15, 3.5, exact, 3,
                                                              0))[0]
        out[f"inversion_{mode}_x_T"], out[f"inversion_{mode}_noise_maps"] = inversion.x_T, inversion.noise_maps
        one = node_output(nodes.CausalCounterfactual.execute(small.model, small.clip, small.vae, inversion, hair,
                                                             *edit, causal_graph=graph))
        out[f"counterfactual_{mode}_latent"] = one[1]["samples"]
        out[f"counterfactual_{mode}_masks"] = one[2][:, ::8, ::8]  # nearest-upsampled from the 8x8 latent
    batched = node_output(nodes.CausalCounterfactuals.execute(small.model, small.clip, small.vae, inversion,
                                                              [hair, sky], *edit, causal_graph=graph))
    out["counterfactuals_exact_latent"] = batched[1]["samples"]
    for method, name in (("DDPM inversion (edit-friendly)", "ddpm"), ("DDIM inversion", "ddim")):
        latent = node_output(baselines.execute(small.model, small.clip, small.vae, image, hair, method,
                                               "a photo of a man", COMFY_STEPS, 0.15, 3.5, 7.5, 0))[1]
        out[f"baseline_{name}_latent"] = latent["samples"]
    return {name: value.detach().float().cpu().contiguous() for name, value in out.items()}


# -- recording ---------------------------------------------------------------------------------------------


def record(runs, path: Path) -> None:
    from safetensors.torch import save_file

    first, second = runs(), runs()
    differing = [name for name in first if not torch.equal(first[name], second[name])]
    if differing:
        raise RuntimeError(f"Two runs on this machine differ in {', '.join(differing)}; nothing recorded.")
    save_file(first, str(path))
    print(f"{path.relative_to(REPO)}: {len(first)} tensors, {path.stat().st_size} bytes, reproduced twice")


if __name__ == "__main__":
    if sys.argv[1:] not in (["core"], ["comfyui"]):
        sys.exit("usage: python tools/record_behaviour.py core|comfyui")
    sys.path.insert(0, str(REPO))
    if sys.argv[1] == "core":
        record(core_runs, CORE_FIXTURE)
    else:
        record(comfyui_runs, COMFYUI_FIXTURE)
