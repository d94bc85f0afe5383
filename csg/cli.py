"""``csg-counterfactual``: one photo in, its causal counterfactual (and everything behind it) out.

    csg-counterfactual IMAGE [--do "concept=value" | --pick N | --pick all] [--caption TEXT]
                       [--graph-json FILE [--target-only]] [--intervention-json FILE]
                       [--vlm-model PATH | --vlm-url URL --vlm-name NAME [--api-key-env VAR]] [--vlm-cache DIR]
                       [--sdxl PATH [--sdxl-config DIR]] [--comfyui-root DIR] [--method csg|ddpm|ddim]
                       [--steps 100] [--skip 0.15] [--source-guidance 3.5] [--scale 8] [--threshold 0.7]
                       [--warmup 10] [--mask-mode intersect] [--protect-non-descendants] [--exact]
                       [--out DIR] [--device auto] [--dtype auto] [--seed 0]

The chain: extract the causal graph with the VLM (or read ``--graph-json``), intervene (the VLM's
proposal number ``--pick``, the user's ``--do`` whose consequences the VLM propagates (or, with
``--target-only``, none), or ``--intervention-json``), check it against the graph, invert the
photo, guide with CSG and save.

Written to ``--out``: ``original.png`` (the input as edited), ``counterfactual.png``, ``graph.png``
(the graph with the intervention drawn on it), ``mask_<concept id>.png`` per edited concept and
``report.json`` (graph, intervention including the changes the causal check stripped, parameters,
models). With ``--pick all`` each intervention gets its own sub-folder, all from one inversion.
``graph.json`` and ``intervention.json`` are written first, before SDXL loads, so an interrupted
or failed edit keeps the VLM's work: rerun with ``--graph-json`` / ``--intervention-json``.
Ctrl-C exits with code 130 and says so. No API key is ever written or printed; ``--api-key-env`` names the variable that holds it.

Weights are only looked up locally, never downloaded:
  SDXL  --sdxl (a diffusers folder, or a single .safetensors checkpoint plus a config folder),
        else the Hugging Face cache (HF_HUB_CACHE, HF_HOME/hub or ~/.cache/huggingface/hub) entry
        of stabilityai/stable-diffusion-xl-base-1.0, else ComfyUI's models/checkpoints/*.safetensors
        (--comfyui-root or COMFYUI_PATH).
  VLM   --vlm-model, else a Qwen3-VL instruct model in the Hugging Face cache, else ComfyUI's
        models/LLM/<name>; or any OpenAI-compatible server with --vlm-url.
Missing weights stop the run with exit code 2 and a message naming what to get and where to put
it. Other bad input (unreadable image, malformed JSON, unknown concept) also exits with 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

from .errors import CSGError, GraphError, InputError, WeightsMissingError

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
VLM_REPOS = ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-30B-A3B-Instruct",
             "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct",
             "Qwen/Qwen2.5-VL-32B-Instruct", "Qwen/Qwen2.5-VL-72B-Instruct")  # preference order
VLM_FAMILIES = ("qwen3-vl", "qwen2.5-vl", "qwen2_5-vl", "qwen2_5_vl")  # folder-name marks, preference order
EXIT_USAGE = 2  # missing weights and bad input, like argparse's own usage errors
EXIT_FAILURE = 1  # the run itself failed (e.g. the VLM answered unusably)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


# -- finding weights on this machine ---------------------------------------------------------------


def hf_hub_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]) / "hub"
    return Path.home() / ".cache" / "huggingface" / "hub"


def hf_snapshots(repo_id: str) -> list[Path]:
    """Local snapshot folders of ``repo_id`` in the Hugging Face cache, the one ``refs/main`` names first."""
    repo = hf_hub_cache() / ("models--" + repo_id.replace("/", "--"))
    snapshots = sorted((repo / "snapshots").glob("*/"))
    main_ref = repo / "refs" / "main"
    if main_ref.is_file():
        main = repo / "snapshots" / main_ref.read_text().strip()
        snapshots.sort(key=lambda p: p != main)
    return snapshots


def comfyui_root(explicit: str | None) -> Path | None:
    root = explicit or os.environ.get("COMFYUI_PATH")
    return Path(root).expanduser() if root else None


def has_weights(folder: Path) -> bool:
    return any(folder.glob("*.safetensors")) or any(folder.glob("*.bin"))


def is_sdxl_diffusers_folder(folder: Path) -> bool:
    parts = ("unet", "vae", "text_encoder", "text_encoder_2")
    return all((folder / p / "config.json").is_file() and has_weights(folder / p) for p in parts) and all(
        (folder / t).is_dir() for t in ("tokenizer", "tokenizer_2"))


def is_sdxl_config_folder(folder: Path) -> bool:
    needed = ["model_index.json", "unet/config.json", "vae/config.json", "text_encoder/config.json",
              "text_encoder_2/config.json", "tokenizer/vocab.json", "tokenizer_2/vocab.json"]
    return all((folder / n).is_file() for n in needed)


@dataclass(frozen=True)
class SDXLWeights:
    path: Path  # a diffusers folder or a single checkpoint file
    config: Path | None = None  # the diffusers config folder a single file needs


def sdxl_get_message(comfy: Path | None) -> str:
    cache = hf_hub_cache()
    lines = [
        "SDXL base 1.0 weights were not found on this machine (nothing is downloaded automatically). Either:",
        f"  * download the diffusers folder: huggingface-cli download {SDXL_REPO}   (lands in {cache}), "
        "or pass its folder with --sdxl DIR;",
        "  * or use a single checkpoint, e.g. sd_xl_base_1.0.safetensors from the same repository: "
        + (f"put it in {comfy / 'models' / 'checkpoints'}" if comfy else "pass it with --sdxl FILE, or put it in "
           "<ComfyUI>/models/checkpoints and pass --comfyui-root <ComfyUI> (or set COMFYUI_PATH)")
        + ". A single file also needs SDXL's configs and tokenizers (no weights): huggingface-cli download "
        f"{SDXL_REPO} --include '*.json' '*.txt'   (or pass such a folder with --sdxl-config DIR).",
    ]
    return "\n".join(lines)


def config_folder_for_single_file(explicit: str | None) -> Path:
    if explicit:
        folder = Path(explicit).expanduser()
        if not is_sdxl_config_folder(folder):
            raise WeightsMissingError(
                f"--sdxl-config {folder} is not an SDXL diffusers config folder (it needs model_index.json, "
                "unet/, vae/, text_encoder/, text_encoder_2/ configs and tokenizer/, tokenizer_2/). Get one with "
                f"huggingface-cli download {SDXL_REPO} --include '*.json' '*.txt' --local-dir {folder}")
        return folder
    for snapshot in hf_snapshots(SDXL_REPO):
        if is_sdxl_config_folder(snapshot):
            return snapshot
    raise WeightsMissingError(
        "A single-file SDXL checkpoint needs SDXL's configs and tokenizers (about 3 MB, no weights), which were "
        f"not found in {hf_hub_cache()}. Get them with: huggingface-cli download {SDXL_REPO} "
        "--include '*.json' '*.txt'   or pass such a folder with --sdxl-config DIR.")


def comfyui_checkpoints(comfy: Path | None) -> list[Path]:
    """SDXL-looking checkpoints in ComfyUI's models folder, SDXL base first."""
    if comfy is None:
        return []
    files = sorted((comfy / "models" / "checkpoints").rglob("*.safetensors"))
    rank = lambda p: (0 if "sd_xl_base" in p.name.lower() else 1 if "xl" in p.name.lower() else 2, p.name)  # noqa: E731
    return [p for p in sorted(files, key=rank) if rank(p)[0] < 2]


