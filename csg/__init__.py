"""FM-CGM with Causal Semantic Guidance: the host-agnostic core.

The counterfactual path reads as the paper does: extract (``csg.vlm``) -> manipulate
(``csg.graph`` + ``csg.vlm``) -> invert (abduction) -> guide (action) -> sample (prediction).
"""

__version__ = "0.1.0"
