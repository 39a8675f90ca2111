"""The measuring side of ``bench.py``: one subprocess per implementation (and one for the machine).

``python benchmarks/workers.py TASK.json OUT.json`` loads one implementation, runs the phases the task
asks for and rewrites OUT.json after each phase (so a crash or a timeout keeps what was measured).
Progress goes to stderr as ``[impl] ...`` lines.

Every implementation is driven through the same small adapter (:class:`engines.Impl`): load, a fresh prefix
cache, ``encode`` (timed: prefill and commits), ``extend`` (untimed set-up: growing the prefix),
``prepare`` (per-canvas set-up that the implementation's own generate loop does once per block, such as
masks), ``step`` (one denoising pass with self-conditioning, evaluated) and ``generate`` (its own
end-to-end loop). :class:`runner.Runner` runs the phases; :func:`probe.machine` measures GEMM rates.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from probe import machine
from runner import Runner


def main(argv: list[str]) -> int:
    task = json.loads(Path(argv[0]).read_text())
    out = Path(argv[1])
    if task.get("impl") == "machine":
        return machine(task, out)
    return Runner(task, out).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
