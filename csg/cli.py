"""``csg-counterfactual``: one photo in, its causal counterfactual (and everything behind it) out.

Internal: not part of the public API (``csg.__all__``), so it may change without notice.

    csg-counterfactual IMAGE [--do "concept=value" | --intervention-json FILE] [--pick N | --pick all]
                       [--caption TEXT] [--graph-json FILE [--target-only]]
                       [--vlm-model PATH | --vlm-url URL --vlm-name NAME [--api-key-env VAR]
                        [--vlm-timeout SECONDS] [--vlm-retries N]] [--vlm-structured auto|schema|json|off]
                       [--vlm-cache DIR]
                       [--sdxl PATH [--sdxl-config DIR]] [--comfyui-root DIR] [--method csg|ddpm|ddim]
                       [--steps 100] [--skip 0.15] [--source-guidance 3.5] [--scale 8] [--threshold 0.7]
                       [--warmup 10] [--mask-mode intersect] [--protect-non-descendants] [--exact]
                       [--out DIR] [--device auto] [--dtype auto] [--seed 0]

The chain: extract the causal graph with the VLM (or read ``--graph-json``), intervene (the VLM's
proposal number ``--pick``, the user's ``--do`` whose consequences the VLM propagates (or, with
``--target-only``, none), or ``--intervention-json``), check it against the graph, invert the
photo, guide with CSG and save.

Written to ``--out``: ``original.png`` (the input as edited), ``counterfactual.png``, ``graph.png``
(the graph with the intervention drawn on it), ``mask_1.png``, ``mask_2.png`` ... per edited concept
and ``report.json`` (graph, intervention including the changes the causal check stripped, which file
holds which concept's mask, parameters, models). With several interventions each gets its own
sub-folder ``intervention_1/``, ``intervention_2/`` ..., all from one inversion. No file or folder is
ever named after an id a model or a file chose.
``graph.json`` and ``intervention.json`` are written first, before SDXL loads, so an interrupted
or failed edit keeps the VLM's work: rerun with ``--graph-json`` / ``--intervention-json``.
Ctrl-C exits with code 130 and says so. No API key is ever written or printed;
``--api-key-env`` names the variable that holds it.

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
import math
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import CSGError, GraphError, InputError, OutputError, WeightsMissingError
from .files import check_caption, check_sdxl_checkpoint, check_sdxl_folder, read_graph, read_interventions
from .output import make_folder, save_image, write_text

SDXL_REPO = "stabilityai/stable-diffusion-xl-base-1.0"
VLM_REPOS = ("Qwen/Qwen3-VL-8B-Instruct", "Qwen/Qwen3-VL-4B-Instruct", "Qwen/Qwen3-VL-30B-A3B-Instruct",
             "Qwen/Qwen3-VL-2B-Instruct", "Qwen/Qwen2.5-VL-7B-Instruct", "Qwen/Qwen2.5-VL-3B-Instruct",
             "Qwen/Qwen2.5-VL-32B-Instruct", "Qwen/Qwen2.5-VL-72B-Instruct")  # preference order
VLM_FAMILIES = ("qwen3-vl", "qwen2.5-vl", "qwen2_5-vl", "qwen2_5_vl")  # folder-name marks, preference order
EXIT_USAGE = 2  # missing weights and bad input, like argparse's own usage errors
EXIT_FAILURE = 1  # the run itself failed (e.g. the VLM answered unusably)
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report SIGINT


def report_error(program: str, exc: CSGError) -> int:
    """Print one of our errors for the user and return its exit code (csg-counterfactual and csg-evaluate)."""
    print(f"{program}: {exc}", file=sys.stderr)
    return EXIT_USAGE if isinstance(exc, (WeightsMissingError, InputError, GraphError, OutputError)) else EXIT_FAILURE
MAX_VLM_TIMEOUT, MAX_VLM_RETRIES = 3600.0, 10  # the ComfyUI server node's limits


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

    def check(self) -> SDXLWeights:
        """These weights, once their configs parse and their safetensors headers read (a single file: that it
        is SDXL base): a broken download is named before minutes of loading."""
        if self.config is None:
            check_sdxl_folder(self.path)
        else:
            check_sdxl_checkpoint(self.path)
            check_sdxl_folder(self.config)
        return self


def sdxl_get_message(comfy: Path | None) -> str:
    cache = hf_hub_cache()
    lines = [
        "SDXL base 1.0 weights were not found on this machine (nothing is downloaded automatically). Either:",
        f"  * download the diffusers folder: hf download {SDXL_REPO}   (lands in {cache}), "
        "or pass its folder with --sdxl DIR;",
        "  * or use a single checkpoint, e.g. sd_xl_base_1.0.safetensors from the same repository: "
        + (f"put it in {comfy / 'models' / 'checkpoints'}" if comfy else "pass it with --sdxl FILE, or put it in "
           "<ComfyUI>/models/checkpoints and pass --comfyui-root <ComfyUI> (or set COMFYUI_PATH)")
        + ". A single file also needs SDXL's configs and tokenizers (no weights): hf download "
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
                f"hf download {SDXL_REPO} --include '*.json' '*.txt' --local-dir {folder}")
        return folder
    for snapshot in hf_snapshots(SDXL_REPO):
        if is_sdxl_config_folder(snapshot):
            return snapshot
    raise WeightsMissingError(
        "A single-file SDXL checkpoint needs SDXL's configs and tokenizers (about 3 MB, no weights), which were "
        f"not found in {hf_hub_cache()}. Get them with: hf download {SDXL_REPO} "
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
        f"  * download one: hf download {VLM_REPOS[0]}   (lands in {hf_hub_cache()}), or put it in "
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
    what.add_argument("--intervention-json", metavar="FILE",
                      help='a hand-written intervention, or {"interventions": [...]} (no VLM needed)')
    p.add_argument("--pick", metavar="N|all",
                   help="which of the VLM's three proposed interventions (or of the --intervention-json file's) to "
                        "apply (default 1), or all")
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
    vlm.add_argument("--vlm-structured", default="auto", metavar="MODE",
                     help="hold each answer to its stage's JSON Schema while it is decoded: auto (the schema, else a "
                          "JSON object, else plain text, as the server allows; default), schema or json (only that), "
                          "off (plain text, repaired and re-asked)")
    vlm.add_argument("--vlm-timeout", type=float, metavar="SECONDS",
                     help=f"how long to wait for one answer of the --vlm-url server (default 300, at most "
                          f"{MAX_VLM_TIMEOUT:.0f})")
    vlm.add_argument("--vlm-retries", type=int, metavar="N",
                     help=f"extra tries after a refused connection, a timeout or a busy --vlm-url server (default 2, "
                          f"at most {MAX_VLM_RETRIES})")
    models = p.add_argument_group("diffusion model")
    models.add_argument("--sdxl", metavar="PATH", help="SDXL diffusers folder or single .safetensors checkpoint")
    models.add_argument("--sdxl-config", metavar="DIR",
                        help="SDXL config+tokenizer folder for a single-file checkpoint")
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
    run.add_argument("--seed", type=seed_number, default=0)
    scores = p.add_argument_group("metrics (--metrics)")
    scores.add_argument("--metrics", action="store_true",
                        help="score each counterfactual: LPIPS(VGG), masked LPIPS (csg), and with the VLM as judge "
                             "VLM effectiveness, Preservation and Causal consistency (into report.json)")
    scores.add_argument("--lpips-vgg", metavar="FILE",
                        help="torchvision's vgg16-397923af.pth (default: under TORCH_HOME)")
    scores.add_argument("--lpips-heads", metavar="FILE", help="the lpips package's weights/v0.1/vgg.pth")
    return p


def seed_number(text: str) -> int:
    """An argparse type: a seed torch accepts (0 to 2**63 - 1), refused with a usage error (exit 2) otherwise."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"{seed} is outside 0 to 2**63 - 1") from None
    return seed


