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
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import CSGError, InputError, OutputError
from ..files import check_caption
from ..graph import CausalGraph, Intervention, check_intervention, read_graph, read_interventions
from ..plan import Plan, make_plan, needs_vlm, pick_interventions
from ..weights import SDXLWeights, comfyui_root, find_sdxl, find_vlm
from .options import (
    EXIT_INTERRUPTED,
    add_device_flags,
    add_edit_flags,
    add_lpips_flags,
    add_sdxl_flags,
    add_vlm_flags,
    check_out_folder,
    check_vlm_options,
    device_and_dtype,
    edit_params,
    free_accelerator_memory,
    make_vlm,
    report_error,
    seed_number,
)
from .outputs import OutputLayout, log, plan_layout, save_plan, write_json, write_outputs

METRIC_KEYS = ("vlm_effectiveness", "lpips", "masked_lpips", "preservation", "causal_consistency")


# -- arguments -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csg-counterfactual",
        description="Causal counterfactual of a photo: a VLM finds the causal graph, SDXL edits the intervened "
                    "concept and its descendants with Causal Semantic Guidance.",
        epilog='Example: csg-counterfactual csg/examples/portrait.png --do "age=old" --out out/')
    add_plan_flags(p)
    add_vlm_flags(p.add_argument_group("vision-language model"))
    add_sdxl_flags(p.add_argument_group("diffusion model"))
    edit = p.add_argument_group("editing (defaults: the paper's)")
    edit.add_argument("--method", choices=("csg", "ddpm", "ddim"), default="csg",
                      help="csg, or a Table 1 baseline: edit-friendly DDPM / DDIM inversion + CFG on the full prompt")
    add_edit_flags(edit)
    run = p.add_argument_group("run")
    run.add_argument("--out", default="out", metavar="DIR")
    add_device_flags(run, "auto, cpu, cuda, cuda:1, mps ...")
    run.add_argument("--seed", type=seed_number, default=0)
    scores = p.add_argument_group("metrics (--metrics)")
    scores.add_argument("--metrics", action="store_true",
                        help="score each counterfactual: LPIPS(VGG), masked LPIPS (csg), and with the VLM as judge "
                             "VLM effectiveness, Preservation and Causal consistency (into report.json)")
    add_lpips_flags(scores)
    return p


def add_plan_flags(p: argparse.ArgumentParser) -> None:
    """The photo, and what to do to it."""
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


# -- the plan --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """The user's side of the plan, parsed and checked before anything slow happens."""

    graph: CausalGraph | None  # from --graph-json
    interventions: list[Intervention] | None  # from --intervention-json (those --pick chose), or --target-only
    do: tuple[str, str] | None  # (concept, value) from --do
    pick: int | None  # 1-based proposal, None for all


def read_request(args: argparse.Namespace) -> Request:
    if args.pick is not None and args.do:
        raise InputError("--pick chooses among the VLM's proposals or the interventions of an --intervention-json "
                         "file, and --do is an intervention of your own: give one of them.")
    pick = parse_pick(args.pick or "1")
    graph = read_graph(args.graph_json) if args.graph_json else None
    given = read_intervention_file(args, pick) if args.intervention_json else None
    do = parse_do(args.do) if args.do else None
    if args.target_only and (do is None or graph is None):
        raise InputError("--target-only edits the target of --do on the graph of --graph-json; give both "
                         '(e.g. --graph-json csg/examples/portrait_graph.json --do "age=old" --target-only).')
    if do is not None and graph is not None:
        graph.find_concept(do[0])  # an unknown concept fails now, with the list of known ones
    if args.target_only:
        from ..vlm import manual_intervention

        given, do = [manual_intervention(graph, do[0], do[1], generation_prompt=args.caption or "")], None
    if given is not None and graph is not None:
        given = [check_intervention(graph, i) for i in given]  # an unknown target fails now, before any weights
    return Request(graph, given, do, pick)


def read_intervention_file(args: argparse.Namespace, pick: int | None) -> list[Intervention]:
    in_file = read_interventions(args.intervention_json)
    if len(in_file) > 1 and args.pick is None:
        log(f"{args.intervention_json} holds {len(in_file)} interventions; editing the first (--pick N or "
            "--pick all for the others)")
    return pick_interventions(in_file, pick, f"{args.intervention_json} holds")


