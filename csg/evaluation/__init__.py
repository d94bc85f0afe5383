"""Evaluation on whole datasets (the paper's Table 1): datasets and sampling, the crash-safe
results file, the runner. The command is ``csg-evaluate`` (``csg.evaluate``); the table and
the HTML report come from ``csg.report``."""
