"""Write the shipped workflows (workflows/*.json) in the format ComfyUI's frontend saves and loads.

    COMFYUI_PATH=/path/to/ComfyUI /path/to/comfy-venv/bin/python tools/build_workflows.py

Sockets, output names and the order of widget values come from the node definitions of a running
ComfyUI with this pack loaded (tools/comfyui_harness.py), so after a node changes a re-run brings
every workflow up to date. Each workflow below places nodes on the canvas, wires them by output
name, frames the causal steps in groups and explains itself in a note. tests/comfyui/
test_workflows.py executes every file through ComfyUI's engine.
"""

from __future__ import annotations

import json
import sys
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script from a checkout
    sys.path.insert(0, str(ROOT))

from tools.workflow_format import UPLOAD_OPTIONS, input_entries, widget_layout  # noqa: E402

FRONTEND_VERSION = "1.27.10"  # the frontend ComfyUI 0.3.64 pins
SDXL_BASE = {"name": "sd_xl_base_1.0.safetensors", "directory": "checkpoints",
             "url": "https://huggingface.co/stabilityai/stable-diffusion-xl-base-1.0/resolve/main/"
                    "sd_xl_base_1.0.safetensors"}
EXAMPLE_IMAGE = "portrait.png"  # csg/examples/portrait.png, copied or uploaded into ComfyUI's input folder
COLUMN = 380  # canvas units between node columns
GROUP_COLORS = {"factual": "#3f789e", "understanding": "#8A8", "abduction": "#a1309b", "action": "#b06634",
                "results": "#88A"}


@dataclass(frozen=True)
class Out:
    node: Node
    slot: int
    type: str


@dataclass
class Node:
    id: int
    type: str
    pos: tuple[float, float]
    size: tuple[float, float]
    title: str | None
    widgets: list[Any]
    inputs: list[dict]
    outputs: list[dict]
    properties: dict = field(default_factory=dict)

    def out(self, name: str) -> Out:
        for slot, socket in enumerate(self.outputs):
            if socket["name"] == name:
                return Out(self, slot, socket["type"])
        raise KeyError(f"{self.type} has no output {name!r}; it has {[s['name'] for s in self.outputs]}")