def find_sdxl(explicit: str | None, config: str | None, comfy: Path | None) -> SDXLWeights:
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir():
            if not is_sdxl_diffusers_folder(path):
                raise WeightsMissingError(
                    f"--sdxl {path} is not a complete SDXL diffusers folder (it needs unet/, vae/, text_encoder/, "
                    "text_encoder_2/ with weights, and tokenizer/, tokenizer_2/).\n" + sdxl_get_message(comfy))
            return SDXLWeights(path)
        if path.is_file():
            return SDXLWeights(path, config_folder_for_single_file(config))
        raise WeightsMissingError(f"--sdxl {path} does not exist.\n" + sdxl_get_message(comfy))
    for snapshot in hf_snapshots(SDXL_REPO):
        if is_sdxl_diffusers_folder(snapshot):
            return SDXLWeights(snapshot)
    checkpoints = comfyui_checkpoints(comfy)
    if checkpoints:
        return SDXLWeights(checkpoints[0], config_folder_for_single_file(config))
    raise WeightsMissingError(sdxl_get_message(comfy))


def is_vlm_folder(folder: Path) -> bool:
    from .vlm.transformers_backend import missing_model_files

    return folder.is_dir() and not missing_model_files(folder)


def vlm_get_message(comfy: Path | None) -> str:
    where = f"{comfy / 'models' / 'LLM'}/<name>" if comfy else "<ComfyUI>/models/LLM/<name> (with --comfyui-root)"
    return (
        "This run needs a vision-language model (to extract the graph, propose or propagate the intervention), "
        "and none was found locally (nothing is downloaded automatically). Either:\n"
        f"  * download one: huggingface-cli download {VLM_REPOS[0]}   (lands in {hf_hub_cache()}), or put it in "
        f"{where}, or pass its folder with --vlm-model DIR;\n"
        "  * or use an OpenAI-compatible server: --vlm-url http://host:port/v1 --vlm-name MODEL "
        "[--api-key-env VAR];\n"
        "  * or skip the VLM: --graph-json FILE --intervention-json FILE (see csg/examples/).")


