"""Sudoku as plain text, for a LoRA on the real DiffusionGemma (whose vocabulary has no cell
tokens): ``{"prompt": ..., "completion": ...}`` rows, the puzzle as nine lines of digits (0 for
blanks) and the solution as nine lines of digits.

    python recipes/sudoku/prepare_text.py --out recipes/sudoku/work/text --train 20000

Puzzles have unique solutions, 25 to 50 givens, and come from the training seeds' streams of
``prepare.py`` (0 train, 1 valid, 2 test), never from the evaluation's (``1000 + givens``).
With an instruction-tuned checkpoint ``dgemma train`` renders each prompt through the chat template.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dgemma_mlx import sudoku

PROMPT = "Solve this Sudoku (0 marks a blank). Reply with the solved grid only, nine lines of nine digits.\n\n{board}"


def row(rng: random.Random) -> dict:
    puzzle, solution = sudoku.make_puzzle(rng, rng.randint(25, 50))
    return {"prompt": PROMPT.format(board=sudoku.format_board(puzzle)), "completion": sudoku.format_board(solution)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "work" / "text")
    p.add_argument("--train", type=int, default=20_000)
    p.add_argument("--valid", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    a.out.mkdir(parents=True, exist_ok=True)
    for split, offset, n in (("train", 0, a.train), ("valid", 1, a.valid), ("test", 2, a.valid)):
        rng = random.Random(a.seed + offset)
        with open(a.out / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                f.write(json.dumps(row(rng)) + "\n")
    print(f"wrote {a.train} training puzzles to {a.out}")


if __name__ == "__main__":
    main()