class Canvas:
    """One workflow under construction: ``add`` nodes (widgets by name, links as ``Out``), ``group`` them."""

    def __init__(self, comfy):
        self.comfy = comfy
        self.nodes: list[Node] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

    def add(self, class_type: str, pos: tuple[float, float], title: str | None = None,
            size: tuple[float, float | None] = (320, None), **values: Any) -> Node:
        definition = self.comfy.input_types(class_type)
        entries = input_entries(definition)
        widgets = widget_layout(definition)
        unknown = set(values) - {name for name, _, _ in entries}
        if unknown:
            raise KeyError(f"{class_type} has no inputs {sorted(unknown)}")
        node = Node(len(self.nodes) + 1, class_type, pos, size, title, [], [], self._outputs(class_type),
                    {"Node name for S&R": class_type})
        widget_names = {w.name for w in widgets}
        for name, kind, _options in entries:
            value = values.get(name)
            if name in widget_names and not isinstance(value, Out):
                continue
            socket = {"name": name, "type": kind if isinstance(kind, str) else "COMBO", "link": None}
            if name in widget_names:
                socket["widget"] = {"name": name}
            if isinstance(value, Out):
                socket["link"] = self._link(value, node, len(node.inputs))
            node.inputs.append(socket)
        for widget, (name, kind, options) in zip(widgets, self._widget_specs(entries, widgets)):
            if widget.name is None:  # the frontend's companion widget: seed control or upload button
                node.widgets.append("image" if any(options.get(u) for u in UPLOAD_OPTIONS) else "fixed")
                continue
            value = values.get(name)
            if value is None or isinstance(value, Out):  # a linked widget still saves a value: its default
                value = default_value(kind, options)
            node.widgets.append(value)
        node.size = (size[0], size[1] or self._height(node, entries))
        self.nodes.append(node)
        return node

    def note(self, text: str, pos: tuple[float, float], size: tuple[float, float], title: str) -> Node:
        node = Node(len(self.nodes) + 1, "MarkdownNote", pos, size, title, [text], [], [])
        self.nodes.append(node)
        return node

    def group(self, title: str, members: list[Node], color: str, padding: float = 20) -> None:
        left = min(n.pos[0] for n in members) - padding
        top = min(n.pos[1] for n in members) - padding - 70  # room for the group's title, the nodes' title bars
                                                             # and badges
        right = max(n.pos[0] + n.size[0] for n in members) + padding
        bottom = max(n.pos[1] + n.size[1] for n in members) + padding
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left,
                                                                                      bottom - top],
                            "color": color, "font_size": 24, "flags": {}})

    def workflow(self, name: str) -> dict:
        order = self._execution_order()
        return {
            "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-causal-counterfactuals/{name}")),
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": [self._saved(n, order[n.id]) for n in self.nodes],
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": {"scale": 0.75, "offset": [520, 80]}, "frontendVersion": FRONTEND_VERSION},
            "version": 0.4,
        }

    # -- internals ------------------------------------------------------------------------------

    def _outputs(self, class_type: str) -> list[dict]:
        node_class = self.comfy.node_class(class_type)
        types = list(node_class.RETURN_TYPES)
        names = list(getattr(node_class, "RETURN_NAMES", None) or types)
        return [{"name": name, "type": kind, "slot_index": slot, "links": []}
                for slot, (name, kind) in enumerate(zip(names, types))]

    @staticmethod
    def _widget_specs(entries: list, widgets: list) -> list:
        """The (name, kind, options) behind each widget; a companion widget shares its owner's."""
        by_name = {name: (name, kind, options) for name, kind, options in entries}
        specs, owner = [], None
        for widget in widgets:
            owner = by_name[widget.name] if widget.name is not None else owner
            specs.append(owner)
        return specs

    def _link(self, origin: Out, target: Node, target_slot: int) -> int:
        link_id = len(self.links) + 1
        self.links.append([link_id, origin.node.id, origin.slot, target.id, target_slot, origin.type])
        origin.node.outputs[origin.slot]["links"].append(link_id)
        return link_id

    @staticmethod
    def _height(node: Node, entries: list) -> float:
        multiline = sum(1 for _, _, options in entries if options.get("multiline"))
        return 36 + 22 * max(len(node.inputs), len(node.outputs)) + 26 * len(node.widgets) + 70 * multiline

    def _execution_order(self) -> dict[int, int]:
        parents = {n.id: {link[1] for link in self.links if link[3] == n.id} for n in self.nodes}
        order: dict[int, int] = {}
        while len(order) < len(self.nodes):
            ready = [i for i in parents if i not in order and parents[i] <= set(order)]
            for node_id in ready:
                order[node_id] = len(order)
        return order

    @staticmethod
    def _saved(node: Node, order: int) -> dict:
        saved = {"id": node.id, "type": node.type, "pos": list(node.pos), "size": list(node.size), "flags": {},
                 "order": order, "mode": 0, "inputs": node.inputs, "outputs": node.outputs,
                 "properties": node.properties, "widgets_values": node.widgets}
        if node.title:
            saved["title"] = node.title
        return saved


def default_value(kind: Any, options: dict) -> Any:
    if "default" in options:
        return options["default"]
    choices = kind if isinstance(kind, (list, tuple)) else options.get("options") or [None]
    return choices[0] if choices else None


# -- shared parts ----------------------------------------------------------------------------------


@dataclass
class Factual:
    image: Node
    scaled: Node
    checkpoint: Node


def factual_image_and_model(canvas: Canvas) -> Factual:
    """Column 0: the photo, scaled and centre-cropped to SDXL's 1024², and the SDXL checkpoint."""
    image = canvas.add("LoadImage", (0, 0), title="Factual image", size=(320, 360), image=EXAMPLE_IMAGE)
    scaled = canvas.add("ImageScale", (0, 400), title="Scale to SDXL size (sides: multiples of 32)",
                        image=image.out("IMAGE"), upscale_method="lanczos", width=1024, height=1024, crop="center")
    checkpoint = canvas.add("CheckpointLoaderSimple", (0, 600), title="SDXL checkpoint",
                            ckpt_name=SDXL_BASE["name"])
    checkpoint.properties["models"] = [SDXL_BASE]
    canvas.group("Factual image and model", [image, scaled, checkpoint], GROUP_COLORS["factual"])
    return Factual(image, scaled, checkpoint)


@dataclass
class Understanding:
    vlm: Node
    extractor: Node


