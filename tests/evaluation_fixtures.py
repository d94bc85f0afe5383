"""Datasets in the three input layouts and a 127.0.0.1 VLM that plans and judges any item, for the
evaluation tests and benchmark. Importable as ``from tests.evaluation_fixtures import ...``."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

from tests.sdxl_fixtures import sample_image
from tests.test_vlm_stages import load_scene, stage_of, wrap
from tests.vlm_server import Reply, VLMServer, completion

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "csg" / "examples"
CHECK_LINE = re.compile(r"^- (?P<name>[^:\n]+): (?P<value>.+)$", re.MULTILINE)


def write_folder_dataset(root: Path, n: int = 3, fmt: str = "json", hand_written: bool = True) -> Path:
    """``n`` images with captions in ``root/captions.json`` (or .csv); the first item carries the
    example's hand-written graph and intervention when ``hand_written``."""
    root.mkdir(parents=True, exist_ok=True)
    records = []
    for k in range(n):
        sample_image(seed=10 + k).save(root / f"img{k}.png")
        records.append({"image": f"img{k}.png", "caption": f"a portrait photo number {k}", "graph": "",
                        "interventions": ""})
    if hand_written:
        shutil.copy(EXAMPLES / "portrait_graph.json", root / "graph.json")
        shutil.copy(EXAMPLES / "portrait_intervention.json", root / "interventions.json")
        records[0].update(graph="graph.json", interventions="interventions.json")
    if fmt == "csv":
        path = root / "captions.csv"
        with path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(records[0]))
            writer.writeheader()
            writer.writerows(records)
        return path
    path = root / "captions.json"
    path.write_text(json.dumps(records))
    return path


def write_coco_dataset(root: Path, n: int = 3) -> Path:
    """COCO's layout: annotations/captions_val2017.json and val2017/<file_name>."""
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    (root / "val2017").mkdir(exist_ok=True)
    images, notes = [], []
    for k in range(n):
        name = f"{k + 1:012d}.jpg"
        sample_image(seed=20 + k).save(root / "val2017" / name, quality=95)
        images.append({"id": 100 + k, "file_name": name, "height": 64, "width": 64})
        notes += [{"id": 1000 + 2 * k + 1, "image_id": 100 + k, "caption": f"a second caption {k}"},
                  {"id": 1000 + 2 * k, "image_id": 100 + k, "caption": f" a photo of a scene {k} "}]
    path = root / "annotations" / "captions_val2017.json"
    path.write_text(json.dumps({"images": images, "annotations": notes}))
    return path


def write_celebahq_dataset(root: Path, n: int = 3) -> Path:
    """CelebAMask-HQ's layout: CelebA-HQ-img/<k>.jpg and celeba-caption/<k>.txt (captions one per line)."""
    (root / "CelebA-HQ-img").mkdir(parents=True, exist_ok=True)
    (root / "celeba-caption").mkdir(exist_ok=True)
    for k in range(n):
        sample_image(seed=30 + k).save(root / "CelebA-HQ-img" / f"{k}.jpg", quality=95)
        (root / "celeba-caption" / f"{k}.txt").write_text(f"This woman has smile number {k}.\nShe is young.\n")
    return root / "celeba-caption"


def judge_answer(request) -> str:
    """A judgement of the request's own checklist: every line present except those whose value has
    a "y" in it, so the scores are neither all 0 nor all 1."""
    text = request.text()
    block = text[text.index("<checklist>"):text.index("</checklist>")]
    checks = [{"concept_name": m["name"], "expected_value": m["value"], "present": "no" if "y" in m["value"] else "yes"}
              for m in CHECK_LINE.finditer(block)]
    verdict = "success" if all(c["present"] == "yes" for c in checks) else "partial"
    return json.dumps({"intervention_id": "x", "concept_checks": checks, "verdict": verdict, "reasoning": "ok"})


def evaluation_server(delay: float = 0.0) -> VLMServer:
    """Plans every item as the portrait scene (extraction, 3 proposals) and judges any checklist."""
    scene = load_scene("portrait")

    def respond(request) -> Reply:
        stage = stage_of(request)
        if stage == "judgement":
            reply = completion(judge_answer(request))
        else:
            reply = completion(wrap(scene[stage], scene["wrapping"]))
        reply.delay = delay
        return reply

    return VLMServer(respond)
