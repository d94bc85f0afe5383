"""Causal edit instructions: the causal half of FM-CGM written for an instruction editor (generator G).

An instruction editor (Qwen-Image-Edit, FLUX.1 Kontext) takes an image and one sentence. What the
causal graph knows goes into that sentence and nothing more:

* the target's change and each changed descendant's new value, in causal order (``edit_concepts``);
* what must stay: the non-descendants of the target with their current values, at most ``max_kept``
  of them, in the graph's order;
* never a value that ``check_intervention`` stripped as a causal violation.

The wording follows each editor's published prompting advice (docs/metrics.md cites the sources):
FLUX.1 Kontext wants the subject named every time (no "it" or "her"), a precise verb ("change"),
and the preserved parts listed explicitly, stated positively since FLUX takes no negative prompt.
Qwen-Image-Edit's own instruction rewriter asks for short "Change X to Y" clauses and an explicit
"keep ... unchanged". The generic style is plain enough for any editor.

The text is deterministic. ``rewrite_instruction`` lets a VLM polish it and accepts the rewrite only
when it still names every changed value and every kept value and none of the stripped ones.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from PIL import Image

from .errors import InputError
from .graph import CausalGraph, Intervention, check_intervention
from .vlm.asking import DEFAULT_ATTEMPTS, ask_until_valid
from .vlm.parsing import VLMOutputError
from .vlm.prompts import Stage
from .vlm.protocol import VLM

log = logging.getLogger("csg.instruction")

EDITOR_STYLES = ("generic", "qwen-image-edit", "flux-kontext")
DEFAULT_MAX_KEPT = 12  # FLUX's T5 reads 512 tokens; a dozen "the x as y" clauses fit beside the changes
MAX_KEPT_LIMIT = 100  # a graph's concept limit (csg.graph.MAX_CONCEPTS)


@dataclass(frozen=True)
class ConceptChange:
    concept_name: str
    original_value: str
    new_value: str


@dataclass(frozen=True)
class KeptConcept:
    concept_name: str
    value: str


@dataclass(frozen=True)
class EditInstruction:
    """One intervention as an editor's instruction, with the facts it was written from.

    ``changed`` is in causal order (target first); ``kept`` holds at most ``max_kept`` non-descendants,
    and ``kept_left_out`` counts the ones beyond that limit. ``forbidden`` are the values that stripped
    violations proposed and no fact names, which the instruction must never contain. ``note`` says why
    a VLM rewrite was not used, when it was asked for and failed its check.
    """

    intervention_id: str
    style: str
    text: str
    changed: tuple[ConceptChange, ...]
    kept: tuple[KeptConcept, ...]
    kept_left_out: int = 0
    forbidden: tuple[str, ...] = ()
    note: str = ""

    def changed_text(self) -> str:
        """The changed concepts, one line each: "hair color: blond -> black"."""
        return "\n".join(f"{c.concept_name}: {c.original_value} -> {c.new_value}" for c in self.changed)

    def kept_text(self) -> str:
        """The kept concepts, one line each: "background: city street" (and how many were left out)."""
        lines = [f"{k.concept_name}: {k.value}" for k in self.kept]
        if self.kept_left_out:
            lines.append(f"(and {self.kept_left_out} more not named, over the limit of {len(self.kept)})")
        return "\n".join(lines)


def _check_style(style: str) -> str:
    if style not in EDITOR_STYLES:
        raise InputError(f"Unknown editor style {style!r}. Choose one of: {', '.join(EDITOR_STYLES)}.")
    return style


def _check_max_kept(max_kept: int) -> int:
    if isinstance(max_kept, bool) or not isinstance(max_kept, int) or not 0 <= max_kept <= MAX_KEPT_LIMIT:
        raise InputError(f"max_kept must be a whole number from 0 to {MAX_KEPT_LIMIT}, got {max_kept!r}. "
                         "It is how many unchanged concepts the instruction names.")
    return max_kept


def _the(name: str) -> str:
    """A concept name as the subject of a clause: "the hair color" (editors read names, never pronouns)."""
    return name if name.lower().startswith(("the ", "a ", "an ")) else f"the {name}"


def _series(items: Sequence[str]) -> str:
    if len(items) <= 2:
        return " and ".join(items)
    return f"{', '.join(items[:-1])} and {items[-1]}"


def _generic(changed: Sequence[ConceptChange], kept: Sequence[KeptConcept]) -> str:
    first, rest = changed[0], changed[1:]
    parts = [f"Change {_the(first.concept_name)} from {first.original_value} to {first.new_value}."]
    if rest:
        follow = [f"{_the(c.concept_name)} from {c.original_value} to {c.new_value}" for c in rest]
        parts.append(f"As a consequence, also change {_series(follow)}.")
    if kept:
        parts.append(f"Keep {_series([f'{_the(k.concept_name)} as {k.value}' for k in kept])}.")
    parts.append("Leave everything else in the image unchanged.")
    return " ".join(parts)


def _flux_kontext(changed: Sequence[ConceptChange], kept: Sequence[KeptConcept]) -> str:
    # BFL's Kontext guide: name each subject directly, use "change" for a controlled edit, and list
    # what stays, as what it should be (FLUX has no negative prompt).
    clauses = [f"change {_the(c.concept_name)} from {c.original_value} to {c.new_value}" for c in changed]
    text = clauses[0][0].upper() + clauses[0][1:]
    if len(clauses) > 1:
        text += f", and to match that {_series(clauses[1:])}"
    text += "."
    if kept:
        text += f" Keep {_series([f'{_the(k.concept_name)} exactly as {k.value}' for k in kept])}."
    return text + " Keep the composition, framing and everything else identical to the input image."


def _qwen_image_edit(changed: Sequence[ConceptChange], kept: Sequence[KeptConcept]) -> str:
    # Qwen-Image-Edit's instruction rewriter: short "Change X to Y" clauses, then what stays unchanged.
    text = "; ".join(f"change {_the(c.concept_name)} to {c.new_value}" for c in changed) + "."
    text = text[0].upper() + text[1:]
    if kept:
        text += f" Keep {_series([f'{_the(k.concept_name)} ({k.value})' for k in kept])} unchanged."
    return text + " Keep the rest of the image unchanged."


_WRITERS = {"generic": _generic, "qwen-image-edit": _qwen_image_edit, "flux-kontext": _flux_kontext}


def edit_instruction(graph: CausalGraph, intervention: Intervention, style: str = "generic", *,
                     max_kept: int = DEFAULT_MAX_KEPT) -> EditInstruction:
    """The edit instruction of do(C_i = c') for an instruction editor.

    Args:
        graph: the causal graph.
        intervention: the intervention; it is checked against ``graph`` first, so a change the graph
            forbids never reaches the instruction.
        style: one of ``EDITOR_STYLES``.
        max_kept: at most this many non-descendants are named as kept, in the graph's order; 0 names none.

    Returns:
        The instruction with its changed and kept concepts.

    Raises:
        GraphError: the intervention does not fit the graph.
        InputError: an unknown style or a bad ``max_kept``.
    """
    _check_style(style)
    _check_max_kept(max_kept)
    checked = check_intervention(graph, intervention)
    changes = {c.concept_id: c for c in checked.propagated_changes}
    changed = []
    for term in checked.edit_concepts(graph):  # target first, then the descendants in causal order
        if term.is_target:
            changed.append(ConceptChange(term.concept_name, checked.original_value, checked.new_value))
        else:
            change = changes[term.concept_id]
            changed.append(ConceptChange(term.concept_name, change.original_value, change.new_value))
    staying = [graph.concept(cid) for cid in graph.non_descendants(checked.target_concept_id)]
    kept = tuple(KeptConcept(c.name, c.current_value) for c in staying[:max_kept])
    named = {_folded(v) for c in changed for v in (c.new_value, c.original_value)} | {_folded(k.value) for k in kept}
    forbidden = tuple(dict.fromkeys(v.new_value for v in checked.violations
                                    if v.new_value.strip() and _folded(v.new_value) not in named))
    text = _WRITERS[style](changed, kept)
    return EditInstruction(checked.id, style, text, tuple(changed), kept, len(staying) - len(kept), forbidden)


def edit_instructions(graph: CausalGraph, interventions: Sequence[Intervention], style: str = "generic", *,
                      max_kept: int = DEFAULT_MAX_KEPT) -> list[EditInstruction]:
    """``edit_instruction`` for each of a batch of interventions on one graph, in their order."""
    if not interventions:
        raise InputError("There are no interventions to write instructions for; give at least one.")
    return [edit_instruction(graph, i, style, max_kept=max_kept) for i in interventions]


# -- the optional VLM rewrite -------------------------------------------------------------------------------

def _folded(text: str) -> str:
    return " ".join(text.lower().split())


def _names(text: str, phrase: str) -> bool:
    """Whether ``text`` contains ``phrase`` as whole words, ignoring case and spacing ("red" is not "reduced")."""
    words = [re.escape(word) for word in phrase.split()]
    return re.search(r"(?<!\w)" + r"\s+".join(words) + r"(?!\w)", text, flags=re.IGNORECASE) is not None


def missing_facts(instruction: EditInstruction, text: str) -> list[str]:
    """What ``text`` fails to say of ``instruction``'s facts: each changed concept's new value and each kept
    concept's value it does not name, and each stripped value it names. Empty when ``text`` is faithful."""
    problems = [f'the new value "{c.new_value}" of {c.concept_name}' for c in instruction.changed
                if not _names(text, c.new_value)]
    problems += [f'the kept value "{k.value}" of {k.concept_name}' for k in instruction.kept
                 if not _names(text, k.value)]
    problems += [f'"{value}", which the causal check stripped, must not appear' for value in instruction.forbidden
                 if _names(text, value)]
    return problems


REWRITE = Stage(
    name="edit instruction rewrite",
    system=("You polish edit instructions for an image editing model. Keep every fact of the instruction: each "
            "change with its new value and each thing to keep with its value, in the same words for the values. "
            "Add no new change, no new object and no value of your own. Name each subject directly instead of "
            "using pronouns. Answer with the rewritten instruction only: one paragraph, no quotes, no preamble."),
    temperature=0.2,
    max_tokens=512,
)


def _rewrite_user(instruction: EditInstruction) -> str:
    return (f"Editor: {instruction.style}\n"
            f"Instruction:\n{instruction.text}\n\n"
            f"Changes (concept: old -> new), in causal order:\n{instruction.changed_text()}\n\n"
            f"Must stay as they are (concept: value):\n{instruction.kept_text() or '(none named)'}\n\n"
            "Rewrite the instruction so that it reads naturally for this editor.")


def _accept_rewrite(instruction: EditInstruction, answer: str) -> str:
    text = " ".join(answer.strip().strip('"').split())
    if not text:
        raise VLMOutputError("The rewrite is empty; answer with the rewritten instruction.")
    problems = missing_facts(instruction, text)
    if problems:
        raise VLMOutputError(f"The rewrite lost facts of the instruction: {'; '.join(problems)}. "
                             "Name every new value and every kept value as given, and nothing else.")
    return text


def rewrite_instruction(vlm: VLM, instruction: EditInstruction, image: Image.Image | None = None, *,
                        max_attempts: int = DEFAULT_ATTEMPTS) -> EditInstruction:
    """The instruction as a VLM rewrote it, or the deterministic one with a ``note`` when no rewrite passed.

    A rewrite passes when ``missing_facts`` finds nothing: it names every changed concept's new value and
    every kept value and no stripped one. A rejected rewrite is sent back with the problem, up to
    ``max_attempts`` questions; after that the deterministic text stays and ``note`` says why (and it
    is logged), so the editor never receives an instruction that drops a fact.

    Raises:
        VLMError: the backend itself failed (server down, weights missing); that is not a rewrite to check.
    """
    images = [image] if image is not None else []
    try:
        text = ask_until_valid(vlm, REWRITE, _rewrite_user(instruction), images,
                               lambda answer: _accept_rewrite(instruction, answer), max_attempts=max_attempts)
    except VLMOutputError as exc:
        note = (f"The VLM rewrite of {instruction.intervention_id} was not used: {exc.problem} "
                "The deterministic instruction is used instead.")
        log.warning("%s", note)
        return replace(instruction, note=note)
    return replace(instruction, text=text)
