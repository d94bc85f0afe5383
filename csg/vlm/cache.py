"""A disk cache of VLM answers, so re-running a workflow does not ask the model again.

The key is the sha256 of everything that shapes an answer: the backend's identity (kind and
model), the system prompt, the conversation, the images' pixel hashes, the temperature, the
token budget, and the JSON Schema the answer was held to with the backend's structured-output mode
(an answer decoded under a schema is not the answer to the same question asked freely). An entry is
one small JSON file written whole or not at all (``csg.output``);
an entry that cannot be read is ignored and rewritten. Identities never hold secrets (the
backends guarantee it) and the files hold only the key, the identity and the answer.

The stages keep it consistent with what they accept (``ask_until_valid``): an answer they reject
is forgotten, and when a later, corrected answer is accepted it is remembered as the answer to the
first question, so a rerun of the stage is answered from here without asking at all.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from PIL import Image

from ..errors import OutputError
from ..output import make_folder, write_text
from .protocol import VLM, Turn, image_fingerprint
from .schemas import Schema

log = logging.getLogger("csg.vlm")

CACHE_FORMAT = 1


def answer_key(identity: str, system: str, turns: Sequence[Turn], images: Sequence[Image.Image],
               temperature: float, max_tokens: int, schema: Schema | None = None, structured: str = "off") -> str:
    record = {
        "format": CACHE_FORMAT,
        "identity": identity,
        "system": system,
        "turns": [[turn.role, turn.text] for turn in turns],
        "images": [image_fingerprint(image) for image in images],
        "temperature": float(temperature),
        "max_tokens": int(max_tokens),
    }
    if schema is not None and structured != "off":  # answers asked freely keep the keys they always had
        record.update(schema=schema, structured=structured)
    return hashlib.sha256(json.dumps(record, sort_keys=True, ensure_ascii=False).encode("utf-8")).hexdigest()


class CachedVLM:
    """Wraps any backend; answers it gave before for the same question come from ``cache_dir``.

    Args:
        backend: the VLM asked on a cache miss.
        cache_dir: the folder of the answers (created on the first answer kept).

    Raises:
        Nothing here; each question raises what ``backend`` raises.
    """

    def __init__(self, backend: VLM, cache_dir: str | Path):
        self.backend = backend
        self.cache_dir = Path(cache_dir).expanduser()

    def __repr__(self) -> str:
        return f"CachedVLM({self.backend!r}, cache_dir={str(self.cache_dir)!r})"

    @property
    def identity(self) -> str:
        return self.backend.identity

    def entry_path(self, key: str) -> Path:
        return self.cache_dir / key[:2] / f"{key}.json"

    def _read(self, path: Path, key: str) -> str | None:
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable VLM cache entry %s (%s); it will be rewritten", path, exc)
            return None
        if not isinstance(entry, dict) or entry.get("key") != key or not isinstance(entry.get("answer"), str):
            log.warning("ignoring malformed VLM cache entry %s; it will be rewritten", path)
            return None
        return entry["answer"]

    def _write(self, path: Path, key: str, answer: str) -> None:
        entry = {"key": key, "identity": self.identity, "answer": answer}
        try:
            make_folder(path.parent)
            # a lone surrogate in an answer is written as its JSON escape, which reads back the same
            write_text(path, json.dumps(entry, ensure_ascii=False), errors="backslashreplace")
        except OutputError as exc:  # a cache that cannot be written only costs time, never the answer
            log.warning("could not write the VLM cache entry %s: %s", path, exc)

    def _entry(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], temperature: float,
               max_tokens: int, schema: Schema | None) -> tuple[str, Path]:
        key = answer_key(self.identity, system, turns, images, temperature, max_tokens, schema,
                         getattr(self.backend, "structured", "off"))
        return key, self.entry_path(key)

    def generate(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *,
                 temperature: float, max_tokens: int, schema: Schema | None = None) -> str:
        key, path = self._entry(system, turns, images, temperature, max_tokens, schema)
        cached = self._read(path, key)
        if cached is not None:
            log.debug("VLM cache hit %s", key[:12])
            return cached
        answer = self.backend.generate(system, turns, images, temperature=temperature, max_tokens=max_tokens,
                                       schema=schema)
        self._write(path, key, answer)
        return answer

    def forget(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *,
               temperature: float, max_tokens: int, schema: Schema | None = None) -> None:
        """Drop a stored answer (the stages call this for answers they rejected, so they are asked anew)."""
        _, path = self._entry(system, turns, images, temperature, max_tokens, schema)
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            log.warning("could not remove the VLM cache entry %s: %s", path, exc)

    def remember(self, system: str, turns: Sequence[Turn], images: Sequence[Image.Image], *,
                 temperature: float, max_tokens: int, answer: str, schema: Schema | None = None) -> None:
        """Store ``answer`` as the answer to this question (the stages call this with the corrected answer
        they accepted, under their first question, so a rerun needs no correction round)."""
        key, path = self._entry(system, turns, images, temperature, max_tokens, schema)
        self._write(path, key, answer)