def find_vlm(explicit: str | None, comfy: Path | None) -> Path:
    if explicit:
        from .vlm import check_model_folder

        return check_model_folder(explicit)  # names what the folder lacks
    for repo in VLM_REPOS:
        for snapshot in hf_snapshots(repo):
            if is_vlm_folder(snapshot):
                return snapshot
    if comfy is not None:
        folders = sorted((comfy / "models" / "LLM").glob("*/"))
        for family in VLM_FAMILIES:
            for folder in folders:
                if family in folder.name.lower() and is_vlm_folder(folder):
                    return folder
    raise WeightsMissingError(vlm_get_message(comfy))


# -- arguments -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csg-counterfactual",
        description="Causal counterfactual of a photo: a VLM finds the causal graph, SDXL edits the intervened "
                    "concept and its descendants with Causal Semantic Guidance.",
        epilog='Example: csg-counterfactual csg/examples/portrait.png --do "age=old" --out out/')
    p.add_argument("image", help="the photo (PNG/JPEG)")
    p.add_argument("--caption", help="what the photo shows; the inversion's source prompt (default: the VLM's "
                                     "description, or the graph's scene_summary)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--do", metavar="CONCEPT=VALUE", help='your intervention, e.g. "age=old" (concept by name or id)')
    what.add_argument("--pick", default="1", metavar="N|all",
                      help="which of the VLM's three proposed interventions to apply (1-3, default 1), or all")
    what.add_argument("--intervention-json", metavar="FILE", help="a hand-written intervention (no VLM needed)")
    p.add_argument("--graph-json", metavar="FILE", help="a hand-written causal graph instead of the VLM's")
    p.add_argument("--target-only", action="store_true",
                   help="with --do and --graph-json: edit the target alone, without a VLM to propagate the change "
                        "to its descendants")
    vlm = p.add_argument_group("vision-language model")
    vlm.add_argument("--vlm-model", metavar="PATH", help="local transformers model folder (Qwen3-VL)")
    vlm.add_argument("--vlm-url", metavar="URL", help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    vlm.add_argument("--vlm-name", metavar="NAME", help="the model name the server expects")
    vlm.add_argument("--api-key-env", metavar="VAR", help="environment variable holding the server's API key")
    vlm.add_argument("--vlm-cache", metavar="DIR", help="keep the VLM's answers here and reuse them on reruns")
    models = p.add_argument_group("diffusion model")
    models.add_argument("--sdxl", metavar="PATH", help="SDXL diffusers folder or single .safetensors checkpoint")
    models.add_argument("--sdxl-config", metavar="DIR", help="SDXL config+tokenizer folder for a single-file checkpoint")
    models.add_argument("--comfyui-root", metavar="DIR", help="ComfyUI folder to search models/ in (or COMFYUI_PATH)")
    edit = p.add_argument_group("editing (defaults: the paper's)")
    edit.add_argument("--method", choices=("csg", "ddpm", "ddim"), default="csg",
                      help="csg, or a Table 1 baseline: edit-friendly DDPM / DDIM inversion + CFG on the full prompt")
    edit.add_argument("--steps", type=int, default=100)
    edit.add_argument("--skip", type=float, default=0.15)
    edit.add_argument("--source-guidance", type=float, default=3.5)
    edit.add_argument("--scale", type=float, default=8.0, help="edit guidance scale per concept")
    edit.add_argument("--threshold", type=float, default=0.7, help="mask quantile lambda")
    edit.add_argument("--warmup", type=int, default=10)
    edit.add_argument("--cooldown", type=int, default=None, help="first step without guidance again (default: none)")
    edit.add_argument("--concept-scale", action="append", default=[], metavar="CONCEPT=SCALE",
                      help="edit scale of one concept (name or id); repeatable")
    edit.add_argument("--reverse", action="append", default=[], metavar="CONCEPT",
                      help="push this concept away from its original value instead of towards the new one; repeatable")
    edit.add_argument("--mask-mode", choices=("intersect", "cross_attention", "noise"), default="intersect")
    edit.add_argument("--protect-non-descendants", action="store_true",
                      help="keep edit masks off the regions of concepts the intervention must not change")
    edit.add_argument("--exact", action="store_true", help="exact-reconstruction inversion")
    edit.add_argument("--guidance-scale", type=float, default=7.5, help="target CFG of the ddpm/ddim baselines")
    edit.add_argument("--max-side", type=int, default=1024, help="downscale larger photos to this longer side")
    run = p.add_argument_group("run")
    run.add_argument("--out", default="out", metavar="DIR")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps ...")
    run.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto")
    run.add_argument("--seed", type=int, default=0)
    return p


def parse_do(text: str) -> tuple[str, str]:
    concept, sep, value = text.partition("=")
    if not sep or not concept.strip() or not value.strip():
        raise InputError(f'--do expects "concept=value", e.g. "age=old"; got {text!r}.')
    return concept.strip(), value.strip()


def parse_concept_scales(items: Sequence[str]) -> dict[str, float]:
    scales = {}
    for item in items:
        concept, sep, value = item.partition("=")
        try:
            scales[concept.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep or not concept.strip():
            raise InputError(f'--concept-scale expects "concept=number", e.g. "hair color=6"; got {item!r}.')
    return scales


def parse_pick(text: str) -> int | None:
    """1-based proposal index, or None for all."""
    if text.strip().lower() == "all":
        return None
    if not text.strip().isdigit() or int(text) < 1:
        raise InputError(f"--pick expects a proposal number (1, 2, 3) or 'all', got {text!r}.")
    return int(text)


def read_json_file(path: str, what: str) -> str:
    file = Path(path).expanduser()
    if not file.is_file():
        raise InputError(f"The {what} file {file} does not exist.")
    return file.read_text(encoding="utf-8")


def resolve_device(name: str, dtype_name: str):
    import torch

    try:
        device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    except (RuntimeError, TypeError):
        raise InputError(f"Unknown device {name!r}. Use auto, cpu, cuda, cuda:N or mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"--device {name}: this PyTorch build sees no CUDA GPU. Use --device cpu (slow) or install "
                         "the CUDA build of torch.")
    if dtype_name == "auto":
        dtype = torch.float16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, dtype_name)
    return device, dtype


# -- the run ---------------------------------------------------------------------------------------


def make_vlm(args: argparse.Namespace, comfy: Path | None, device):
    """The VLM backend the arguments ask for (or the one found locally), and how the report names it."""
    if args.vlm_url:
        if not args.vlm_name:
            raise InputError("--vlm-url needs --vlm-name (the model name the server serves).")
        if args.api_key_env and not os.environ.get(args.api_key_env):
            raise InputError(f"--api-key-env {args.api_key_env}: that environment variable is not set.")
        from .vlm import OpenAICompatibleVLM

        backend = OpenAICompatibleVLM(args.vlm_url, args.vlm_name, api_key_env=args.api_key_env)
        name = f"{backend.url} ({backend.model})"
    else:
        folder = find_vlm(args.vlm_model, comfy)
        from .vlm import TransformersVLM

        backend, name = TransformersVLM(folder, device=device), str(folder)
    if args.vlm_cache:
        from .vlm import CachedVLM

        backend = CachedVLM(backend, Path(args.vlm_cache).expanduser())
    return backend, name


def load_host(weights: SDXLWeights, device, dtype):
    from .diffusers_host import DiffusersSDXLHost

    if weights.config is None:
        return DiffusersSDXLHost.from_pretrained(weights.path, device=device, dtype=dtype)
    return DiffusersSDXLHost.from_single_file(weights.path, weights.config, device=device, dtype=dtype)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "item"


def save_outputs(folder: Path, image, graph, intervention, masks: dict, render_graph) -> dict[str, str]:
    """The counterfactual, the graph with its intervention, and one mask image per edited concept."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"counterfactual": folder / "counterfactual.png", "graph": folder / "graph.png"}
    image.save(files["counterfactual"])
    render_graph(graph, intervention).save(files["graph"])
    for concept_id, mask in masks.items():
        files[f"mask {concept_id}"] = folder / f"mask_{slug(concept_id)}.png"
        mask.save(files[f"mask {concept_id}"])
    return {name: str(path) for name, path in files.items()}


def log(message: str) -> None:
    print(f"csg-counterfactual: {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Plan:
    """What to edit: the graph, the checked interventions, the source prompt, and who said so."""

    graph: object  # CausalGraph
    interventions: list  # of checked Intervention
    source_prompt: str
    vlm: str | None  # the VLM's folder or redacted endpoint; None when none was used


def free_accelerator_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@dataclass(frozen=True)
class Request:
    """The user's side of the plan, parsed and checked before anything slow happens."""

    graph: object | None  # CausalGraph from --graph-json
    intervention: object | None  # Intervention from --intervention-json, or --do with --target-only
    do: tuple[str, str] | None  # (concept, value) from --do
    pick: int | None  # 1-based proposal, None for all


def read_request(args: argparse.Namespace) -> Request:
    from .graph import CausalGraph, Intervention

    graph = CausalGraph.from_json(read_json_file(args.graph_json, "graph")) if args.graph_json else None
    given = Intervention.from_json(read_json_file(args.intervention_json, "intervention")) if args.intervention_json else None
    do = parse_do(args.do) if args.do else None
    pick = parse_pick(args.pick) if not (do or given) else 1
    if args.target_only and (do is None or graph is None):
        raise InputError("--target-only edits the target of --do on the graph of --graph-json; give both "
                         '(e.g. --graph-json csg/examples/portrait_graph.json --do "age=old" --target-only).')
    if do is not None and graph is not None:
        graph.find_concept(do[0])  # an unknown concept fails now, with the list of known ones
    if args.target_only:
        from .vlm import manual_intervention

        given, do = manual_intervention(graph, do[0], do[1], generation_prompt=args.caption or ""), None
    return Request(graph, given, do, pick)


def plan_interventions(args: argparse.Namespace, request: Request, image, comfy: Path | None, device) -> Plan:
    """Graph and interventions from the JSON files, or from the VLM's stages for what they leave open."""
    from .graph import check_intervention

    graph, given, do, pick = request.graph, request.intervention, request.do, request.pick
    caption, vlm_name = args.caption, None
    if given is not None and graph is not None:
        interventions = [given]
    else:
        vlm, vlm_name = make_vlm(args, comfy, device)
        log(f"vision-language model: {vlm_name}")
        from . import vlm as stages

        if graph is None:
            log("extracting the causal graph" + ("" if caption else " (after describing the scene)"))
            extraction = stages.extract_graph(vlm, image, caption)
            graph, caption = extraction.graph, extraction.base_prompt
        if given is not None:
            interventions = [given]
        elif do is not None:
            log(f"propagating do({do[0]} = {do[1]})")
            interventions = [stages.propagate_intervention(vlm, image, graph, do[0], do[1], base_prompt=caption)]
        else:
            log("proposing interventions")
            proposals = stages.propose_interventions(vlm, image, graph, caption)
            if pick is not None and pick > len(proposals):
                raise InputError(f"--pick {pick}: the VLM proposed only {len(proposals)} interventions.")
            interventions = list(proposals) if pick is None else [proposals[pick - 1]]
        del vlm
        free_accelerator_memory()  # the VLM's memory goes back before SDXL loads
    source = caption if caption is not None else graph.scene_summary
    return Plan(graph, [check_intervention(graph, i) for i in interventions], source, vlm_name)


class Interrupted(Exception):
    """Ctrl-C after the plan was saved; the message says how to resume from it."""


def save_plan(out: Path, plan: Plan) -> list[Path]:
    """The graph and each intervention as JSON, before SDXL runs: an interrupted or failed edit keeps
    the VLM's work, and ``--graph-json`` / ``--intervention-json`` replay it without a VLM."""
    out.mkdir(parents=True, exist_ok=True)
    saved = [out / "graph.json"]
    saved[0].write_text(plan.graph.to_json(), encoding="utf-8")
    for intervention in plan.interventions:
        folder = out if len(plan.interventions) == 1 else out / slug(intervention.id)
        folder.mkdir(parents=True, exist_ok=True)
        saved.append(folder / "intervention.json")
        saved[-1].write_text(intervention.to_json(), encoding="utf-8")
    return saved


def write_outputs(out: Path, plan: Plan, results: list, report_fields: dict) -> Path:
    """Images, masks and graph per intervention (a sub-folder each when there are several), and the report."""
    from .render import render_graph

    out.mkdir(parents=True, exist_ok=True)
    results[0].source_image.save(out / "original.png")
    entries = []
    for intervention, result in zip(plan.interventions, results):
        folder = out if len(results) == 1 else out / slug(intervention.id)
        masks = {cid: result.mask_image(cid) for cid in getattr(result, "masks", {})}  # baselines have none
        files = save_outputs(folder, result.image, plan.graph, intervention, masks, render_graph)
        entries.append({
            "intervention": intervention.to_dict(),
            "stripped_changes": [v.to_dict() for v in intervention.violations],
            "edit_concepts": [asdict(c) for c in intervention.edit_concepts(plan.graph)],
            "files": files,
        })
        for v in intervention.violations:
            log(f"note: {intervention.id}: dropped the change {v.concept_id} -> {v.new_value!r}: {v.problem}")
    report = {
        "original": str(out / "original.png"),
        "edited_size": list(results[0].source_image.size),
        "source_prompt": plan.source_prompt,
        "graph": plan.graph.to_dict(),
        "interventions": entries,
        **report_fields,
    }
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


def run(args: argparse.Namespace) -> int:
    from .baselines import check_guidance_scale
    from .counterfactual import CSGParams, edit_spec, load_image

    image = load_image(args.image)
    request = read_request(args)
    params = CSGParams(num_steps=args.steps, skip=args.skip, source_guidance=args.source_guidance, scale=args.scale,
                       threshold=args.threshold, warmup=args.warmup, cooldown=args.cooldown,
                       concept_scales=parse_concept_scales(args.concept_scale), reverse=tuple(args.reverse),
                       mask_mode=args.mask_mode, non_descendant_protection=args.protect_non_descendants,
                       exact=args.exact, seed=args.seed, max_side=args.max_side)
    if args.method == "csg":  # settings that need the method fail before the VLM runs
        params.check_guidance(params.num_steps)
    else:
        check_guidance_scale(args.guidance_scale)
    device, dtype = resolve_device(args.device, args.dtype)
    comfy = comfyui_root(args.comfyui_root)
    sdxl = find_sdxl(args.sdxl, args.sdxl_config, comfy)  # before any slow work: fail fast on missing weights
    plan = plan_interventions(args, request, image, comfy, device)
    for intervention in plan.interventions:  # settings naming unknown concepts fail here, before SDXL loads
        edit_spec(plan.graph, intervention, params)

    out = Path(args.out).expanduser()
    graph_file, *intervention_files = save_plan(out, plan)
    try:
        return edit_and_write(args, plan, image, params, sdxl, device, dtype, out)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted. The graph and the intervention(s) are saved in {out}; rerun with "
                          f"--graph-json {graph_file} --intervention-json {intervention_files[0]} (each intervention "
                          "has its own file) to skip the VLM.") from None


