"""The command-line layer: ``csg-counterfactual`` (``counterfactual``) and ``csg-evaluate`` (``evaluate``), with
the flags, exit codes and model construction they share (``options``). Nothing below this package imports it."""
