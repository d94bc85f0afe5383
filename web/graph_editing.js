// Edits of a causal graph as the JSON of Causal Graph From JSON holds it:
// {scene_summary, concepts: [{id, name, current_value, description}], relationships: [{id, cause_id, effect_id, description}]}.
// Each edit returns a new graph and leaves its argument alone, so a refused edit changes nothing.
// Whether the result is a valid graph (distinct names, no cycle, ...) is the server's call: the same
// check the node runs (csg.graph.CausalGraph), through the pack's graph_view route.

function copyOf(graph) {
  return {
    ...graph,
    concepts: graph.concepts.map((concept) => ({ ...concept })),
    relationships: graph.relationships.map((relationship) => ({ ...relationship })),
  };
}

// The first free id of the form c7 / r3, past every id already numbered that way.
function nextId(prefix, items) {
  const numbers = items
    .map((item) => item.id.match(new RegExp(`^${prefix}(\\d+)$`)))
    .filter(Boolean)
    .map((match) => Number(match[1]));
  return `${prefix}${Math.max(0, ...numbers) + 1}`;
}

function freeName(graph, base) {
  const taken = new Set(graph.concepts.map((concept) => concept.name.trim().toLowerCase()));
  for (let n = 1; ; n += 1) {
    const name = n === 1 ? base : `${base} ${n}`;
    if (!taken.has(name)) return name;
  }
}

export function addConcept(graph) {
  const edited = copyOf(graph);
  const id = nextId("c", edited.concepts);
  edited.concepts.push({ id, name: freeName(edited, "new concept"), current_value: "unknown", description: "" });
  return { graph: edited, id };
}

// fields: any of name, current_value, description
export function updateConcept(graph, id, fields) {
  const edited = copyOf(graph);
  Object.assign(edited.concepts.find((concept) => concept.id === id), fields);
  return edited;
}

// A concept goes with every edge that touches it.
export function deleteConcept(graph, id) {
  const edited = copyOf(graph);
  edited.concepts = edited.concepts.filter((concept) => concept.id !== id);
  edited.relationships = edited.relationships.filter((r) => r.cause_id !== id && r.effect_id !== id);
  return edited;
}

export function findEdge(graph, causeId, effectId) {
  return graph.relationships.find((r) => r.cause_id === causeId && r.effect_id === effectId);
}

export function addRelationship(graph, causeId, effectId) {
  const edited = copyOf(graph);
  const id = nextId("r", edited.relationships);
  edited.relationships.push({ id, cause_id: causeId, effect_id: effectId, description: "" });
  return { graph: edited, id };
}

export function updateRelationship(graph, id, fields) {
  const edited = copyOf(graph);
  Object.assign(edited.relationships.find((relationship) => relationship.id === id), fields);
  return edited;
}

export function deleteRelationship(graph, id) {
  const edited = copyOf(graph);
  edited.relationships = edited.relationships.filter((relationship) => relationship.id !== id);
  return edited;
}

// The concept an intervention's target names: its id, or its name in any case (as csg.graph.find_concept reads it).
export function findConcept(graph, key) {
  const wanted = (key ?? "").trim().toLowerCase();
  if (!wanted) return undefined;
  return graph.concepts.find((c) => c.id.toLowerCase() === wanted || c.name.trim().toLowerCase() === wanted);
}
