// The pack's frontend extension: the graph nodes draw their causal graph in the node body, and two of them
// edit it there.
//
//   Causal Graph From JSON   draws its graph_json widget; add, rename and delete concepts and edges. Every edit
//                            is checked by the server (the same CausalGraph check the node runs) before it is
//                            written to graph_json, so a cycle is refused on the spot and the message says why.
//   Manual Intervention      draws the graph it receives: from the upstream Causal Graph From JSON's widget when
//                            connected to one, else from the last run. Click a concept to make it the target and
//                            type its new value; its descendants are marked as what the VLM may change. Writes the
//                            target and new_value widgets.
//   Concept Extractor, Intervention From JSON, Causal Graph Preview
//                            draw what their last run sent (the UI output "causal_graph", csg/view.py).
//
// Edits only write the nodes' own widgets, so saving, queueing, undo and redo go through ComfyUI as for any
// widget change. Nothing is fetched from outside the ComfyUI server. Broken JSON typed into Causal Graph From JSON
// leaves the last valid drawing in place, with where the error is and a button that brings that graph back.
//
// Both of the frontend's renderers draw the graph: the classic canvas, and Vue nodes ("Nodes 2.0") in frontends
// whose Vue nodes show an extension's DOM widgets. Where they do not, a warning says so once.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { GraphView } from "./graph_drawing.js";
import {
  addConcept, addRelationship, deleteConcept, deleteRelationship, findConcept, findEdge, updateConcept,
  updateRelationship,
} from "./graph_editing.js";

const GRAPH_VIEW_KEY = "causal_graph"; // nodes/graph_nodes.py GRAPH_VIEW_KEY
const GRAPH_VIEW_ROUTE = "/causal_counterfactuals/graph_view"; // nodes/web_routes.py
const GRAPH_EDITOR = "CSGCausalGraphFromJSON";
const INTERVENTION_PICKER = "CSGManualIntervention";
const GRAPH_NODE_TYPES = new Set([GRAPH_EDITOR, INTERVENTION_PICKER, "CSGConceptExtractor", "CSGInterventionFromJSON",
                                  "CSGCausalGraphPreview"]);
const WIDGET_NAME = "causal_graph_view";
const WIDGET_MIN_HEIGHT = 300;
const NODE_MIN_WIDTH = 480;
const GRAPH_KEYS = ["scene_summary", "concepts", "relationships"]; // graph_json's order unless the user's differs
const CONTEXT_CHARACTERS = 24; // of the JSON shown either side of a syntax error
const RENDER_CHECK_MS = 2000; // a node drawn by Vue nodes without its graph this long after loading cannot show it
let warnedNotShown = false;

// Vue nodes ("Nodes 2.0") in older frontends (1.27) draw a node without an extension's DOM widgets: the graph is
// missing without a word. Say so once, with the way out.
function warnIfNotShown(node, element) {
  if (warnedNotShown || element.isConnected || !window.LiteGraph?.vueNodesMode) return;
  if (!document.querySelector(`.lg-node[data-node-id="${node.id}"]`)) return; // not drawn (yet): nothing to judge
  warnedNotShown = true;
  const detail = "This ComfyUI frontend's Vue nodes (Nodes 2.0) cannot show the causal graph inside the nodes. " +
    "Turn Vue nodes off (Settings, or the canvas menu) to see and edit it, or update ComfyUI's frontend " +
    "(comfyui-frontend-package): newer ones show it in both modes. The nodes still run.";
  console.warn(`causal counterfactuals: ${detail}`);
  app.extensionManager?.toast?.add({ severity: "warn", summary: "Causal graph not shown", detail, life: 0 });
}
const TYPING_PAUSE_MS = 400; // redraw after the user stops typing JSON, not on every key

const stylesheet = document.createElement("link");
stylesheet.rel = "stylesheet";
stylesheet.href = new URL("./causal_graph.css", import.meta.url).href;
document.head.appendChild(stylesheet);