def check_settings(graph, interventions: list, params) -> None:
    """Per-concept settings (--concept-scale, --reverse) naming unknown concepts fail here, before SDXL loads."""
    from ..counterfactual import edit_spec

    for intervention in interventions:
        edit_spec(graph, intervention, params)


def plan_interventions(args: argparse.Namespace, request: Request, image, comfy: Path | None,
                       device) -> tuple[Plan, str | None]:
    """The plan, and the VLM that made it (its folder or redacted endpoint; None when none was needed)."""
    if not needs_vlm(request.graph, request.interventions):
        return make_plan(None, image, args.caption, request.graph, request.interventions), None
    vlm, vlm_name = make_vlm(args, comfy, device)
    log(f"vision-language model: {vlm_name}")
    plan = make_plan(vlm, image, args.caption, request.graph, request.interventions, request.do, request.pick, log)
    del vlm
    free_accelerator_memory()  # the VLM's memory goes back before SDXL loads
    return plan, vlm_name


# -- the run ---------------------------------------------------------------------------------------


class Interrupted(Exception):
    """Ctrl-C after the plan was saved; the message says how to resume from it."""


def run(args: argparse.Namespace) -> int:
    from ..counterfactual import load_image

    check_vlm_options(args)
    out = Path(args.out).expanduser()
    check_out_folder(out)
    if args.caption is not None:
        check_caption(args.caption, "--caption")
    image = load_image(args.image)
    params = checked_params(args)
    request = read_request(args)
    if request.graph is not None and request.interventions is not None:
        check_settings(request.graph, request.interventions, params)  # no VLM: all is known before the weights
    device, dtype = device_and_dtype(args.device, args.dtype)
    comfy = comfyui_root(args.comfyui_root)
    sdxl = find_sdxl(args.sdxl, args.sdxl_config, comfy).check()  # before any slow work: fail fast on missing weights
    lpips = load_metric_weights(args, comfy, device) if args.metrics else None
    plan, vlm_name = plan_interventions(args, request, image, comfy, device)
    check_settings(plan.graph, plan.interventions, params)

    layout = plan_layout(out, plan)
    save_plan(layout, plan)
    try:
        report, results = edit_and_write(args, plan, vlm_name, image, params, sdxl, device, dtype, layout)
        if lpips is not None:
            score_and_report(args, plan, report, results, lpips, comfy, device)
        return 0
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted. {replay_hint(out, layout)}") from None
    except OutputError as exc:  # e.g. the disk filled up while the images were written
        raise OutputError(f"{exc} {replay_hint(out, layout)}") from exc


def checked_params(args: argparse.Namespace):
    """The edit's settings; those that need the method fail before the VLM runs."""
    from ..baselines import check_guidance_scale

    params = edit_params(args)
    if args.method == "csg":
        params.check_guidance(params.num_steps)
    else:
        check_guidance_scale(args.guidance_scale)
    return params


def load_metric_weights(args: argparse.Namespace, comfy: Path | None, device):
    """--metrics: the judge's VLM is looked for and LPIPS loaded, before anything slow."""
    from ..metrics import load_lpips_vgg

    if not args.vlm_url:
        find_vlm(args.vlm_model, comfy)
    return load_lpips_vgg(args.lpips_vgg, args.lpips_heads, device=device)


def replay_hint(out: Path, layout: OutputLayout) -> str:
    return (f"The graph and the intervention(s) are saved in {out}; rerun with --graph-json {layout.graph_json} "
            f"--intervention-json {layout.items[0].intervention} (each intervention has its own file) to skip the VLM.")


def edit_and_write(args: argparse.Namespace, plan: Plan, vlm_name: str | None, image, params, sdxl: SDXLWeights,
                   device, dtype, layout: OutputLayout) -> tuple[Path, list]:
    from ..counterfactual import baseline_counterfactuals, counterfactuals
    from ..progress import StepProgress

    log(f"loading SDXL from {sdxl.path} on {device} ({str(dtype).removeprefix('torch.')})")
    host = sdxl.load(device, dtype)
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
        "models": {"sdxl": str(sdxl.path), "sdxl_config": str(sdxl.config) if sdxl.config else None, "vlm": vlm_name},
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
    })
    print(f"wrote {report}")
    return report, results


def score_and_report(args: argparse.Namespace, plan: Plan, report_path: Path, results: list, lpips,
                     comfy: Path | None, device) -> None:
    """--metrics: every score csg-evaluate gives, for each counterfactual, added to report.json."""
    from ..evaluation.scoring import edit_region, image_scores, judge_scores

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
