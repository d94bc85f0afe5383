// The pack's workflows in the template browser come in the server's directory order, which puts the main
// counterfactual workflow anywhere. List them from the simplest start to the evaluation instead.

import { api } from "../../scripts/api.js";

const ORDER = ["counterfactual", "manual_intervention", "three_counterfactuals", "hand_written_graph",
               "baselines_comparison", "evaluate_counterfactuals"]; // workflows/<name>.json
const PACK_FOLDER = decodeURIComponent(new URL(import.meta.url).pathname.split("/").at(-2)); // /extensions/<folder>/

const rank = (name) => (ORDER.includes(name) ? ORDER.indexOf(name) : ORDER.length);
const listTemplates = api.getWorkflowTemplates.bind(api);
api.getWorkflowTemplates = async () => {
  const templates = await listTemplates();
  templates[PACK_FOLDER]?.sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  return templates;
};