def parse_do(text: str) -> tuple[str, str]:
    concept, sep, value = text.partition("=")
    if not sep or not concept.strip() or not value.strip():
        raise InputError(f'--do expects "concept=value", e.g. "age=old"; got {text!r}.')
    return concept.strip(), value.strip()


def parse_pick(text: str) -> int | None:
    """1-based proposal index, or None for all."""
    if text.strip().lower() == "all":
        return None
    if not re.fullmatch(r"[0-9]+", text.strip()) or int(text) < 1:  # ASCII digits: int() refuses "²"
        raise InputError(f"--pick expects a proposal number (1, 2, 3) or 'all', got {text!r}.")
    return int(text)


def check_vlm_options(args: argparse.Namespace) -> None:
    """How long to wait for the VLM server and how often to retry: checked before anything slow."""
    if (args.vlm_timeout is not None or args.vlm_retries is not None) and not args.vlm_url:
        raise InputError("--vlm-timeout and --vlm-retries are for a VLM server; give its --vlm-url (a local "
                         "--vlm-model needs neither).")
    if args.vlm_timeout is not None and not (math.isfinite(args.vlm_timeout)
                                             and 0 < args.vlm_timeout <= MAX_VLM_TIMEOUT):
        raise InputError(f"--vlm-timeout must be a number of seconds above 0 and at most {MAX_VLM_TIMEOUT:.0f}, "
                         f"got {args.vlm_timeout}.")
    if args.vlm_retries is not None and not 0 <= args.vlm_retries <= MAX_VLM_RETRIES:
        raise InputError(f"--vlm-retries must be a whole number from 0 to {MAX_VLM_RETRIES}, got {args.vlm_retries}.")


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

        waiting = {name: value for name, value in (("timeout", args.vlm_timeout), ("retries", args.vlm_retries))
                   if value is not None}  # the backend's defaults otherwise
        backend = OpenAICompatibleVLM(args.vlm_url, args.vlm_name, api_key_env=args.api_key_env,
                                      structured=args.vlm_structured, **waiting)
        name = f"{backend.url} ({backend.model})"
    else:
        folder = find_vlm(args.vlm_model, comfy)
        from .vlm import TransformersVLM

        backend, name = TransformersVLM(folder, device=device, structured=args.vlm_structured), str(folder)
    if args.vlm_cache:
        from .vlm import CachedVLM

        backend = CachedVLM(backend, Path(args.vlm_cache).expanduser())
    return backend, name


