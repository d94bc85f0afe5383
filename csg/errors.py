"""Typed errors. Every message names the problem and the fix, so a user can act on it."""


class CSGError(Exception):
    """Base class for every error this pack raises on purpose."""


class GraphError(CSGError, ValueError):
    """A causal graph or intervention is malformed."""


class VLMError(CSGError):
    """A vision-language model backend failed or answered unusably."""


class InputError(CSGError, ValueError):
    """An image, prompt or parameter cannot be used as given."""


class WeightsMissingError(CSGError, FileNotFoundError):
    """Model weights are not where we looked for them."""
