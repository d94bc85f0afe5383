"""Results you can trust after a crash: append-only JSONL, one atomic line per finished item.

Each process appends to its own ``results.<rank>.jsonl`` in the output folder. A line is written
with a single ``os.write`` of the whole line and its newline on an ``O_APPEND`` descriptor and then
``fsync``ed, so a killed process leaves either the whole line or, at worst, a torn last line. A
torn line is reported and its item is done again; before appending after one, a newline is written
so the torn text stays on a line of its own and never glues onto the next record. A write that
fails (a full disk) is an ``OutputError``; the line it may have torn is redone by the next run.

Every line carries the settings that produced it (``settings``: editing parameters, methods,
model ids, library versions) and their digest ``settings_id``. A rerun whose settings differ from
those already in the folder is refused unless mixing is allowed explicitly; the report then
keeps the settings apart. Every line also carries ``inputs_id``, a digest of the item's caption and
hand-written plan, and a rerun in which a finished item's inputs changed is refused
(``check_inputs``).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError, some
from ..output import cannot_write, make_folder
from .datasets import Item

RESULTS_GLOB = "results.*.jsonl"


def results_path(out: Path, rank: int) -> Path:
    return out / f"results.{rank}.jsonl"


def settings_id(settings: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class Loaded:
    records: list[dict] = field(default_factory=list)  # every well-formed line, in file order
    torn: list[str] = field(default_factory=list)  # "file:line" of each unreadable line

    def finished(self, settings: str | None = None) -> set[str]:
        """Ids of the items finished without error (under ``settings``, a settings_id, when given)."""
        return {r["item_id"] for r in self.records
                if "error" not in r and (settings is None or r.get("settings_id") == settings)}

    def settings(self) -> dict[str, dict]:
        """settings_id -> settings of every run recorded in the folder."""
        return {r["settings_id"]: r["settings"] for r in self.records if "settings_id" in r}


def load_results(out: Path) -> Loaded:
    """Every record of every ``results.*.jsonl`` in ``out``; torn or corrupt lines are listed, not raised."""
    loaded = Loaded()
    for path in sorted(out.glob(RESULTS_GLOB)):
        for number, line in enumerate(path.read_bytes().split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or "item_id" not in record:
                    raise ValueError("not a result record")
            except (ValueError, UnicodeDecodeError):
                loaded.torn.append(f"{path.name}:{number}")
                continue
            loaded.records.append(record)
    return loaded


def differences(old: Mapping[str, Any], new: Mapping[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two settings dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out


def check_settings(loaded: Loaded, settings: Mapping[str, Any], out: Path, allow_mixed: bool) -> None:
    """Refuse to add results made with other settings to a folder, unless ``allow_mixed``."""
    new_id = settings_id(settings)
    others = {k: v for k, v in loaded.settings().items() if k != new_id}
    if others and not allow_mixed:
        old_id, old = next(iter(others.items()))
        changed = "; ".join(differences(old, settings)[:8])
        raise InputError(f"{out} holds results made with other settings ({old_id}); this run differs in: {changed}. "
                         "Use another --out folder, rerun with the same settings, or pass --allow-mixed-settings to "
                         "add these results beside them (the report keeps each settings apart).")


def check_inputs(loaded: Loaded, items: Iterable[Item], settings: str, out: Path) -> None:
    """Refuse a rerun in which finished items have another caption or hand-written plan than when they
    were done: it would skip them as finished, and their results would quietly describe the old inputs."""
    recorded = {r["item_id"]: r.get("inputs_id") for r in loaded.records
                if "error" not in r and r.get("settings_id") == settings}
    changed = sorted(item.id for item in items if recorded.get(item.id) not in (None, item.inputs_id))
    if changed:
        raise InputError(f"{len(changed):,} finished item(s) in {out} now have another caption or hand-written "
                         f"graph or interventions: {some(changed)}. Their results describe the old ones, and this "
                         "run would skip them as done. Use another --out folder, or delete their lines from "
                         f"{out / RESULTS_GLOB} to have them done again.")


class ResultsWriter:
    """Appends one fsync'ed line per item to ``results.<rank>.jsonl``."""

    def __init__(self, path: Path):
        make_folder(path.parent)
        self.path = path
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise cannot_write(path, exc) from None
        size = os.fstat(self._fd).st_size
        if size:
            with open(path, "rb") as existing:
                existing.seek(size - 1)
                if existing.read(1) != b"\n":  # a torn last line: keep it on a line of its own
                    self._write(b"\n")

    def _write(self, data: bytes) -> None:
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, f"only {written} of {len(data)} bytes were written")
            os.fsync(self._fd)
        except OSError as exc:
            raise cannot_write(self.path, exc) from None

    def append(self, record: Mapping[str, Any]) -> None:
        self._write(json.dumps(record, ensure_ascii=False, allow_nan=False).encode() + b"\n")

    def close(self) -> None:
        os.close(self._fd)

    def __enter__(self) -> ResultsWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def records_by_settings(records: Iterable[dict]) -> dict[str, list[dict]]:
    """Finished records grouped by settings_id, the last line of an item winning."""
    groups: dict[str, dict[str, dict]] = {}
    for record in records:
        if "error" not in record:
            groups.setdefault(record["settings_id"], {})[record["item_id"]] = record
    return {k: list(v.values()) for k, v in groups.items()}