def edit_and_write(args: argparse.Namespace, plan: Plan, image, params, sdxl: SDXLWeights, device, dtype,
                   out: Path) -> int:
    from .counterfactual import baseline_counterfactual, counterfactuals

    log(f"loading SDXL from {sdxl.path} on {device} ({str(dtype).removeprefix('torch.')})")
    host = load_host(sdxl, device, dtype)
    log(f"VAE in {str(host.vae.dtype).removeprefix('torch.')}"
        + ("; text encoders in CPU memory, lent to the GPU per encoding" if host.offload_text_encoders else ""))
    log(f"{args.method}: inverting and editing {len(plan.interventions)} intervention(s), {args.steps} steps")
    if args.method == "csg":
        results = counterfactuals(host, image, plan.graph, plan.interventions, source_prompt=plan.source_prompt,
                                  params=params)
    else:
        results = [baseline_counterfactual(host, image, i, method=args.method, source_prompt=plan.source_prompt,
                                           params=params, guidance_scale=args.guidance_scale)
                   for i in plan.interventions]
    report = write_outputs(out, plan, results, {
        "image": str(Path(args.image)),
        "method": args.method,
        "parameters": params.to_dict() | ({"guidance_scale": args.guidance_scale} if args.method != "csg" else {}),
        "models": {"sdxl": str(sdxl.path), "sdxl_config": str(sdxl.config) if sdxl.config else None, "vlm": plan.vlm},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    })
    print(f"wrote {report}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return run(args)
    except Interrupted as exc:
        print(f"csg-counterfactual: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:
        print("csg-counterfactual: interrupted before anything was saved.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (WeightsMissingError, InputError, GraphError) as exc:
        print(f"csg-counterfactual: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CSGError as exc:
        print(f"csg-counterfactual: {exc}", file=sys.stderr)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.exit(main())
