// Words a newcomer searches for find the pack's nodes: every node answers to "causal", "counterfactual" and
// "csg", and each to the terms of its own job. The frontend's node search matches a node's name, display name
// and search aliases; ComfyUI 0.3.64's V3 schema cannot send aliases, so they are added to the pack's node
// definitions here, before the frontend indexes them (frontends from about 1.30 search aliases; older ones
// ignore them and still find the display names).

import { app } from "../../scripts/app.js";

const EVERY_NODE = ["causal counterfactuals", "counterfactual", "csg"];
const ALIASES = {
  CSGBaselineEdit: ["ddpm inversion", "ddim inversion", "image edit", "cfg edit"],
  CSGCausalInversion: ["invert image", "edit-friendly inversion", "abduction"],
  CSGCausalCounterfactual: ["causal edit", "image edit", "semantic guidance", "what if"],
  CSGCausalCounterfactuals: ["causal edit batch", "several interventions", "what if"],
  CSGCounterfactualJudge: ["causal judge", "evaluate edit", "effectiveness"],
  CSGLPIPSDistance: ["causal lpips", "perceptual distance", "image similarity"],
  CSGCausalGraphFromJSON: ["causal dag", "graph editor", "concept graph"],
  CSGInterventionFromJSON: ["causal intervention", "do operator"],
  CSGCausalGraphPreview: ["causal dag preview", "draw graph"],
  CSGSelectIntervention: ["causal intervention pick", "choose intervention"],
  CSGInversionSigmasAndNoise: ["causal inversion noise", "edit-friendly noise", "sigmas"],
  CSGGuider: ["causal semantic guidance", "guider"],
  CSGEditFriendlySampler: ["causal sampler", "dpm++ sde", "edit-friendly sampler"],
  CSGLocalVLM: ["causal vlm", "vision language model", "qwen", "local llm"],
  CSGOpenAIVLM: ["causal vlm", "vision language model", "openai", "llm api", "gpt"],
  CSGConceptExtractor: ["causal graph extraction", "concepts from image", "vlm"],
  CSGInterventionProposer: ["causal intervention vlm", "propose edit"],
  CSGManualIntervention: ["causal intervention", "do operator", "click target"],
};

app.registerExtension({
  name: "causal_counterfactuals.search",

  beforeRegisterVueAppNodeDefs(nodeDefs) {
    for (const nodeDef of nodeDefs) {
      if (!Object.hasOwn(ALIASES, nodeDef.name)) continue; // the pack's nodes (nodes/*.py node_id)
      const own = nodeDef.search_aliases ?? []; // a backend whose schema sends aliases keeps them first
      nodeDef.search_aliases = [...new Set([...own, ...EVERY_NODE, ...(ALIASES[nodeDef.name] ?? [])])];
    }
  },
});