// The server's view of a graph written as JSON text: {view} or {error}.
async function requestView(graphJson) {
  let response;
  try {
    response = await api.fetchApi(GRAPH_VIEW_ROUTE, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ graph_json: graphJson }),
    });
  } catch (error) {
    return { error: `The ComfyUI server could not be reached to draw the graph (${error.message}); is it running?` };
  }
  if (response.ok) return response.json();
  // A refused request (400, 413, 503 when busy) says why in {error}; show that, not just the status.
  let reason = "";
  try {
    reason = (await response.json()).error ?? "";
  } catch {
    // no JSON answer (a proxy's error page): the status alone
  }
  return { error: `The server did not draw the graph (HTTP ${response.status}). ${reason}`.trim() };
}

function widgetNamed(node, name) {
  return node.widgets?.find((widget) => widget.name === name);
}

// ComfyUI's undo and redo compare snapshots of the workflow; take one after each edit of a widget.
function recordChange() {
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState();
}

function upstreamNode(node, inputName) {
  const input = node.inputs?.find((slot) => slot.name === inputName);
  const link = node.graph?.getLink(input?.link);
  return link ? node.graph.getNodeById(link.origin_id) : null;
}

function downstreamNodes(node) {
  if (!node.graph) return [];
  return (node.outputs ?? [])
    .flatMap((output) => output.links ?? [])
    .map((id) => node.graph.getLink(id))
    .filter(Boolean)
    .map((link) => node.graph.getNodeById(link.target_id))
    .filter(Boolean);
}

// The graph as graph_json text, its top-level keys in the order the user's text had them (an edit moves nothing).
function graphText(graph, previousText) {
  let order = GRAPH_KEYS;
  try {
    order = [...new Set([...Object.keys(JSON.parse(previousText)), ...GRAPH_KEYS])];
  } catch {
    // the previous text was no JSON object: the default order
  }
  const ordered = Object.fromEntries(order.filter((key) => key in graph).map((key) => [key, graph[key]]));
  return JSON.stringify({ ...ordered, ...graph }, null, 2);
}

// Where in the text a JSON syntax error that the server placed at "line L, column C" lies, in words:
// the concept or relationship it is in, and the text around it.
function whereInJson(text, error) {
  const found = error.match(/line (\d+), column (\d+)/);
  if (!found) return "";
  const lines = text.split("\n");
  const [line, column] = [Number(found[1]), Number(found[2])];
  const offset = lines.slice(0, line - 1).reduce((sum, l) => sum + l.length + 1, 0) + column - 1;
  const ids = [...text.slice(0, offset).matchAll(/"id"\s*:\s*"([^"]*)"/g)];
  const inside = ids.length ? ` It is in or just after the entry with id "${ids.at(-1)[1]}".` : "";
  const before = text.slice(Math.max(0, offset - CONTEXT_CHARACTERS), offset).replace(/\s+/g, " ");
  const after = text.slice(offset, offset + CONTEXT_CHARACTERS).replace(/\s+/g, " ");
  return `${inside} The text there: …${before.trimEnd()} ⟶ here ⟵ ${after.trimStart()}…`;
}

// The server's cycle message with each id written as its concept's name.
function namedCycle(error, graph) {
  const names = new Map(graph.concepts.map((c) => [c.id, c.name]));
  return error.replace(/cycle: (.+?)\. /, (_, path) =>
    `cycle: ${path.split(" -> ").map((id) => names.get(id) ?? id).join(" → ")}. `);
}

function doText(graph, targetId, newValue) {
  return `do(${graph.concepts.find((c) => c.id === targetId).name} = ${newValue || "?"})`;
}