def load_host(weights: SDXLWeights, device, dtype):
    from .diffusers_host import DiffusersSDXLHost

    if weights.config is None:
        return DiffusersSDXLHost.from_pretrained(weights.path, device=device, dtype=dtype)
    return DiffusersSDXLHost.from_single_file(weights.path, weights.config, device=device, dtype=dtype)


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
    interventions: list | None  # from --intervention-json (those --pick chose), or --do with --target-only
    do: tuple[str, str] | None  # (concept, value) from --do
    pick: int | None  # 1-based proposal, None for all


def read_request(args: argparse.Namespace) -> Request:
    from .graph import check_intervention

    if args.pick is not None and args.do:
        raise InputError("--pick chooses among the VLM's proposals or the interventions of an --intervention-json "
                         "file, and --do is an intervention of your own: give one of them.")
    pick = parse_pick(args.pick or "1")
    graph = read_graph(args.graph_json) if args.graph_json else None
    given = None
    if args.intervention_json:
        in_file = read_interventions(args.intervention_json)
        given = pick_interventions(in_file, pick, f"{args.intervention_json} holds")
        if len(in_file) > 1 and args.pick is None:
            log(f"{args.intervention_json} holds {len(in_file)} interventions; editing the first (--pick N or "
                "--pick all for the others)")
    do = parse_do(args.do) if args.do else None
    if args.target_only and (do is None or graph is None):
        raise InputError("--target-only edits the target of --do on the graph of --graph-json; give both "
                         '(e.g. --graph-json csg/examples/portrait_graph.json --do "age=old" --target-only).')
    if do is not None and graph is not None:
        graph.find_concept(do[0])  # an unknown concept fails now, with the list of known ones
    if args.target_only:
        from .vlm import manual_intervention

        given, do = [manual_intervention(graph, do[0], do[1], generation_prompt=args.caption or "")], None
    if given is not None and graph is not None:
        given = [check_intervention(graph, i) for i in given]  # an unknown target fails now, before any weights
    return Request(graph, given, do, pick)


def pick_interventions(items: list, pick: int | None, source: str) -> list:
    """The ``pick``-th of ``items`` (1-based), or all of them for None; ``source`` says where they came from."""
    if pick is None:
        return list(items)
    if pick > len(items):
        raise InputError(f"--pick {pick}: {source} only {len(items)} intervention(s).")
    return [items[pick - 1]]


def check_settings(graph, interventions: list, params) -> None:
    """Per-concept settings (--concept-scale, --reverse) naming unknown concepts fail here, before SDXL loads."""
    from .counterfactual import edit_spec

    for intervention in interventions:
        edit_spec(graph, intervention, params)


