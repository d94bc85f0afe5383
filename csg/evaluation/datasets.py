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

import hashlib
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any

from ..errors import GraphError, InputError, quote, some
from ..files import (
    MAX_CAPTION_FILE_BYTES,
    MAX_CAPTIONS_BYTES,
    MAX_JSON_BYTES,
    MAX_PLANS_BYTES,
    check_caption,
    read_bytes,
    read_csv,
    read_json,
    read_text,
)
from ..graph import check_intervention, read_graph, read_interventions

KINDS = ("folder", "coco", "celebahq")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DATASET_NAME = re.compile(r"[\w.+-]{1,60}")


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
            digest.update(b"\0" + (read_bytes(path, "hand-written file", MAX_JSON_BYTES) if path else b""))
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
        name = name.strip()
        if not DATASET_NAME.fullmatch(name):  # it heads table.md's columns and every item id ("NAME/KEY")
            raise InputError(f"--dataset {text!r}: the name {quote(name, 60)} may hold letters, digits and _ . + - "
                             "only, at most 60 of them (no '/', '|', spaces or line breaks).")
        path, _, images = location.partition("@")
        return cls(name, kind, Path(path).expanduser(), Path(images).expanduser() if images else None)


def _existing_image(path: Path, where: str) -> Path:
    if path.is_dir():
        raise InputError(f"{where}: {path} is a folder, not an image. Give the image file's name.")
    if not path.is_file():
        raise InputError(f"{where}: the image {path} does not exist. Check the path, or give the image folder "
                         "with --dataset NAME=KIND:PATH@IMAGES.")
    return path


