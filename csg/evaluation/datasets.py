"""Evaluation datasets: items (an image, its caption, optionally a hand-written graph and
interventions) read from three layouts, and the paper's seeded sampling without replacement.

``--dataset NAME=KIND:PATH[@IMAGES]``, KIND one of

* ``folder``: PATH is a captions file, JSON or CSV, with one record per image: ``image`` (a path
  relative to IMAGES, default the file's folder) and ``caption``, and optionally ``graph`` and
  ``interventions`` (paths of a hand-written graph and intervention JSON, relative to the captions
  file, which replace the VLM's extraction and proposals for that item). A JSON file may also be a
  plain ``{"image file": "caption"}`` object.
* ``coco``: PATH is a COCO captions annotation file (``captions_val2017.json``); IMAGES defaults to
  the split's folder beside the annotations folder (``../val2017``). An image's caption is its
  annotation with the lowest id.
* ``celebahq``: PATH is a folder of caption files, one ``<stem>.txt`` per image (CelebA-HQ's
  ``celeba-caption/``), whose first line is the caption; IMAGES defaults to ``CelebA-HQ-img`` or
  ``images`` beside it.

Item ids are ``NAME/<image stem>`` (``NAME/<image id>`` for COCO), so results of one dataset never
collide with another's. ``--plans FILE`` gives hand-written graphs and interventions by item id, for
items of any layout (``load_plans``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from ..errors import InputError, some

KINDS = ("folder", "coco", "celebahq")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class Item:
    id: str  # "dataset/key", unique across datasets
    dataset: str
    image: Path
    caption: str
    graph: Path | None = None  # hand-written graph JSON, replaces the VLM's extraction
    interventions: Path | None = None  # hand-written interventions JSON, replaces the VLM's proposals

    @cached_property
    def inputs_id(self) -> str:
        """A digest of what the item's result depends on besides the run's settings: its caption and the
        bytes of its hand-written graph and interventions, read once. (The image is not read: hashing a
        whole dataset's pixels on every rerun would cost more than it protects.)"""
        digest = hashlib.sha256(self.caption.encode())
        for path in (self.graph, self.interventions):
            digest.update(b"\0" + (path.read_bytes() if path else b""))
        return digest.hexdigest()[:12]

    def shard(self, num_shards: int) -> int:
        """The process this item belongs to: a stable hash of its id (the same on every machine)."""
        return int.from_bytes(hashlib.sha256(self.id.encode()).digest()[:8], "big") % num_shards


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str
    path: Path
    images: Path | None = None

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        name, eq, rest = text.partition("=")
        kind, colon, location = rest.partition(":")
        if not eq or not colon or not name.strip() or not location:
            raise InputError(f"--dataset {text!r}: write NAME=KIND:PATH[@IMAGES], e.g. coco=coco:annotations/"
                             "captions_val2017.json or faces=celebahq:CelebAMask-HQ/celeba-caption.")
        if kind not in KINDS:
            raise InputError(f"--dataset {text!r}: unknown kind {kind!r}; choose one of {', '.join(KINDS)}.")
        if "/" in name:
            raise InputError(f"--dataset {text!r}: the name {name!r} may not contain '/'.")
        path, _, images = location.partition("@")
        return cls(name.strip(), kind, Path(path).expanduser(), Path(images).expanduser() if images else None)


def _read_text(path: Path, what: str) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"The {what} {path} does not exist.") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"Could not read the {what} {path} as UTF-8 text: {exc}.") from None


def _read_json(path: Path, what: str):
    try:
        return json.loads(_read_text(path, what))
    except json.JSONDecodeError as exc:
        raise InputError(f"The {what} {path} is not valid JSON: {exc}.") from None


def _existing_image(path: Path, where: str) -> Path:
    if not path.is_file():
        raise InputError(f"{where}: the image {path} does not exist. Check the path, or give the image folder "
                         "with --dataset NAME=KIND:PATH@IMAGES.")
    return path