def check_out_folder(out: Path) -> None:
    """An --out that cannot become a folder fails before anything slow (it is only created once there is
    something to save)."""
    try:
        if out.exists() and not out.is_dir():
            raise InputError(f"--out {out} is a file, not a folder. Choose a folder (it is created if missing).")
        existing = next(p for p in (out, *out.absolute().parents) if p.exists())
    except OSError as exc:  # e.g. a name too long for the file system
        raise InputError(f"--out {out} cannot be a folder here ({exc.strerror}). Choose another folder.") from None
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        problem = "is not writable" if existing.is_dir() else "is a file"  # os.access knows read-only mounts
        raise InputError(f"--out {out}: cannot create or write there ({existing} {problem}). "
                         "Choose a folder you can write to.")


def plan_interventions(args: argparse.Namespace, request: Request, image, comfy: Path | None, device) -> Plan:
    """Graph and interventions from the JSON files, or from the VLM's stages for what they leave open."""
    from .graph import check_intervention

    graph, given, do, pick = request.graph, request.interventions, request.do, request.pick
    caption, vlm_name = args.caption, None
    if given is not None and graph is not None:
        interventions = given
    else:
        vlm, vlm_name = make_vlm(args, comfy, device)
        log(f"vision-language model: {vlm_name}")
        from . import vlm as stages

        if graph is None:
            log("extracting the causal graph" + ("" if caption else " (after describing the scene)"))
            extraction = stages.extract_graph(vlm, image, caption)
            graph, caption = extraction.graph, extraction.base_prompt
        if given is not None:
            interventions = given
        elif do is not None:
            log(f"propagating do({do[0]} = {do[1]})")
            interventions = [stages.propagate_intervention(vlm, image, graph, do[0], do[1], base_prompt=caption)]
        else:
            log("proposing interventions")
            proposals = stages.propose_interventions(vlm, image, graph, caption)
            interventions = pick_interventions(proposals, pick, "the VLM proposed")
        del vlm
        free_accelerator_memory()  # the VLM's memory goes back before SDXL loads
    source = caption if caption is not None else graph.scene_summary
    return Plan(graph, [check_intervention(graph, i) for i in interventions], source, vlm_name)


# -- where files go --------------------------------------------------------------------------------


@dataclass(frozen=True)
class ItemFiles:
    """Where one intervention's files go, and which intervention and concepts they belong to."""

    intervention_id: str
    folder: Path
    intervention: Path  # its intervention.json
    counterfactual: Path
    graph: Path  # the graph drawn with this intervention
    masks: tuple[tuple[str, Path], ...]  # (concept id, mask image), in the edit's order


@dataclass(frozen=True)
class OutputLayout:
    """Every path the command writes. Files are named by position, never after an id or name that a model or
    a file chose (an id ".." or "a/b" must not become a folder), so every path lies inside the output folder,
    no two items share one, and a rerun of the same plan writes the same paths. report.json maps each id to
    its files."""

    original: Path
    graph_json: Path
    report: Path
    items: tuple[ItemFiles, ...]


def output_layout(out: Path, items: Sequence[tuple[str, Sequence[str]]]) -> OutputLayout:
    """The layout for interventions given as (id, edit concept ids): a single one writes into ``out``, several
    into ``out/intervention_1``, ``out/intervention_2``, ...; masks are ``mask_1.png``, ``mask_2.png``, ... in
    the order of the edit's concepts."""
    several = len(items) > 1
    files = []
    for number, (intervention_id, concept_ids) in enumerate(items, start=1):
        folder = out / f"intervention_{number}" if several else out
        masks = tuple((concept_id, folder / f"mask_{k}.png") for k, concept_id in enumerate(concept_ids, start=1))
        files.append(ItemFiles(intervention_id, folder, folder / "intervention.json", folder / "counterfactual.png",
                               folder / "graph.png", masks))
    return OutputLayout(out / "original.png", out / "graph.json", out / "report.json", tuple(files))


def plan_layout(out: Path, plan: Plan) -> OutputLayout:
    return output_layout(out, [(i.id, [c.concept_id for c in i.edit_concepts(plan.graph)])
                               for i in plan.interventions])


class Interrupted(Exception):
    """Ctrl-C after the plan was saved; the message says how to resume from it."""


