// Draws a causal graph in a node's body as SVG: concepts as boxes (name, value), cause → effect arrows,
// laid out top-down by the server (csg.render's layered layout, sent in the view), so the node and the
// PNG preview agree. The graph is drawn at a fixed, legible size (at 100% canvas zoom its labels are 12-13 px)
// and the stage scrolls where the graph is larger than the node: the wheel zooms, dragging the background
// pans, "Fit" shrinks the whole graph into view and "100%" brings the legible size back.
// Colours come from the frontend's CSS variables (causal_graph.css), so light and dark themes both read.

const SVG = "http://www.w3.org/2000/svg";
const BOX_WIDTH = 150; // one layout unit (the server's x is in box widths, gaps included), in CSS px at 100%
const BOX_HEIGHT = 46;
const NOTE_HEIGHT = 15; // one more line per stripped change
const ROW_GAP = 58;
const MARGIN = 24;
const NAME_CHARACTERS = 20; // what fits in a box at the name's font size; the tooltip has the rest
const VALUE_CHARACTERS = 24;
const MAX_ZOOM = 3;
const MIN_ZOOM = 0.05; // "Fit" on the largest graph allowed (100 rows) still shrinks it into a node

let markerCount = 0; // marker ids must be unique in the page, and every graph node has its own SVG

// What each style means, in the legend's words and order.
const LEGENDS = {
  graph: [
    ["plain", "concept: name, current value"],
    ["edge", "cause → effect"],
  ],
  intervention: [
    ["target", "intervened target: old → new"],
    ["changed", "changed descendant: old → new"],
    ["unchanged", "unchanged"],
    ["stripped", "change stripped by the causal check"],
  ],
  pending: [
    ["target", "target: old → new (click another concept to change it)"],
    ["may-change", "descendant: the VLM may change it"],
    ["unchanged", "keeps its value"],
  ],
  pendingAlone: [ // no VLM connected: the target alone changes
    ["target", "target: old → new (click another concept to change it)"],
    ["unchanged", "keeps its value (connect a VLM to change the target's descendants too)"],
  ],
};

function svgElement(name, attributes = {}, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, value);
  parent?.appendChild(element);
  return element;
}

function htmlElement(name, className, parent) {
  const element = document.createElement(name);
  if (className) element.className = className;
  parent?.appendChild(element);
  return element;
}

function shorten(text, characters) {
  return text.length > characters ? `${text.slice(0, characters - 1)}…` : text;
}

// Each concept's style, shown value and notes. "intervention" is an executed (checked) intervention;
// "pending" a target and value chosen in the node that has not run yet: {targetId, newValue, propagates}, where
// propagates says a VLM is connected to carry the change on to the target's descendants.
function conceptStates(view, pending) {
  const { graph, intervention } = view;
  const states = new Map();
  if (intervention) {
    const changes = new Map(intervention.propagated_changes.map((change) => [change.concept_id, change]));
    for (const concept of graph.concepts) {
      const change = changes.get(concept.id);
      const stripped = (intervention.violations ?? []).filter((v) => v.concept_id === concept.id);
      let state;
      if (concept.id === intervention.target_concept_id) {
        state = { role: "target", value: `${intervention.original_value || concept.current_value} → ${intervention.new_value}` };
      } else if (change) {
        state = { role: "changed", value: `${change.original_value || concept.current_value} → ${change.new_value}`,
                  reason: change.reason };
      } else {
        state = { role: "unchanged", value: concept.current_value };
      }
      states.set(concept.id, { ...state, stripped });
    }
  } else if (pending) {
    const descendants = new Set(pending.propagates ? view.descendants[pending.targetId] : []);
    for (const concept of graph.concepts) {
      const role = concept.id === pending.targetId ? "target" : descendants.has(concept.id) ? "may-change" : "unchanged";
      const value = role === "target" ? `${concept.current_value} → ${pending.newValue || "?"}` : concept.current_value;
      states.set(concept.id, { role, value, stripped: [] });
    }
  } else {
    for (const concept of graph.concepts) states.set(concept.id, { role: "plain", value: concept.current_value, stripped: [] });
  }
  return states;
}

// Concepts the drawn intervention edits (or, pending, may edit); an edge between two of them carries the change.
function editedIds(view, pending) {
  if (view.intervention) {
    return new Set([view.intervention.target_concept_id, ...view.intervention.propagated_changes.map((c) => c.concept_id)]);
  }
  if (!pending) return new Set();
  return new Set([pending.targetId, ...(pending.propagates ? view.descendants[pending.targetId] : [])]);
}