def _folder_records(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(_read_text(path, "captions file"))))
        if rows and not {"image", "caption"} <= set(rows[0]):
            raise InputError(f"The captions file {path} needs the CSV columns image and caption "
                             f"(optional: graph, interventions); it has {', '.join(rows[0])}.")
        return rows
    data = _read_json(path, "captions file")
    if isinstance(data, dict):
        return [{"image": k, "caption": v} for k, v in data.items()]
    if isinstance(data, list) and all(isinstance(r, dict) and "image" in r and "caption" in r for r in data):
        return data
    raise InputError(f"The captions file {path} must be a JSON object {{image: caption}} or a list of "
                     '{"image": ..., "caption": ...} records, or a CSV file with columns image and caption.')


def _hand_written(record: dict, folder: Path, where: str) -> dict[str, Path]:
    """The record's graph and interventions files (relative to ``folder``), those it gives."""
    files = {key: folder / str(record[key]) for key in ("graph", "interventions") if record.get(key)}
    if "interventions" in files and "graph" not in files:
        raise InputError(f"{where}: hand-written interventions need the graph whose concept ids they use; "
                         "give its file in the graph column too.")
    for path in files.values():
        if not path.is_file():
            raise InputError(f"{where}: the hand-written file {path} does not exist.")
    return files


def _folder_items(spec: DatasetSpec) -> list[Item]:
    images = spec.images or spec.path.parent
    items = []
    for k, record in enumerate(_folder_records(spec.path)):
        where = f"{spec.path}, record {k + 1}"
        optional = _hand_written(record, spec.path.parent, where)
        image = _existing_image(images / str(record["image"]), where)
        items.append(Item(f"{spec.name}/{Path(str(record['image'])).stem}", spec.name, image, str(record["caption"]),
                          **optional))
    return items


def _coco_items(spec: DatasetSpec) -> list[Item]:
    data = _read_json(spec.path, "COCO captions file")
    if (not isinstance(data, dict) or not isinstance(data.get("images"), list)
            or not isinstance(data.get("annotations"), list)):
        raise InputError(f"{spec.path} is not a COCO captions file: it needs the lists 'images' and 'annotations'.")
    split = spec.path.stem.removeprefix("captions_")
    images = spec.images or spec.path.parent.parent / split
    captions: dict[int, tuple[int, str]] = {}
    for note in data["annotations"]:
        current = captions.get(note["image_id"])
        if current is None or note["id"] < current[0]:
            captions[note["image_id"]] = (note["id"], note["caption"].strip())
    return [Item(f"{spec.name}/{image['id']}", spec.name, _existing_image(images / image["file_name"], str(spec.path)),
                 captions[image["id"]][1])
            for image in data["images"] if image["id"] in captions]