// One per graph node: owns the node's GraphView and decides what it shows and what a click does.
class GraphNodeController {
  constructor(node) {
    this.node = node;
    this.type = node.comfyClass;
    this.executedView = null; // what the last run sent; not saved with the workflow
    this.shownView = null; // the view drawn now
    this.lastValidJson = null; // Causal Graph From JSON: the graph_json text of the last graph drawn
    this.selectedConceptId = null;
    this.selectedEdgeId = null;
    this.pickingEffectFor = null; // the cause, while "add an edge" waits for its effect
    this.requestNumber = 0; // a refresh whose number is no longer this one is out of date: its answer is dropped
    this.writing = false; // while we write a widget, its callback is ours, not the user typing
    this.view = new GraphView({
      onConceptClick: (id) => this.conceptClicked(id),
      onEdgeClick: (id) => this.edgeClicked(id),
      onBackgroundClick: () => this.select(null, null),
    });
    if (this.type === GRAPH_EDITOR) {
      this.view.addButton("+ Concept", () => this.addConcept(), "Add a concept, then name it below");
    }
    if (this.type === GRAPH_EDITOR) {
      this.view.restoreButton = this.view.addButton("Restore last valid graph", () => this.restoreLastValid(),
                                                    "Put the last graph drawn back into graph_json");
      this.view.restoreButton.hidden = true;
    }
    const widget = node.addDOMWidget(WIDGET_NAME, "causal-graph", this.view.element, {
      getMinHeight: () => WIDGET_MIN_HEIGHT,
      serialize: false, // not an input: it draws the node's own widgets and the last run
    });
    widget.serialize = false; // nor part of the saved widgets_values
    node.setSize([Math.max(node.size[0], NODE_MIN_WIDTH), node.computeSize()[1]]);
    this.watchInputs();
  }

  // Typing in the node's own widgets redraws the graph (the graph JSON, or the target and value).
  watchInputs() {
    const names = this.type === GRAPH_EDITOR ? ["graph_json"] : this.type === INTERVENTION_PICKER ? ["target", "new_value"] : [];
    for (const name of names) {
      const widget = widgetNamed(this.node, name);
      const previous = widget.callback;
      widget.callback = (...args) => {
        previous?.apply(widget, args);
        if (this.writing) return;
        clearTimeout(this.typingTimer);
        this.typingTimer = setTimeout(() => this.widgetsChanged(), TYPING_PAUSE_MS);
      };
    }
  }

  widgetsChanged() {
    this.refresh();
    if (this.type === GRAPH_EDITOR) this.refreshDownstream();
  }

  // Write one of the node's widgets as if the user had typed it, as one undoable change.
  writeWidget(name, value) {
    this.writing = true;
    try {
      widgetNamed(this.node, name).value = value;
    } finally {
      this.writing = false;
    }
    this.node.setDirtyCanvas(true, true);
    recordChange();
  }

  refreshDownstream() {
    for (const node of downstreamNodes(this.node)) node.causalGraphController?.refresh();
  }

  executed(output) {
    const view = output?.[GRAPH_VIEW_KEY]?.[0];
    if (!view) return;
    this.executedView = view;
    if (this.type !== GRAPH_EDITOR) this.refresh(); // the editor draws its widget, which is what ran
    this.refreshDownstream(); // a Manual Intervention behind a Concept Extractor draws what it extracted
  }

  // Draw what the node stands for now.
  async refresh() {
    this.view.element.dataset.nodeId = String(this.node.id); // known once the node is in a graph
    const number = ++this.requestNumber;
    const found = await this.currentView();
    if (number !== this.requestNumber) return;
    if (found.error && this.type === GRAPH_EDITOR && this.shownView) {
      // keep the last valid drawing; say what is wrong and where, and offer it back
      const text = widgetNamed(this.node, "graph_json").value;
      this.view.restoreButton.hidden = false;
      this.view.showMessage(`graph_json is not a valid graph, so the drawing shows the last valid one. ${found.error}`
                            + whereInJson(text, found.error), "error");
      return;
    }
    if (found.error) {
      this.shownView = null;
      this.view.showPlaceholder(found.error);
      return;
    }
    this.shownView = found.view;
    if (this.type === GRAPH_EDITOR) {
      this.lastValidJson = widgetNamed(this.node, "graph_json").value;
      this.view.restoreButton.hidden = true;
      if (this.view.message.dataset.kind === "error") this.view.showMessage("");
    }
    this.draw();
  }

  restoreLastValid() {
    this.writeWidget("graph_json", this.lastValidJson);
    this.widgetsChanged();
  }

  // Whether a VLM is connected to carry an intervention on to the target's descendants (Manual Intervention).
  propagates() {
    return Boolean(this.node.inputs?.find((slot) => slot.name === "vlm")?.link != null);
  }

