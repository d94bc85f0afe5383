"""Step progress with an ETA for the CLI, without touching the samplers.

Every inversion, CSG edit and baseline sampling step makes exactly one ``predict_noise`` call, so a
host wrapper that counts those calls knows the step. ``StepProgress(host, phases)`` is a
``DiffusionHost`` that forwards everything to ``host`` and reports each phase of ``phases``
((name, number of steps), in the order they run) as it goes: on a terminal one updating line, in
a log a line at every tenth of the phase.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from typing import Any


class StepProgress:
    def __init__(self, host: Any, phases: Sequence[tuple[str, int]], prefix: str = "csg-counterfactual"):
        self._host, self._phases, self._prefix = host, list(phases), prefix
        self._phase, self._step, self._started = 0, 0, time.monotonic()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._host, name)

    def predict_noise(self, *args: Any, **kwargs: Any):
        out = self._host.predict_noise(*args, **kwargs)
        if self._phase < len(self._phases):
            self._advance()
        return out

    def _advance(self) -> None:
        name, total = self._phases[self._phase]
        self._step += 1
        elapsed = time.monotonic() - self._started
        eta = elapsed / self._step * (total - self._step)
        tty = sys.stderr.isatty()
        if tty or self._step == total or self._step % max(1, total // 10) == 0:
            line = f"{self._prefix}: {name}: step {self._step}/{total}, {elapsed:.1f}s, ETA {eta:.1f}s"
            print(("\r" + line) if tty else line, end="\n" if not tty or self._step == total else "",
                  file=sys.stderr, flush=True)
        if self._step == total:
            self._phase, self._step, self._started = self._phase + 1, 0, time.monotonic()
