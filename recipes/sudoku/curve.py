"""The learning curve of a training run: validation loss by iteration (with the training loss
reported at the same iteration), from the run's JSON Lines log or a checkpoint's recorded history.

    python recipes/sudoku/curve.py /work/runs/sudoku.log
    python recipes/sudoku/curve.py /work/runs/sudoku/training_log.json --out curve.json

Accepts a JSON Lines log (one ``dgemma_mlx.train.Report`` dict per line, as the recipe's training
run writes them), a finished run's ``training_log.json`` or a resumable checkpoint's
``trainer_state.json`` (or the directory holding either). Any training log works, the code
recipe's too. Prints a markdown table; ``--out`` writes the curve as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import markdown_table, script, write_json  # noqa: E402

HISTORY_FILES = ("training_log.json", "checkpoint/trainer_state.json", "trainer_state.json")


def read_reports(path: Path) -> list[dict]:
    """The reports of a log file, a training_log.json / trainer_state.json, or a directory."""
    from dgemma_mlx.errors import DGemmaError

    if path.is_dir():
        found = next((path / f for f in HISTORY_FILES if (path / f).is_file()), None)
        if found is None:
            raise DGemmaError(f"{path}: no training_log.json or trainer_state.json in it")
        path = found
    try:
        text = path.read_text()
    except OSError as e:
        raise DGemmaError(f"cannot read '{path}': {e.strerror}")
    try:
        whole = json.loads(text)
    except ValueError:
        whole = None
    if isinstance(whole, dict):
        if not isinstance(whole.get("history"), list):
            raise DGemmaError(f"{path}: a JSON file without a 'history' list of reports")
        return whole["history"]
    reports = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DGemmaError(f"{path}:{n}: not a JSON line")
        if isinstance(row, dict) and "kind" in row:
            reports.append(row)
    return reports


def curve(reports: list[dict]) -> list[dict]:
    """One point per validation report, in iteration order: ``iteration``, ``val_loss`` (and its
    diffusion / encoder parts), ``train_loss`` (the training report at that iteration, if any),
    ``hours`` since the first report (when the log carries times). A resumed run that repeated
    iterations keeps the last report of each."""
    train = {r["iteration"]: r for r in reports if r.get("kind") == "train"}
    times = [r["time"] for r in reports if "time" in r]
    t0 = min(times) if times else None
    points = {}
    for r in reports:
        if r.get("kind") != "val":
            continue
        t = train.get(r["iteration"], {})
        points[r["iteration"]] = {
            "iteration": r["iteration"],
            "val_loss": r["loss"],
            "val_diffusion_loss": r.get("diffusion_loss"),
            "val_encoder_loss": r.get("encoder_loss"),
            "train_loss": t.get("loss"),
            "hours": (r["time"] - t0) / 3600 if t0 is not None and "time" in r else None,
        }
    return [points[k] for k in sorted(points)]


@script
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", type=Path, help="JSON Lines log, training_log.json, trainer_state.json or a run directory")
    p.add_argument("--out", type=Path, help="write the curve as JSON")
    a = p.parse_args()
    from dgemma_mlx.errors import DGemmaError

    points = curve(read_reports(a.log))
    if not points:
        raise DGemmaError(f"{a.log}: no validation reports yet")
    if a.out:
        write_json(a.out, {"log": str(a.log), "curve": points})
    fmt = lambda v, spec: "" if v is None else format(v, spec)  # noqa: E731
    print(markdown_table(
        ["iteration", "validation loss", "training loss", "hours"],
        [[q["iteration"], fmt(q["val_loss"], ".4f"), fmt(q["train_loss"], ".4f"), fmt(q["hours"], ".2f")] for q in points],
    ))


if __name__ == "__main__":
    main()