def _text_field(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value.strip():
        given = ("missing" if value is None else "empty" if isinstance(value, str)
                 else f"a {type(value).__name__}")
        raise InputError(f"{where}: the field {key!r} is {given}; it must be text (a file name).")
    return value


def _folder_records(path: Path) -> list[dict]:
    if path.suffix.lower() == ".csv":
        rows = read_csv(path, "captions file", MAX_CAPTIONS_BYTES)
        if rows and not {"image", "caption"} <= set(rows[0]):
            raise InputError(f"The captions file {path} needs the CSV columns image and caption "
                             f"(optional: graph, interventions); it has {', '.join(rows[0])}.")
        return rows
    data = read_json(path, "captions file", MAX_CAPTIONS_BYTES)
    if isinstance(data, dict):
        return [{"image": k, "caption": v} for k, v in data.items()]
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        return data
    raise InputError(f"The captions file {path} must be a JSON object {{image: caption}} or a list of "
                     '{"image": ..., "caption": ...} records, or a CSV file with columns image and caption.')


def _hand_written(record: dict, folder: Path, where: str) -> dict[str, Path]:
    """The record's graph and interventions files (relative to ``folder``), those it gives, read and checked
    now: a broken one fails before any weights load, not when its item's turn comes."""
    files = {key: folder / _text_field(record, key, where) for key in ("graph", "interventions")
             if record.get(key) not in (None, "")}
    if "interventions" in files and "graph" not in files:
        raise InputError(f"{where}: hand-written interventions need the graph whose concept ids they use; "
                         "give its file in the graph column too.")
    if "graph" in files:
        try:
            read_hand_written(files.get("graph"), files.get("interventions"))
        except InputError as exc:
            raise InputError(f"{where}: {exc}") from exc
    return files


def read_hand_written(graph_file: Path | None, interventions_file: Path | None) -> tuple[object, list | None]:
    """The graph and the interventions (checked against it) of hand-written files; None for those not given."""
    graph = read_graph(graph_file) if graph_file else None
    if interventions_file is None:
        return graph, None
    interventions = read_interventions(interventions_file)
    try:
        return graph, [check_intervention(graph, i) for i in interventions]
    except GraphError as exc:
        raise InputError(f"The intervention file {interventions_file} does not fit the graph {graph_file}: "
                         f"{exc}") from exc


def _folder_items(spec: DatasetSpec) -> list[Item]:
    images = spec.images or spec.path.parent
    items = []
    for k, record in enumerate(_folder_records(spec.path)):
        where = f"{spec.path}, record {k + 1}"
        name = _text_field(record, "image", where)
        caption = check_caption(record.get("caption"), where)
        optional = _hand_written(record, spec.path.parent, where)
        image = _existing_image(images / name, where)
        items.append(Item(f"{spec.name}/{Path(name).stem}", spec.name, image, caption, **optional))
    return items


def _coco_id(record: Any, key: str, where: str) -> int:
    value = record.get(key) if isinstance(record, dict) else None
    if type(value) is not int:  # bool is an int too, and never an id
        raise InputError(f"{where}: {key!r} must be a whole number, got {quote(repr(value), 60)}. Is this a COCO "
                         "captions file (captions_*.json)?")
    return value


def _coco_items(spec: DatasetSpec) -> list[Item]:
    data = read_json(spec.path, "COCO captions file", MAX_CAPTIONS_BYTES)
    if (not isinstance(data, dict) or not isinstance(data.get("images"), list)
            or not isinstance(data.get("annotations"), list)):
        raise InputError(f"{spec.path} is not a COCO captions file: it needs the lists 'images' and 'annotations'.")
    split = spec.path.stem.removeprefix("captions_")
    images = spec.images or spec.path.parent.parent / split
    captions: dict[int, tuple[int, str]] = {}
    for k, note in enumerate(data["annotations"]):
        where = f"{spec.path}, annotation {k + 1}"
        image_id, note_id = _coco_id(note, "image_id", where), _coco_id(note, "id", where)
        caption = check_caption(note.get("caption"), where).strip()
        current = captions.get(image_id)
        if current is None or note_id < current[0]:
            captions[image_id] = (note_id, caption)
    items = []
    for k, image in enumerate(data["images"]):
        where = f"{spec.path}, image {k + 1}"
        image_id = _coco_id(image, "id", where)
        if image_id in captions:
            path = _existing_image(images / _text_field(image, "file_name", where), where)
            items.append(Item(f"{spec.name}/{image_id}", spec.name, path, captions[image_id][1]))
    return items


def _celebahq_items(spec: DatasetSpec) -> list[Item]:
    if not spec.path.is_dir():
        raise InputError(f"{spec.path} is not a folder of caption files (CelebA-HQ's celeba-caption/).")
    images = spec.images or next((spec.path.parent / n for n in ("CelebA-HQ-img", "images")
                                  if (spec.path.parent / n).is_dir()), None)
    if images is None:
        raise InputError(f"No image folder beside {spec.path} (looked for CelebA-HQ-img/ and images/); give it with "
                         f"--dataset {spec.name}=celebahq:{spec.path}@IMAGES.")
    if not images.is_dir():
        raise InputError(f"The image folder {images} of --dataset {spec.name} is not a folder.")
    by_stem: dict[str, list[Path]] = {}
    for path in sorted(images.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():  # a folder named 1.jpg is no image
            by_stem.setdefault(path.stem, []).append(path)
    items = []
    for text in sorted(spec.path.glob("*.txt")):
        found = by_stem.get(text.stem, [])
        if not found:
            raise InputError(f"The caption {text} has no image {text.stem}.* in {images}.")
        if len(found) > 1:
            raise InputError(f"The caption {text} fits several images: {', '.join(p.name for p in found)} in {images}. "
                             "Keep one of them.")
        lines = read_text(text, "caption file", MAX_CAPTION_FILE_BYTES).splitlines()
        caption = check_caption(next((line.strip() for line in lines if line.strip()), ""), str(text))
        items.append(Item(f"{spec.name}/{text.stem}", spec.name, found[0], caption))
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
        rows = read_csv(path, "plans file", MAX_PLANS_BYTES)
        if rows and not {"item", "graph"} <= set(rows[0]):
            raise InputError(f"The plans file {path} needs the CSV columns item and graph (optional: "
                             f"interventions); it has {', '.join(rows[0])}.")
        records = {}
        for k, row in enumerate(rows):
            item = _text_field(row, "item", f"{path}, row {k + 1}")
            if item in records:
                raise InputError(f"The plans file {path} names the item {quote(item, 60)} twice (rows "
                                 f"{list(records).index(item) + 1} and {k + 1}); keep one row per item.")
            records[item] = row
    else:
        records = read_json(path, "plans file", MAX_PLANS_BYTES)  # an item named twice is refused there
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
    if per_dataset is not None and per_dataset < 1:
        raise InputError(f"--per-dataset must be at least 1 (items sampled per dataset), got {per_dataset}; leave it "
                         "out to take every item.")
    specs = list(specs)
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise InputError(f"Two --dataset options share a name ({', '.join(names)}); give each its own NAME.")
    items = [item for spec in specs for item in load_items(spec)]
    if plans is not None:
        items = with_plans(items, load_plans(plans), plans)
    by_dataset = {name: [item for item in items if item.dataset == name] for name in names}
    return [item for name in names for item in sample_items(by_dataset[name], per_dataset, seed)]