def write_json(path: Path, text: str) -> None:
    # A lone surrogate (which a model can write as "\ud800") has no UTF-8 form; written back as that same
    # escape, the file stays valid JSON and reads back identically.
    write_text(path, text, errors="backslashreplace")


def save_plan(layout: OutputLayout, plan: Plan) -> None:
    """The graph and each intervention as JSON, before SDXL runs: an interrupted or failed edit keeps
    the VLM's work, and ``--graph-json`` / ``--intervention-json`` replay it without a VLM."""
    make_folder(layout.graph_json.parent)
    write_json(layout.graph_json, plan.graph.to_json())
    for files, intervention in zip(layout.items, plan.interventions):
        make_folder(files.folder)
        write_json(files.intervention, intervention.to_json())


def save_item(files: ItemFiles, result, graph, intervention) -> dict:
    """The counterfactual, the graph with its intervention, and one mask per edited concept; the report's
    record of where they went."""
    from .render import render_graph

    save_image(result.image, files.counterfactual)
    save_image(render_graph(graph, intervention), files.graph)
    masks = [(concept_id, path) for concept_id, path in files.masks
             if concept_id in getattr(result, "masks", {})]  # the baselines have no masks
    for concept_id, path in masks:
        save_image(result.mask_image(concept_id), path)
    return {"folder": str(files.folder), "intervention": str(files.intervention),
            "counterfactual": str(files.counterfactual), "graph": str(files.graph),
            "masks": [{"concept_id": concept_id, "file": str(path)} for concept_id, path in masks]}


def write_outputs(layout: OutputLayout, plan: Plan, results: list, report_fields: dict) -> Path:
    """Images, masks and graph per intervention (a sub-folder each when there are several), and the report."""
    save_image(results[0].source_image, layout.original)
    entries = []
    for files, intervention, result in zip(layout.items, plan.interventions, results):
        entries.append({
            "intervention": intervention.to_dict(),
            "stripped_changes": [v.to_dict() for v in intervention.violations],
            "edit_concepts": [asdict(c) for c in intervention.edit_concepts(plan.graph)],
            "files": save_item(files, result, plan.graph, intervention),
        })
        for v in intervention.violations:
            log(f"note: {intervention.id!r}: dropped the change {v.concept_id!r} -> {v.new_value!r}: {v.problem}")
    report = {
        "original": str(layout.original),
        "edited_size": list(results[0].source_image.size),
        "source_prompt": plan.source_prompt,
        "graph": plan.graph.to_dict(),
        "interventions": entries,
        **report_fields,
    }
    write_json(layout.report, json.dumps(report, indent=2, ensure_ascii=False))
    return layout.report


def run(args: argparse.Namespace) -> int:
    from .baselines import check_guidance_scale
    from .counterfactual import CSGParams, load_image, parse_concept_scales

    check_vlm_options(args)
    out = Path(args.out).expanduser()
    check_out_folder(out)
    if args.caption is not None:
        check_caption(args.caption, "--caption")
    image = load_image(args.image)
    params = CSGParams(num_steps=args.steps, skip=args.skip, source_guidance=args.source_guidance, scale=args.scale,
                       threshold=args.threshold, warmup=args.warmup, cooldown=args.cooldown,
                       concept_scales=parse_concept_scales(args.concept_scale, "--concept-scale"),
                       reverse=tuple(args.reverse),
                       mask_mode=args.mask_mode, non_descendant_protection=args.protect_non_descendants,
                       exact=args.exact, seed=args.seed, max_side=args.max_side)
    if args.method == "csg":  # settings that need the method fail before the VLM runs
        params.check_guidance(params.num_steps)
    else:
        check_guidance_scale(args.guidance_scale)
    request = read_request(args)
    if request.graph is not None and request.interventions is not None:
        check_settings(request.graph, request.interventions, params)  # no VLM: all is known before the weights
    device, dtype = resolve_device(args.device, args.dtype)
    comfy = comfyui_root(args.comfyui_root)
    sdxl = find_sdxl(args.sdxl, args.sdxl_config, comfy).check()  # before any slow work: fail fast on missing weights
    lpips = None
    if args.metrics:  # the metrics' weights too: the judge's VLM and LPIPS
        from .metrics import load_lpips_vgg

        if not args.vlm_url:
            find_vlm(args.vlm_model, comfy)
        lpips = load_lpips_vgg(args.lpips_vgg, args.lpips_heads, device=device)
    plan = plan_interventions(args, request, image, comfy, device)
    check_settings(plan.graph, plan.interventions, params)

    layout = plan_layout(out, plan)
    save_plan(layout, plan)
    try:
        report, results = edit_and_write(args, plan, image, params, sdxl, device, dtype, layout)
        if lpips is not None:
            score_and_report(args, plan, report, results, lpips, comfy, device)
        return 0
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted. {replay_hint(out, layout)}") from None
    except OutputError as exc:  # e.g. the disk filled up while the images were written
        raise OutputError(f"{exc} {replay_hint(out, layout)}") from None