  // {view} to draw, or {error: what to show instead}.
  async currentView() {
    if (this.type === GRAPH_EDITOR) return requestView(widgetNamed(this.node, "graph_json").value);
    if (this.type === INTERVENTION_PICKER) {
      const source = upstreamNode(this.node, "causal_graph");
      if (source?.comfyClass === GRAPH_EDITOR) return requestView(widgetNamed(source, "graph_json").value);
      const view = source?.causalGraphController?.executedView ?? this.executedView;
      if (view) return { view: { ...view, intervention: null } }; // the widgets, not the last run, say the intervention
      return { error: "Connect a causal graph, or run the workflow, to pick the target here." };
    }
    return this.executedView ? { view: this.executedView } : { error: "Run the workflow to see the graph here." };
  }

  draw() {
    const view = this.shownView;
    if (!view) return;
    const options = { selectedConceptId: this.selectedConceptId, selectedEdgeId: this.selectedEdgeId };
    if (this.type === INTERVENTION_PICKER) {
      const ran = this.executedView?.intervention;
      const target = findConcept(view.graph, widgetNamed(this.node, "target").value);
      const newValue = widgetNamed(this.node, "new_value").value;
      if (ran && ran.target_concept_id === target?.id && ran.new_value === newValue) {
        // The last run is what the widgets say: show what it changed, with the VLM's propagation.
        this.view.show({ ...view, intervention: ran }, { ...options, header: doText(view.graph, target.id, newValue) });
      } else if (target) {
        this.view.show(view, { ...options, pending: { targetId: target.id, newValue, propagates: this.propagates() },
                               header: doText(view.graph, target.id, newValue) });
      } else {
        this.view.show(view, { ...options, header: "Click a concept to intervene on it." });
      }
      this.showPickerPanel(view.graph, target);
      return;
    }
    const intervention = view.intervention;
    const header = intervention ? doText(view.graph, intervention.target_concept_id, intervention.new_value)
                                : view.graph.scene_summary;
    this.view.show(view, { ...options, header });
    if (this.type === GRAPH_EDITOR) this.showEditorPanel(view.graph);
  }

  select(conceptId, edgeId) {
    this.selectedConceptId = conceptId;
    this.selectedEdgeId = edgeId;
    this.pickingEffectFor = null;
    this.view.showMessage("");
    this.draw();
  }

  conceptClicked(id) {
    if (this.type === INTERVENTION_PICKER) {
      this.pickTarget(id);
    } else if (this.type === GRAPH_EDITOR) {
      if (this.pickingEffectFor) this.addEdge(this.pickingEffectFor, id);
      else this.select(id, null);
    }
  }

  edgeClicked(id) {
    if (this.type === GRAPH_EDITOR) this.select(null, id);
  }

  // -- Manual Intervention --------------------------------------------------------------------------------

  pickTarget(id) {
    const concept = this.shownView.graph.concepts.find((c) => c.id === id);
    this.writeWidget("target", concept.name);
    this.draw();
    this.view.panel.querySelector("input")?.focus();
  }

  showPickerPanel(graph, target) {
    const panel = this.view.panel;
    panel.replaceChildren();
    if (!target) return;
    const label = document.createElement("span");
    label.textContent = `New value of ${target.name} (now ${target.current_value}):`;
    const input = document.createElement("input");
    input.className = "csg-new-value";
    input.value = widgetNamed(this.node, "new_value").value;
    input.placeholder = "e.g. black hair";
    input.addEventListener("change", () => {
      this.writeWidget("new_value", input.value);
      this.draw();
    });
    panel.append(label, input);
  }

  // -- Causal Graph From JSON -----------------------------------------------------------------------------

  // Check an edited graph with the server; write it to graph_json only if it is a valid graph.
  async commit(graph, { selectConcept = null, selectEdge = null, refusal = "" } = {}) {
    if (!this.view.restoreButton.hidden) { // graph_json holds the user's broken text: an edit would overwrite it
      this.view.showMessage("Fix graph_json, or restore the last valid graph, before editing in the drawing.", "error");
      return;
    }
    const graphJson = graphText(graph, widgetNamed(this.node, "graph_json").value);
    const answer = await requestView(graphJson);
    this.requestNumber += 1; // a refresh that started meanwhile read the graph before this edit: drop its answer
    if (answer.error) {
      this.view.showMessage(`${refusal}${namedCycle(answer.error, graph)}`, "error");
      this.draw(); // undo what the inputs show; the graph is as it was
      return;
    }
    this.writeWidget("graph_json", graphJson);
    this.shownView = answer.view;
    this.lastValidJson = graphJson;
    this.selectedConceptId = selectConcept;
    this.selectedEdgeId = selectEdge;
    this.pickingEffectFor = null;
    this.view.showMessage("");
    this.draw();
    this.refreshDownstream();
  }

