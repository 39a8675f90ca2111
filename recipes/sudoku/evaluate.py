"""Evaluate a Sudoku model on held-out puzzles: exact-solve rate and blank-cell accuracy by number
of givens, against the maximum number of denoising passes.

    python recipes/sudoku/evaluate.py --model /work/runs/sudoku --out sudoku-eval.json

Puzzles have unique solutions and come from their own seed stream (``1000 + givens`` for each
band), never the training grids' seeds (0, 1, 2 in ``prepare.py``); the first N puzzles of a band
are the same whatever N is. Solving is infilling with the givens pinned
(:func:`dgemma_mlx.sudoku.solve_batch`), with the checkpoint's default sampler and ``steps`` set
to each pass limit. Prints a markdown table on stdout, progress on stderr, and writes the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _report import Progress, markdown_table, script, write_json  # noqa: E402

PUZZLE_SEED = 1000  # + givens: the held-out puzzles' seed of each band


def int_list(text: str) -> list[int]:
    """``"4,8,16"`` -> [4, 8, 16] (argparse turns the ValueError of anything else into a usage error)."""
    values = [int(x) for x in text.split(",")]
    if min(values) <= 0:
        raise ValueError(text)
    return values


def held_out(givens: int, n: int, progress: Progress) -> list[tuple[list[int], list[int]]]:
    """The first ``n`` held-out puzzles with ``givens`` givens: ``(puzzle, solution)`` pairs."""
    from dgemma_mlx.sudoku import puzzles

    out = []
    for pair in puzzles(PUZZLE_SEED + givens, givens, n):
        out.append(pair)
        progress.advance()
    return out


def evaluate_band(model, tokenizer, pairs, passes: int, *, batch_size: int, seed: int, progress: Progress) -> dict:
    """Solve ``pairs`` with at most ``passes`` passes; the band's metrics."""
    from dgemma_mlx.generate import default_settings
    from dgemma_mlx.sudoku import solve_batch

    settings = default_settings(model).update(steps=passes)
    solved = cells = blanks = used = early = 0
    start = time.perf_counter()
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i : i + batch_size]
        results = solve_batch(model, tokenizer, [p for p, _ in chunk], settings=settings, seed=seed + i)
        for (puzzle, solution), r in zip(chunk, results):
            solved += r.valid
            free = [j for j in range(81) if puzzle[j] == 0]
            blanks += len(free)
            cells += sum(r.board[j] == solution[j] for j in free)
            used += r.passes
            early += r.passes < passes
        progress.advance(len(chunk), f"{solved}/{min(i + batch_size, len(pairs))} solved")
    n = len(pairs)
    return {
        "passes": passes,
        "puzzles": n,
        "solved": solved,
        "exact_solve_rate": solved / n,
        "cell_accuracy": cells / max(blanks, 1),
        "mean_passes": used / n,
        "stopped_early_rate": early / n,
        "seconds": time.perf_counter() - start,
    }


@script
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", "-m", default="sudoku", help="checkpoint directory or bundled model name")
    p.add_argument("--givens", type=int_list, default=[45, 35, 28], help="bands of givens (default 45,35,28)")
    p.add_argument("--puzzles", type=int, default=1000, help="held-out puzzles per band (default 1000)")
    p.add_argument("--passes", type=int_list, default=[4, 8, 16, 32, 48], help="maximum denoising passes")
    p.add_argument("--batch-size", type=int, default=100, help="puzzles solved at once")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--out", type=Path, help="JSON result file")
    a = p.parse_args()

    from dgemma_mlx import load
    from dgemma_mlx.errors import DGemmaError
    from dgemma_mlx.generate import default_settings
    from dgemma_mlx.sudoku import MIN_GIVENS, check_model

    if a.puzzles <= 0 or a.batch_size <= 0:
        raise DGemmaError("--puzzles and --batch-size must be at least 1")
    for g in a.givens:
        if not MIN_GIVENS <= g <= 80:
            raise DGemmaError(f"--givens must be between {MIN_GIVENS} and 80 (got {g})")
    model, tokenizer = load(a.model)
    check_model(model)
    bands = {}
    gen = Progress("puzzles", a.puzzles * len(a.givens))
    for g in a.givens:
        bands[g] = held_out(g, a.puzzles, gen)
    solve = Progress("solving", a.puzzles * len(a.givens) * len(a.passes))
    rows = []
    for g, pairs in bands.items():
        for n in a.passes:
            rows.append({"givens": g, **evaluate_band(model, tokenizer, pairs, n, batch_size=a.batch_size,
                                                     seed=a.seed, progress=solve)})
    result = {
        "model": str(a.model),
        "iteration": training_iteration(Path(a.model)),
        "puzzle_seed": f"{PUZZLE_SEED} + givens",
        "sampling_seed": a.seed,
        "settings": {k: v for k, v in default_settings(model).to_dict().items() if k not in ("steps", "seed")},
        "results": rows,
    }
    if a.out:
        write_json(a.out, result)
    print(markdown_table(
        ["givens", "max passes", "exact solve", "blank-cell accuracy", "mean passes", "stopped early"],
        [[r["givens"], r["passes"], f"{r['exact_solve_rate']:.1%}", f"{r['cell_accuracy']:.1%}",
          f"{r['mean_passes']:.1f}", f"{r['stopped_early_rate']:.0%}"] for r in rows],
    ))


def training_iteration(path: Path):
    """The training iteration of a checkpoint (its directory or a resumable ``checkpoint/result``
    inside a training output), when recorded."""
    import json

    for f in (path / "training_log.json", path.parent / "trainer_state.json", path / "checkpoint" / "trainer_state.json"):
        if f.is_file():
            try:
                data = json.loads(f.read_text())
                return data.get("iterations", data.get("iteration"))
            except (OSError, ValueError):
                return None
    return None


if __name__ == "__main__":
    main()