def replay_hint(out: Path, layout: OutputLayout) -> str:
    return (f"The graph and the intervention(s) are saved in {out}; rerun with --graph-json {layout.graph_json} "
            f"--intervention-json {layout.items[0].intervention} (each intervention has its own file) to skip the VLM.")


def edit_and_write(args: argparse.Namespace, plan: Plan, image, params, sdxl: SDXLWeights, device, dtype,
                   layout: OutputLayout) -> tuple[Path, list]:
    from .counterfactual import baseline_counterfactuals, counterfactuals
    from .progress import StepProgress

    log(f"loading SDXL from {sdxl.path} on {device} ({str(dtype).removeprefix('torch.')})")
    host = load_host(sdxl, device, dtype)
    log(f"VAE in {str(host.vae.dtype).removeprefix('torch.')}"
        + ("; text encoders in CPU memory, lent to the GPU per encoding" if host.offload_text_encoders else ""))
    log(f"{args.method}: inverting and editing {len(plan.interventions)} intervention(s), {args.steps} steps")
    # one inversion, then one batched CSG loop or one sampling loop per intervention for a baseline
    edits = ([("edit", args.steps)] if args.method == "csg" else
             [(f"sampling {k + 1}/{len(plan.interventions)}", args.steps) for k in range(len(plan.interventions))])
    host = StepProgress(host, [("inversion", args.steps), *edits])
    if args.method == "csg":
        results = counterfactuals(host, image, plan.graph, plan.interventions, source_prompt=plan.source_prompt,
                                  params=params)
    else:
        results = baseline_counterfactuals(host, image, plan.interventions, method=args.method,
                                           source_prompt=plan.source_prompt, params=params,
                                           guidance_scale=args.guidance_scale)
    report = write_outputs(layout, plan, results, {
        "image": str(Path(args.image)),
        "method": args.method,
        "parameters": params.to_dict() | ({"guidance_scale": args.guidance_scale} if args.method != "csg" else {}),
        "models": {"sdxl": str(sdxl.path), "sdxl_config": str(sdxl.config) if sdxl.config else None, "vlm": plan.vlm},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    })
    print(f"wrote {report}")
    return report, results


def score_and_report(args: argparse.Namespace, plan: Plan, report_path: Path, results: list, lpips,
                     comfy: Path | None, device) -> None:
    """--metrics: every score csg-evaluate gives, for each counterfactual, added to report.json."""
    from .evaluation.scoring import edit_region, image_scores, judge_scores

    free_accelerator_memory()  # SDXL is gone; a local VLM may need the memory
    vlm, _ = make_vlm(args, comfy, device)
    report = json.loads(report_path.read_text(encoding="utf-8"))
    for entry, intervention, result in zip(report["interventions"], plan.interventions, results):
        region = edit_region(getattr(result, "masks", {}), result.source_image.size)  # the baselines have no masks
        log(f"judging {intervention.id!r}")
        scores = image_scores(lpips, result.source_image, result.image, region)
        scores |= judge_scores(vlm, result.image, intervention, plan.graph)
        entry["metrics"] = scores
        print(f"{intervention.id}: " + ", ".join(f"{key} {scores[key]:.3f}" for key in METRIC_KEYS
                                                  if scores[key] is not None))
    write_json(report_path, json.dumps(report, indent=2, ensure_ascii=False))


METRIC_KEYS = ("vlm_effectiveness", "lpips", "masked_lpips", "preservation", "causal_consistency")


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
    except CSGError as exc:
        return report_error("csg-counterfactual", exc)


if __name__ == "__main__":
    sys.exit(main())