def _celebahq_items(spec: DatasetSpec) -> list[Item]:
    if not spec.path.is_dir():
        raise InputError(f"{spec.path} is not a folder of caption files (CelebA-HQ's celeba-caption/).")
    images = spec.images or next((spec.path.parent / n for n in ("CelebA-HQ-img", "images")
                                  if (spec.path.parent / n).is_dir()), None)
    if images is None:
        raise InputError(f"No image folder beside {spec.path} (looked for CelebA-HQ-img/ and images/); give it with "
                         f"--dataset {spec.name}=celebahq:{spec.path}@IMAGES.")
    by_stem = {p.stem: p for p in images.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    items = []
    for text in sorted(spec.path.glob("*.txt")):
        if text.stem not in by_stem:
            raise InputError(f"The caption {text} has no image {text.stem}.* in {images}.")
        caption = next((line.strip() for line in _read_text(text, "caption file").splitlines() if line.strip()), "")
        items.append(Item(f"{spec.name}/{text.stem}", spec.name, by_stem[text.stem], caption))
    return items


def load_items(spec: DatasetSpec) -> list[Item]:
    """Every item of a dataset, sorted by id; raises InputError naming the file that is wrong."""
    reader = {"folder": _folder_items, "coco": _coco_items, "celebahq": _celebahq_items}[spec.kind]
    items = sorted(reader(spec), key=lambda item: item.id)
    if not items:
        raise InputError(f"The dataset {spec.name} ({spec.kind} at {spec.path}) has no items.")
    duplicates = sorted({a.id for a, b in zip(items, items[1:]) if a.id == b.id})
    if duplicates:
        raise InputError(f"The dataset {spec.name} has several images with the ids {', '.join(duplicates[:5])}; "
                         "image names (without extension) must be unique.")
    return items


def sample_items(items: Sequence[Item], n: int | None, seed: int) -> list[Item]:
    """``n`` items drawn without replacement by a seeded RNG over the id-sorted list (the same draw on
    every machine and rerun), in id order; all of them when ``n`` is None or covers the dataset."""
    ordered = sorted(items, key=lambda item: item.id)
    if n is None or n >= len(ordered):
        return ordered
    chosen = random.Random(seed).sample(range(len(ordered)), n)
    return [ordered[k] for k in sorted(chosen)]


def load_plans(path: Path) -> dict[str, dict[str, Path]]:
    """``--plans FILE``: hand-written graphs and interventions for items of any dataset, by item id.

    A JSON object ``{"coco/139": {"graph": "g.json", "interventions": "i.json"}, ...}`` or a CSV file
    with the columns item, graph and interventions; file paths are relative to FILE's folder.
    """
    if path.suffix.lower() == ".csv":
        rows = list(csv.DictReader(io.StringIO(_read_text(path, "plans file"))))
        if rows and not {"item", "graph"} <= set(rows[0]):
            raise InputError(f"The plans file {path} needs the CSV columns item and graph (optional: "
                             f"interventions); it has {', '.join(rows[0])}.")
        records = {str(row["item"]): row for row in rows}
    else:
        records = _read_json(path, "plans file")
        if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
            raise InputError(f'The plans file {path} must be a JSON object {{"DATASET/KEY": {{"graph": FILE, '
                             '"interventions": FILE}}, ...}} or a CSV file with columns item, graph, interventions.')
    plans = {item: _hand_written(record, path.parent, f"{path}, item {item}") for item, record in records.items()}
    empty = [item for item, files in plans.items() if not files]
    if empty:
        raise InputError(f"{path}: the items {some(empty)} name no graph file; give one or drop them.")
    return plans


def with_plans(items: Sequence[Item], plans: dict[str, dict[str, Path]], source: Path) -> list[Item]:
    """``items`` with the hand-written files of ``plans``; every id in ``plans`` must be one of them."""
    by_id = {item.id: item for item in items}
    unknown = sorted(set(plans) - set(by_id))
    if unknown:
        raise InputError(f"{source} names items no --dataset has: {some(unknown)}. Item ids are "
                         "NAME/<image stem> (NAME/<image id> for COCO), NAME as in --dataset NAME=KIND:PATH.")
    twice = sorted(i for i in plans if by_id[i].graph is not None)
    if twice:
        raise InputError(f"The items {some(twice)} have hand-written files both in their captions file "
                         f"and in {source}; keep one.")
    return [replace(item, **plans[item.id]) if item.id in plans else item for item in items]


def select(specs: Iterable[DatasetSpec], per_dataset: int | None, seed: int,
           plans: Path | None = None) -> list[Item]:
    """The evaluation's items: ``per_dataset`` sampled from each dataset, with the hand-written graphs
    and interventions of the ``plans`` file (``load_plans``) in place of the VLM's."""
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"Two --dataset options share a name ({', '.join(names)}); give each its own NAME.")
    items = [item for spec in specs for item in load_items(spec)]
    if plans is not None:
        items = with_plans(items, load_plans(plans), plans)
    by_dataset = {name: [item for item in items if item.dataset == name] for name in names}
    return [item for name in names for item in sample_items(by_dataset[name], per_dataset, seed)]