def vlm_and_graph(canvas: Canvas, factual: Factual) -> Understanding:
    """Column 1: the VLM endpoint and the concept extractor with its graph preview."""
    vlm = canvas.add("CSGOpenAIVLM", (COLUMN, 0), title="VLM (OpenAI-compatible server)",
                     base_url="http://127.0.0.1:11434/v1", model="qwen2.5vl:7b")
    extractor = canvas.add("CSGConceptExtractor", (COLUMN, 280), size=(320, 500), vlm=vlm.out("vlm"),
                           image=factual.scaled.out("IMAGE"))  # tall enough for the graph drawn in it
    graph = canvas.add("PreviewImage", (COLUMN, 818), title="Causal graph", size=(320, 340),
                       images=extractor.out("preview"))
    canvas.group("1. Extract (VLM)", [vlm, extractor, graph], GROUP_COLORS["understanding"])
    return Understanding(vlm, extractor)


def proposals(canvas: Canvas, understanding: Understanding, factual: Factual) -> Node:
    """Column 2: three diverse interventions from the VLM."""
    return canvas.add("CSGInterventionProposer", (2 * COLUMN, 0), vlm=understanding.vlm.out("vlm"),
                      image=factual.scaled.out("IMAGE"), causal_graph=understanding.extractor.out("causal_graph"),
                      base_prompt=understanding.extractor.out("base_prompt"))


def pick_one(canvas: Canvas, proposer: Node) -> Node:
    return canvas.add("CSGSelectIntervention", (2 * COLUMN, 290), title="Pick one intervention (1-3)",
                      interventions=proposer.out("interventions"), number=1)


def invert_and_edit(canvas: Canvas, factual: Factual, source_prompt: Out | str, *, intervention: Out,
                    causal_graph: Out, batched: bool = False) -> Node:
    """Column 3: Causal Inversion once, then the counterfactual(s) from it."""
    model = dict(model=factual.checkpoint.out("MODEL"), clip=factual.checkpoint.out("CLIP"),
                 vae=factual.checkpoint.out("VAE"))
    inverted = canvas.add("CSGCausalInversion", (3 * COLUMN, 0), image=factual.scaled.out("IMAGE"),
                          source_prompt=source_prompt, **model)
    canvas.group("3. Abduction: invert", [inverted], GROUP_COLORS["abduction"])
    if batched:
        edited = canvas.add("CSGCausalCounterfactuals", (3 * COLUMN, 520), inversion=inverted.out("inversion"),
                            interventions=intervention, causal_graph=causal_graph, **model)
    else:
        edited = canvas.add("CSGCausalCounterfactual", (3 * COLUMN, 520), inversion=inverted.out("inversion"),
                            intervention=intervention, causal_graph=causal_graph, **model)
    canvas.group("4. Action + prediction", [edited], GROUP_COLORS["action"])
    return edited


def read_me(canvas: Canvas, text: str) -> None:
    canvas.note(text, (-480, 0), (440, 760), "Read me")


def results(canvas: Canvas, factual: Factual, edited: Out, masks: Out, x: float, prefix: str,
            comparison_title: str = "Factual | counterfactual") -> None:
    """The factual image next to the counterfactual(s), the saved counterfactual(s) and the masks."""
    stitched = canvas.add("ImageStitch", (x, 0), title="Factual next to counterfactual",
                          image1=factual.scaled.out("IMAGE"), image2=edited, spacing_width=8)
    compare = canvas.add("PreviewImage", (x, 240), title=comparison_title, size=(520, 330),
                         images=stitched.out("IMAGE"))
    save = canvas.add("SaveImage", (x, 620), title="Counterfactual", size=(520, 330), images=edited,
                      filename_prefix=prefix)
    shown = canvas.add("PreviewImage", (x + 560, 0), title="Where each concept was edited (red)",
                       size=(420, 380), images=masks)
    canvas.group("Results", [stitched, compare, save, shown], GROUP_COLORS["results"])


# -- the workflows ------------------------------------------------------------------------------------

SETUP = """
**Before the first run**
- Put an SDXL checkpoint (epsilon prediction, e.g. `sd_xl_base_1.0.safetensors`) in `models/checkpoints`
  and pick it in *SDXL checkpoint*.
- Load your photo in *Factual image* (the pack's example is `csg/examples/portrait.png`).
  It is scaled and centre-cropped to 1024x1024; for other shapes pick e.g. 1152x896 (both sides
  multiples of 32).
- *VLM*: the base URL and model name of an OpenAI-compatible server (Ollama
  `http://127.0.0.1:11434/v1`, vLLM `http://127.0.0.1:8000/v1`, LM Studio, llama-server), or
  swap in **VLM (Local)** with a Qwen2.5-VL/Qwen3-VL folder in `models/LLM`. A key goes in an
  environment variable; type only its *name* in `api_key_env`, never the key.
"""