function conceptTooltip(concept, state) {
  const lines = [`${concept.id} ${concept.name} = ${concept.current_value}`];
  if (concept.description) lines.push(concept.description);
  if (state.role === "target" || state.role === "changed") lines.push(`now: ${state.value}`);
  if (state.reason) lines.push(`why: ${state.reason}`);
  for (const violation of state.stripped) lines.push(`stripped → ${violation.new_value}: ${violation.problem}`);
  return lines.join("\n");
}

// A smooth path through the points, leaving and entering each vertically as the layers run.
function curveThrough(points) {
  let path = `M ${points[0][0]} ${points[0][1]}`;
  for (let i = 1; i < points.length; i += 1) {
    const [x1, y1] = points[i - 1];
    const [x2, y2] = points[i];
    const middle = (y1 + y2) / 2;
    path += ` C ${x1} ${middle} ${x2} ${middle} ${x2} ${y2}`;
  }
  return path;
}

export class GraphView {
  // onConceptClick(id), onEdgeClick(id), onBackgroundClick(): what the node does with a click (editing)
  constructor({ onConceptClick, onEdgeClick, onBackgroundClick } = {}) {
    this.onConceptClick = onConceptClick;
    this.onEdgeClick = onEdgeClick;
    this.onBackgroundClick = onBackgroundClick;
    this.element = htmlElement("div", "csg-graph");
    this.header = htmlElement("div", "csg-header", this.element);
    this.toolbar = htmlElement("div", "csg-toolbar", this.element);
    this.addButton("Fit", () => this.fit(), "Shrink the whole graph into the node");
    this.addButton("100%", () => this.zoomTo(1), "Back to the legible size (the graph scrolls in the node)");
    this.stage = htmlElement("div", "csg-stage", this.element);
    this.svg = svgElement("svg", { class: "csg-graph-svg" }, this.stage);
    this.panel = htmlElement("div", "csg-panel", this.element);
    this.message = htmlElement("div", "csg-message", this.element);
    this.legend = htmlElement("div", "csg-legend", this.element);
    this.placeholder = htmlElement("div", "csg-placeholder", this.stage);
    this.bounds = null; // the content's box in SVG units, set by show()
    this.zoom = 1; // CSS px per SVG unit; kept across redraws, so an edit keeps the user's zoom
    this.listenForClicks();
    this.listenForZoomAndPan();
  }

  addButton(label, onClick, title) {
    const button = htmlElement("button", "csg-button", this.toolbar);
    button.type = "button";
    button.textContent = label;
    button.title = title;
    button.addEventListener("click", onClick);
    return button;
  }

  showPlaceholder(text) {
    this.svg.replaceChildren();
    this.svg.style.display = "none";
    this.placeholder.textContent = text;
    this.placeholder.style.display = "";
    this.header.textContent = "";
    this.panel.replaceChildren();
    this.legend.replaceChildren();
  }

  showMessage(text, kind = "hint") {
    this.message.textContent = text ?? "";
    this.message.dataset.kind = kind;
  }

