"""Typed errors. Every message names the problem and the fix, so a user can act on it, and stays short:
user text in a message is shortened with ``quote`` and lists of ids with ``some``."""

QUOTE_LIMIT = 600  # characters of user or model text shown in an error message
NAME_LIMIT = 60  # characters of one id or name shown in an error message
NAMED_IDS = 8  # ids an error message names before it only counts the rest


class CSGError(Exception):
    """Base class for every error this pack raises on purpose."""


class GraphError(CSGError, ValueError):
    """A causal graph or intervention is malformed."""


class VLMError(CSGError):
    """A vision-language model backend failed or answered unusably."""


class OutputError(CSGError):
    """A file or folder could not be written (a full disk, a read-only or vanished folder), or another process
    holds the output folder (``csg.output``)."""


class InputError(CSGError, ValueError):
    """An image, prompt or parameter cannot be used as given."""


class WeightsMissingError(CSGError, FileNotFoundError):
    """Model weights are not where we looked for them."""


class WeightsError(InputError):
    """Model weights or their configs are there but cannot be used: corrupt, cut off, pickled, or of a
    model the pack does not run."""


def quote(text: str, limit: int = QUOTE_LIMIT) -> str:
    """Text shortened for an error message: its head and tail around an ellipsis, each in quotes."""
    text = text if isinstance(text, str) else repr(text)
    if len(text) <= limit:
        return repr(text)
    half = limit // 2
    return repr(text[:half]) + f" ... ({len(text) - 2 * half} characters left out) ... " + repr(text[-half:])


def brief(name: str) -> str:
    """One id or name for an error message: as it is when short, else quoted and shortened."""
    return name if len(name) <= NAME_LIMIT else quote(name, NAME_LIMIT)


def some(names: list[str]) -> str:
    """The first few of ``names`` for an error message (each shortened), and how many there are in all."""
    shown = ", ".join(brief(name) for name in names[:NAMED_IDS])
    return shown if len(names) <= NAMED_IDS else f"{shown} and {len(names) - NAMED_IDS:,} more ({len(names):,} in all)"