PAPER = """
Defaults are the paper's: 100 steps, skip 0.15, source guidance 3.5, edit scale 8,
threshold 0.7, warm-up 10, intersect masks. **Causal Inversion** runs once: ComfyUI caches
it, so changing an edit setting re-runs only the edit.
"""


def build_counterfactual(canvas: Canvas) -> None:
    factual = factual_image_and_model(canvas)
    understanding = vlm_and_graph(canvas, factual)
    proposer = proposals(canvas, understanding, factual)
    pick = pick_one(canvas, proposer)
    picked = canvas.add("PreviewAny", (2 * COLUMN, 430), title="The intervention", size=(320, 300),
                        source=pick.out("intervention_json"))
    canvas.group("2. Manipulate: do(X = x)", [proposer, pick, picked], GROUP_COLORS["understanding"])
    edited = invert_and_edit(canvas, factual, understanding.extractor.out("base_prompt"),
                             intervention=pick.out("intervention"),
                             causal_graph=understanding.extractor.out("causal_graph"))
    results(canvas, factual, edited.out("image"), edited.out("mask_preview"), 4 * COLUMN, "csg/counterfactual")
    read_me(canvas, f"""## What if...? A causal counterfactual of your photo
1. **Concept Extractor**: the VLM names the scene's concepts and the causal graph between them.
2. **Intervention Proposer**: three interventions do(concept = value), each with the changes it
   causes downstream; **Pick one** chooses which to render. Changes outside the target's
   descendants are stripped and reported. After the run **Concept Extractor** draws the graph
   in its node (the wheel zooms the drawing; **Fit**, **100%**); to choose the target yourself,
   click it in **Manual Intervention** (the manual_intervention template).
3. **Causal Inversion** (abduction) recovers the photo's noise.
4. **Causal Counterfactual** (action + prediction) edits the target and its changed
   descendants, each inside its own mask; everything else stays as it was.
{SETUP}{PAPER}""")


def build_manual_intervention(canvas: Canvas) -> None:
    factual = factual_image_and_model(canvas)
    understanding = vlm_and_graph(canvas, factual)
    manual = canvas.add("CSGManualIntervention", (2 * COLUMN, 0), title="do(target = new value)", size=(320, 548),
                        causal_graph=understanding.extractor.out("causal_graph"), target="age", new_value="old",
                        vlm=understanding.vlm.out("vlm"), image=factual.scaled.out("IMAGE"),
                        base_prompt=understanding.extractor.out("base_prompt"))
    report = canvas.add("PreviewAny", (2 * COLUMN, 644), title="What changes (and what was stripped)", size=(320, 260),
                        source=manual.out("report"))
    marked = canvas.add("PreviewImage", (2 * COLUMN, 944), title="Target and descendants", size=(320, 340),
                        images=manual.out("preview"))
    canvas.group("2. Manipulate: do(X = x)", [manual, report, marked], GROUP_COLORS["understanding"])
    edited = invert_and_edit(canvas, factual, understanding.extractor.out("base_prompt"),
                             intervention=manual.out("intervention"),
                             causal_graph=understanding.extractor.out("causal_graph"))
    results(canvas, factual, edited.out("image"), edited.out("mask_preview"), 4 * COLUMN, "csg/manual")
    read_me(canvas, f"""## Your own intervention: do(concept = value)
Type the concept (its name as the graph shows it, e.g. `age`, or its id `c1`) and the new value
in **do(target = new value)**. The VLM works out how the target's *descendants* in the causal
graph change (e.g. older -> gray hair, wrinkles); anything it proposes for a non-descendant is
stripped and listed in the report. Disconnect the VLM from that node to edit the target alone.
Or click a concept in the graph drawn in that node: it becomes the target; type its new value
below the graph (the drawing marks what may change).
{SETUP}{PAPER}""")