  // view: the server's graph view; options: {pending, selectedConceptId, selectedEdgeId, header}
  show(view, { pending = null, selectedConceptId = null, selectedEdgeId = null, header = null } = {}) {
    const { graph, layout } = view;
    const states = conceptStates(view, pending);
    const edited = editedIds(view, pending);
    this.placeholder.style.display = "none";
    this.svg.style.display = "";
    this.svg.replaceChildren();
    markerCount += 1;
    const markers = { plain: `csg-arrow-${markerCount}`, active: `csg-arrow-active-${markerCount}` };
    const defs = svgElement("defs", {}, this.svg);
    for (const [kind, id] of Object.entries(markers)) {
      const marker = svgElement("marker", { id, class: `csg-arrowhead csg-arrowhead-${kind}`, viewBox: "0 0 10 10",
                                            refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto" }, defs);
      svgElement("path", { d: "M 0 0 L 10 5 L 0 10 z" }, marker);
    }

    // Box sizes, then rows tall enough for the tallest box in each.
    const height = new Map(graph.concepts.map((c) => [c.id, BOX_HEIGHT + NOTE_HEIGHT * states.get(c.id).stripped.length]));
    const rowCount = 1 + Math.max(...Object.values(layout.concepts).map(([, row]) => row));
    const rowHeight = Array.from({ length: rowCount }, (_, row) =>
      Math.max(BOX_HEIGHT, ...graph.concepts.filter((c) => layout.concepts[c.id][1] === row).map((c) => height.get(c.id))));
    const rowTop = [0];
    for (let row = 1; row < rowCount; row += 1) rowTop.push(rowTop[row - 1] + rowHeight[row - 1] + ROW_GAP);
    const centreX = (x) => x * BOX_WIDTH;
    const box = (id) => {
      const [x, row] = layout.concepts[id];
      return { left: centreX(x) - BOX_WIDTH / 2, top: rowTop[row], height: height.get(id) };
    };

    // Where each edge leaves its cause and enters its effect: spread over the middle of the box's side,
    // ordered by where the other end lies, so arrows do not cross at the box.
    const routes = new Map(layout.edges.map((route) => [`${route.cause_id}>${route.effect_id}`, route]));
    const firstStep = (route) => (route.waypoints[0] ?? layout.concepts[route.effect_id])[0];
    const lastStep = (route) => (route.waypoints.at(-1) ?? layout.concepts[route.cause_id])[0];
    const ports = new Map();
    for (const [end, step] of [["cause_id", firstStep], ["effect_id", lastStep]]) {
      const byConcept = new Map();
      for (const route of layout.edges) byConcept.set(route[end], [...(byConcept.get(route[end]) ?? []), route]);
      for (const [id, group] of byConcept) {
        group.sort((a, b) => step(a) - step(b));
        group.forEach((route, i) => {
          const key = `${route.cause_id}>${route.effect_id}:${end}`;
          ports.set(key, box(id).left + BOX_WIDTH * (0.2 + (0.6 * (i + 1)) / (group.length + 1)));
        });
      }
    }

    const edgeLayer = svgElement("g", { class: "csg-edges" }, this.svg);
    const names = new Map(graph.concepts.map((c) => [c.id, c.name]));
    for (const relationship of graph.relationships) {
      const key = `${relationship.cause_id}>${relationship.effect_id}`;
      const route = routes.get(key);
      const cause = box(relationship.cause_id);
      const effect = box(relationship.effect_id);
      const points = [
        [ports.get(`${key}:cause_id`), cause.top + cause.height],
        ...route.waypoints.map(([x, row]) => [centreX(x), rowTop[row] + rowHeight[row] / 2]),
        [ports.get(`${key}:effect_id`), effect.top],
      ];
      const active = edited.has(relationship.cause_id) && edited.has(relationship.effect_id);
      const classes = ["csg-edge", active && "csg-edge-active", relationship.id === selectedEdgeId && "csg-selected"];
      const group = svgElement("g", { class: classes.filter(Boolean).join(" "), "data-edge-id": relationship.id,
                                      "data-cause-id": relationship.cause_id, "data-effect-id": relationship.effect_id },
                               edgeLayer);
      const d = curveThrough(points);
      svgElement("path", { class: "csg-edge-hit", d }, group); // a wide invisible stroke, easy to click
      svgElement("path", { class: "csg-edge-line", d, "marker-end": `url(#${active ? markers.active : markers.plain})` }, group);
      const description = relationship.description ? `: ${relationship.description}` : "";
      svgElement("title", {}, group).textContent =
        `${relationship.id} ${names.get(relationship.cause_id)} → ${names.get(relationship.effect_id)}${description}`;
    }

    const conceptLayer = svgElement("g", { class: "csg-concepts" }, this.svg);
    for (const concept of graph.concepts) {
      const state = states.get(concept.id);
      const { left, top, height: boxHeight } = box(concept.id);
      const classes = ["csg-concept", `csg-role-${state.role}`, state.stripped.length && "csg-has-stripped",
                       concept.id === selectedConceptId && "csg-selected"];
      const group = svgElement("g", { class: classes.filter(Boolean).join(" "), "data-concept-id": concept.id,
                                      "data-role": state.role }, conceptLayer);
      svgElement("rect", { class: "csg-box", x: left, y: top, width: BOX_WIDTH, height: boxHeight, rx: 9 }, group);
      const middle = left + BOX_WIDTH / 2;
      svgElement("text", { class: "csg-name", x: middle, y: top + 19 }, group).textContent = shorten(concept.name, NAME_CHARACTERS);
      svgElement("text", { class: "csg-value", x: middle, y: top + 36 }, group).textContent = shorten(state.value, VALUE_CHARACTERS);
      state.stripped.forEach((violation, i) => {
        svgElement("text", { class: "csg-note", x: middle, y: top + 36 + NOTE_HEIGHT * (i + 1) }, group).textContent =
          shorten(`stripped → ${violation.new_value || "(none)"}`, VALUE_CHARACTERS);
      });
      svgElement("title", {}, group).textContent = conceptTooltip(concept, state);
    }

    this.header.textContent = header ?? "";
    this.header.title = graph.scene_summary ?? "";
    this.drawLegend(view.intervention ? "intervention" : pending ? (pending.propagates ? "pending" : "pendingAlone")
                                                                 : "graph");
    const lefts = graph.concepts.map((c) => box(c.id).left);
    const bottom = Math.max(...graph.concepts.map((c) => box(c.id).top + box(c.id).height));
    this.bounds = { x: Math.min(...lefts) - MARGIN, y: -MARGIN,
                    width: Math.max(...lefts) - Math.min(...lefts) + BOX_WIDTH + 2 * MARGIN, height: bottom + 2 * MARGIN };
    this.svg.setAttribute("viewBox", [this.bounds.x, this.bounds.y, this.bounds.width, this.bounds.height].join(" "));
    this.applyZoom();
  }

  drawLegend(kind) {
    this.legend.replaceChildren();
    for (const [role, label] of LEGENDS[kind]) {
      const item = htmlElement("span", "csg-legend-item", this.legend);
      item.dataset.role = role;
      htmlElement("span", `csg-swatch csg-swatch-${role}`, item);
      htmlElement("span", "", item).textContent = label;
    }
  }

  fit() {
    if (!this.bounds) return;
    const room = Math.min(this.stage.clientWidth / this.bounds.width, this.stage.clientHeight / this.bounds.height);
    this.zoomTo(Math.min(1, room));
  }

  zoomTo(zoom) {
    this.zoom = Math.min(Math.max(zoom, MIN_ZOOM), MAX_ZOOM);
    this.applyZoom();
  }

  applyZoom() {
    if (!this.bounds) return;
    this.svg.setAttribute("width", this.bounds.width * this.zoom);
    this.svg.setAttribute("height", this.bounds.height * this.zoom);
  }

  // One listener for every box and edge: a graph of 500 edges needs no 600 listeners of its own.
  listenForClicks() {
    this.svg.addEventListener("click", (event) => {
      const concept = event.target.closest(".csg-concept");
      const edge = event.target.closest(".csg-edge");
      if (concept) this.onConceptClick?.(concept.dataset.conceptId);
      else if (edge) this.onEdgeClick?.(edge.dataset.edgeId);
    });
  }

  listenForZoomAndPan() {
    this.stage.addEventListener("wheel", (event) => {
      if (!this.bounds || this.svg.style.display === "none") return;
      event.preventDefault(); // the wheel zooms the graph, not the canvas behind the node
      event.stopPropagation();
      // keep the point under the pointer where it is
      const point = new DOMPoint(event.clientX, event.clientY).matrixTransform(this.svg.getScreenCTM().inverse());
      this.zoomTo(this.zoom * Math.exp(-event.deltaY * 0.0015));
      const moved = point.matrixTransform(this.svg.getScreenCTM());
      this.stage.scrollLeft += moved.x - event.clientX;
      this.stage.scrollTop += moved.y - event.clientY;
    }, { passive: false });

    let drag = null;
    this.stage.addEventListener("pointerdown", (event) => {
      if (event.button !== 0 || !this.bounds || event.target.closest(".csg-concept, .csg-edge, .csg-placeholder")) return;
      event.stopPropagation();
      drag = { client: [event.clientX, event.clientY], scroll: [this.stage.scrollLeft, this.stage.scrollTop], moved: false };
      this.stage.setPointerCapture(event.pointerId);
    });
    this.stage.addEventListener("pointermove", (event) => {
      if (!drag) return;
      const [dx, dy] = [event.clientX - drag.client[0], event.clientY - drag.client[1]];
      drag.moved ||= Math.hypot(dx, dy) > 3;
      this.stage.scrollLeft = drag.scroll[0] - dx;
      this.stage.scrollTop = drag.scroll[1] - dy;
    });
    this.stage.addEventListener("pointerup", (event) => {
      if (!drag) return;
      this.stage.releasePointerCapture(event.pointerId);
      if (!drag.moved) this.onBackgroundClick?.();
      drag = null;
    });
  }
}