  addConcept() {
    if (!this.shownView) return; // the placeholder says why the JSON is no graph yet
    const { graph, id } = addConcept(this.shownView.graph);
    this.commit(graph, { selectConcept: id });
  }

  addEdge(causeId, effectId) {
    const graph = this.shownView.graph;
    const names = new Map(graph.concepts.map((c) => [c.id, c.name]));
    const refusal = `Edge ${names.get(causeId)} → ${names.get(effectId)} refused: `;
    this.pickingEffectFor = null;
    const problem = causeId === effectId ? "a concept cannot cause itself; click another concept."
      : findEdge(graph, causeId, effectId) ? "that edge exists already." : null;
    if (problem) {
      this.draw();
      this.view.showMessage(`${refusal}${problem}`, "error");
      return;
    }
    const added = addRelationship(graph, causeId, effectId);
    this.commit(added.graph, { selectEdge: added.id, refusal });
  }

  showEditorPanel(graph) {
    const panel = this.view.panel;
    panel.replaceChildren();
    const field = (label, value, onChange) => {
      const input = document.createElement("input");
      input.value = value;
      input.placeholder = label;
      input.title = label;
      input.dataset.field = label;
      input.addEventListener("change", () => onChange(input.value));
      panel.append(input);
      return input;
    };
    const button = (label, onClick) => {
      const element = document.createElement("button");
      element.type = "button";
      element.className = "csg-button";
      element.textContent = label;
      element.addEventListener("click", onClick);
      panel.append(element);
      return element;
    };
    const concept = graph.concepts.find((c) => c.id === this.selectedConceptId);
    const edge = graph.relationships.find((r) => r.id === this.selectedEdgeId);
    if (concept) {
      const edit = (fields) => this.commit(updateConcept(graph, concept.id, fields), { selectConcept: concept.id });
      field("name", concept.name, (name) => edit({ name }));
      field("current value", concept.current_value, (value) => edit({ current_value: value }));
      field("description", concept.description, (description) => edit({ description }));
      const addEffect = button("+ Effect…", () => {
        this.pickingEffectFor = concept.id;
        addEffect.setAttribute("aria-pressed", "true");
        this.view.showMessage(`Click the concept that ${concept.name} causes.`);
      });
      button("Delete concept", () => this.commit(deleteConcept(graph, concept.id)));
      if (!this.view.message.textContent) this.view.showMessage(`${concept.id}: edit it above, or add an edge from it.`);
    } else if (edge) {
      const names = new Map(graph.concepts.map((c) => [c.id, c.name]));
      const label = document.createElement("span");
      label.textContent = `${names.get(edge.cause_id)} → ${names.get(edge.effect_id)}`;
      panel.append(label);
      field("description", edge.description,
            (description) => this.commit(updateRelationship(graph, edge.id, { description }), { selectEdge: edge.id }));
      button("Delete edge", () => this.commit(deleteRelationship(graph, edge.id)));
    } else if (!this.view.message.textContent) {
      this.view.showMessage("Click a concept or an edge to edit it.");
    }
  }
}

app.registerExtension({
  name: "causal_counterfactuals.graph",

  async nodeCreated(node) {
    if (!GRAPH_NODE_TYPES.has(node.comfyClass)) return;
    const controller = new GraphNodeController(node);
    node.causalGraphController = controller;
    const onExecuted = node.onExecuted;
    node.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      controller.executed(output);
    };
    const onConnectionsChange = node.onConnectionsChange;
    node.onConnectionsChange = function () {
      onConnectionsChange?.apply(this, arguments);
      if (this.graph) controller.refresh();
    };
    controller.refresh();
    setTimeout(() => warnIfNotShown(node, controller.view.element), RENDER_CHECK_MS);
  },

  // Loading a workflow (and undo or redo, which reload it) sets widget values and links after nodeCreated.
  async afterConfigureGraph() {
    for (const node of app.graph.nodes) node.causalGraphController?.refresh();
  },
});