def build_three_counterfactuals(canvas: Canvas) -> None:
    factual = factual_image_and_model(canvas)
    understanding = vlm_and_graph(canvas, factual)
    proposer = proposals(canvas, understanding, factual)
    listed = canvas.add("PreviewAny", (2 * COLUMN, 290), title="The three interventions", size=(320, 380),
                        source=proposer.out("interventions_json"))
    canvas.group("2. Manipulate: 3 x do(X = x)", [proposer, listed], GROUP_COLORS["understanding"])
    edited = invert_and_edit(canvas, factual, understanding.extractor.out("base_prompt"),
                             intervention=proposer.out("interventions"),
                             causal_graph=understanding.extractor.out("causal_graph"), batched=True)
    results(canvas, factual, edited.out("image"), edited.out("mask_preview"), 4 * COLUMN, "csg/proposal",
            comparison_title="Factual | counterfactual, one per intervention")
    read_me(canvas, f"""## Three counterfactuals from one inversion
The VLM proposes three interventions on different concepts: one with many downstream changes,
one with few, one with none. **Causal Counterfactuals (batched)** renders all of them from ONE
inversion in ONE sampling loop, one image per intervention, in order. The masks come one per
changed concept, intervention after intervention.
{SETUP}{PAPER}""")


def build_baselines_comparison(canvas: Canvas) -> None:
    factual = factual_image_and_model(canvas)
    understanding = vlm_and_graph(canvas, factual)
    proposer = proposals(canvas, understanding, factual)
    pick = pick_one(canvas, proposer)
    canvas.group("2. Manipulate: do(X = x)", [proposer, pick], GROUP_COLORS["understanding"])
    base_prompt = understanding.extractor.out("base_prompt")
    edited = invert_and_edit(canvas, factual, base_prompt,
                             intervention=pick.out("intervention"),
                             causal_graph=understanding.extractor.out("causal_graph"))
    model = factual.checkpoint
    baselines = [canvas.add("CSGBaselineEdit", (3 * COLUMN, 1020 + 480 * k), title=f"Baseline: {method}",
                            model=model.out("MODEL"), clip=model.out("CLIP"), vae=model.out("VAE"),
                            image=factual.scaled.out("IMAGE"), intervention=pick.out("intervention"),
                            method=method, source_prompt=base_prompt)
                 for k, method in enumerate(["DDPM inversion (edit-friendly)", "DDIM inversion"])]
    canvas.group("Baselines: CFG edits", baselines, GROUP_COLORS["action"])
    row = factual.scaled.out("IMAGE")
    stitches = []
    for k, image in enumerate([edited.out("image"), *(b.out("image") for b in baselines)]):
        stitch = canvas.add("ImageStitch", (4 * COLUMN, 220 * k), image1=row, image2=image, spacing_width=8)
        stitches.append(stitch)
        row = stitch.out("IMAGE")
    compare = canvas.add("PreviewImage", (5 * COLUMN, 0), title="Factual | CSG | DDPM | DDIM",
                         size=(760, 300), images=row)
    save = canvas.add("SaveImage", (5 * COLUMN, 340), title="Comparison", size=(760, 300), images=row,
                      filename_prefix="csg/comparison")
    shown = canvas.add("PreviewImage", (4 * COLUMN, 720), title="CSG masks (red)", size=(320, 340),
                       images=edited.out("mask_preview"))
    canvas.group("Results", [*stitches, compare, save, shown], GROUP_COLORS["results"])
    read_me(canvas, f"""## CSG next to the usual inversion edits
The same intervention three ways, left to right: the factual photo, **Causal Counterfactual
(CSG)**, and two baselines that guide with classifier-free guidance on the intervention's whole
target prompt: edit-friendly **DDPM inversion** and **DDIM inversion**. The baselines have no
masks and no causal graph, so they tend to change non-descendants (background, identity) too.
{SETUP}{PAPER}""")


def build_hand_written_graph(canvas: Canvas) -> None:
    factual = factual_image_and_model(canvas)
    graph = canvas.add("CSGCausalGraphFromJSON", (COLUMN, 0), title="Causal graph (JSON, edit freely)", size=(320, 456))
    drawn = canvas.add("PreviewImage", (COLUMN, 496), title="Causal graph", size=(320, 340),
                       images=graph.out("preview"))
    intervention = canvas.add("CSGInterventionFromJSON", (2 * COLUMN, 0), title="Intervention (JSON, edit freely)",
                              size=(320, 456), causal_graph=graph.out("causal_graph"))
    report = canvas.add("PreviewAny", (2 * COLUMN, 496), title="What changes (and what was stripped)", size=(320, 260),
                        source=intervention.out("report"))
    canvas.group("1-2. Graph and do(X = x), by hand", [graph, drawn, intervention, report],
                 GROUP_COLORS["understanding"])
    summary = json.loads((ROOT / "csg" / "examples" / "portrait_graph.json").read_text())["scene_summary"]
    edited = invert_and_edit(canvas, factual, summary, intervention=intervention.out("intervention"),
                             causal_graph=graph.out("causal_graph"))
    results(canvas, factual, edited.out("image"), edited.out("mask_preview"), 4 * COLUMN, "csg/hand_written")
    read_me(canvas, """## No VLM: a causal graph and an intervention written by hand
Both JSON boxes start with the example portrait's graph (age -> hair colour, age -> skin
texture) and the intervention do(age = old). Edit them for your photo: concepts with ids,
names and current values; relationships cause -> effect (no cycles); an intervention with its
target, new value, the changes it propagates to descendants, and a generation prompt. Errors
name the culprit (unknown id, cycle, ...); changes to non-descendants are stripped and reported.
Or edit the graph in its node's drawing: **+ Concept**, click a concept to rename it or
**+ Effect…** to draw an edge (a cycle is refused on the spot), click an edge to delete it.
Use the graph's scene summary, or your own caption, as the inversion's source prompt.
""" + SETUP.split("- *VLM*")[0] + PAPER)


def build_evaluate_counterfactuals(canvas: Canvas) -> None:
    factual = factual_image_and_model(canvas)
    understanding = vlm_and_graph(canvas, factual)
    proposer = proposals(canvas, understanding, factual)
    canvas.group("2. Manipulate: 3 x do(X = x)", [proposer], GROUP_COLORS["understanding"])
    edited = invert_and_edit(canvas, factual, understanding.extractor.out("base_prompt"),
                             intervention=proposer.out("interventions"),
                             causal_graph=understanding.extractor.out("causal_graph"), batched=True)
    results(canvas, factual, edited.out("image"), edited.out("mask_preview"), 4 * COLUMN, "csg/evaluated",
            comparison_title="Factual | counterfactual, one per intervention")
    judge = canvas.add("CSGCounterfactualJudge", (4 * COLUMN, 1100), vlm=understanding.vlm.out("vlm"),
                       image=edited.out("image"), causal_graph=understanding.extractor.out("causal_graph"),
                       interventions=proposer.out("interventions"))
    lpips = canvas.add("CSGLPIPSDistance", (4 * COLUMN, 1330), factual=factual.scaled.out("IMAGE"),
                       counterfactual=edited.out("image"))
    effectiveness = canvas.add("PreviewAny", (4 * COLUMN + 360, 1100), title="VLM effectiveness, per concept",
                               size=(620, 200), source=judge.out("report"))
    minimality = canvas.add("PreviewAny", (4 * COLUMN + 360, 1330), title="LPIPS per counterfactual",
                            size=(620, 200), source=lpips.out("distances"))
    canvas.group("5. Evaluation: the paper's Table 1 metrics", [judge, lpips, effectiveness, minimality],
                 GROUP_COLORS["abduction"])
    read_me(canvas, f"""## Score the counterfactuals as the paper does
Three proposals are rendered in one batched run, then scored with the paper's two metrics:
- **Counterfactual Judge** (effectiveness, higher is better): the VLM looks at each
  counterfactual and says, for every concept the intervention changes, whether the new value
  shows; the score is the share shown, averaged over the images.
- **LPIPS Distance** (minimality, lower is better) between the factual photo and each
  counterfactual. It needs torchvision's `vgg16-397923af.pth` and the LPIPS heads
  `lpips_vgg_v0.1.pth` in `$TORCH_HOME/hub/checkpoints` (or their paths in the node); nothing is
  downloaded.
To score the baselines, connect a **Baseline Edit** image to another judge and LPIPS node.
{SETUP}{PAPER}""")


WORKFLOWS: dict[str, Callable[[Canvas], None]] = {
    "counterfactual": build_counterfactual,
    "manual_intervention": build_manual_intervention,
    "three_counterfactuals": build_three_counterfactuals,
    "baselines_comparison": build_baselines_comparison,
    "hand_written_graph": build_hand_written_graph,
    "evaluate_counterfactuals": build_evaluate_counterfactuals,
}


def main() -> None:
    from tools.comfyui_harness import start_comfyui

    comfy = start_comfyui(Path(tempfile.mkdtemp(prefix="csg-workflows-")))
    folder = ROOT / "workflows"
    folder.mkdir(exist_ok=True)
    for name, build in WORKFLOWS.items():
        canvas = Canvas(comfy)
        build(canvas)
        path = folder / f"{name}.json"
        path.write_text(json.dumps(canvas.workflow(name), indent=1) + "\n")
        print(f"wrote {path.relative_to(ROOT)}: {len(canvas.nodes)} nodes, {len(canvas.links)} links")


if __name__ == "__main__":
    main()
