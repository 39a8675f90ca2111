"""Sudoku as infilling: boards, a seeded puzzle generator, the solver's token layout, and solving
with the givens pinned.

A board is 81 ints in row-major order, 0 for a blank. The Sudoku models read a canvas of 81 tokens
whose ids encode the cell and the digit (``cell_token``): the geometry (row, column, box) is then in
each token's embedding, which a small model learns far faster than from 1-D positions alone. The
prompt is BOS only; solving denoises the canvas with the givens pinned.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

from .errors import DGemmaError

FIRST_CELL_TOKEN = 4  # after <pad> <eos> <bos> <unk>
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]
VOCAB_SIZE = 736  # 4 specials + 81 * 9 cell tokens, padded to a multiple of 32

ROWS = [[r * 9 + c for c in range(9)] for r in range(9)]
COLS = [[r * 9 + c for r in range(9)] for c in range(9)]
BOXES = [[(br * 3 + r) * 9 + bc * 3 + c for r in range(3) for c in range(3)] for br in range(3) for bc in range(3)]
UNITS = ROWS + COLS + BOXES
PEERS = [sorted({p for u in UNITS if i in u for p in u} - {i}) for i in range(81)]


# ------------------------------------------------------------------------------------- boards
def parse_board(text: str) -> list[int]:
    """81 characters, digits with ``0`` or ``.`` for blanks (whitespace and ``|-+`` ignored)."""
    chars = [ch for ch in text if not ch.isspace() and ch not in "|-+"]
    bad = [ch for ch in chars if ch not in "0123456789."]
    if bad:
        raise DGemmaError(f"a puzzle holds only digits and '.' for blanks (found {bad[0]!r})")
    if len(chars) != 81:
        raise DGemmaError(f"a puzzle has 81 cells (got {len(chars)})")
    board = [0 if ch == "." else int(ch) for ch in chars]
    conflict = first_conflict(board)
    if conflict:
        raise DGemmaError(f"the givens contradict each other: {conflict}")
    return board


def format_board(board: Sequence[int]) -> str:
    """Nine lines of nine digits (0 for blanks)."""
    return "\n".join("".join(str(d) for d in board[r * 9 : r * 9 + 9]) for r in range(9))


def _unit_name(unit: int) -> str:
    kind, n = divmod(unit, 9)
    return f"{('row', 'column', 'box')[kind]} {n + 1}"


def first_conflict(board: Sequence[int]) -> Optional[str]:
    """A description of the first unit holding a digit twice, or None."""
    for u, cells in enumerate(UNITS):
        seen = set()
        for i in cells:
            d = board[i]
            if d and d in seen:
                return f"{d} appears twice in {_unit_name(u)}"
            seen.add(d)
    return None


def is_solution(board: Sequence[int], puzzle: Optional[Sequence[int]] = None) -> bool:
    """Every unit holds 1..9 once (and the puzzle's givens are kept)."""
    if len(board) != 81 or any(not 1 <= d <= 9 for d in board):
        return False
    if any(sorted(board[i] for i in u) != list(range(1, 10)) for u in UNITS):
        return False
    return puzzle is None or all(p == 0 or p == b for p, b in zip(puzzle, board))


# ---------------------------------------------------------------------------------- generator
def _candidates(board: list[int], i: int) -> list[int]:
    used = {board[p] for p in PEERS[i]}
    return [d for d in range(1, 10) if d not in used]


def count_solutions(board: Sequence[int], limit: int = 2) -> int:
    """Number of solutions of ``board``, counting up to ``limit`` (most-constrained cell first)."""
    b = list(board)

    def search() -> int:
        best, best_c = -1, None
        for i in range(81):
            if b[i] == 0:
                c = _candidates(b, i)
                if not c:
                    return 0
                if best_c is None or len(c) < len(best_c):
                    best, best_c = i, c
                    if len(c) == 1:
                        break
        if best < 0:
            return 1
        total = 0
        for d in best_c:
            b[best] = d
            total += search()
            if total >= limit:
                break
        b[best] = 0
        return total

    return search()


def random_grid(rng: random.Random) -> list[int]:
    """A random complete grid (randomised backtracking)."""
    b = [0] * 81

    def fill(i: int) -> bool:
        if i == 81:
            return True
        digits = _candidates(b, i)
        rng.shuffle(digits)
        for d in digits:
            b[i] = d
            if fill(i + 1):
                return True
        b[i] = 0
        return False

    fill(0)
    return b


MIN_GIVENS = 22
"""The fewest givens :func:`make_puzzle` offers. Removing cells in random order while the solution
stays unique ends at 21-27 givens (measured over 378 grids: 21 once, 22 in 1 of 27, 23-25 in 81%),
so fewer than 22 would mean waiting on luck (true Sudoku minima go down to 17)."""

MAX_TRIES = 1000
"""Grids :func:`make_puzzle` tries before giving up (at 22 givens it needs ~27 on average)."""


def make_puzzle(rng: random.Random, givens: int, solution: Optional[list[int]] = None) -> tuple[list[int], list[int]]:
    """``(puzzle, solution)`` with exactly ``givens`` givens and a unique solution. Cells are removed
    in random order while the solution stays unique; a dead end starts over on a new grid, at most
    :data:`MAX_TRIES` grids."""
    if not MIN_GIVENS <= givens <= 81:
        raise DGemmaError(f"--givens must be between {MIN_GIVENS} and 81 (got {givens})")
    for _ in range(MAX_TRIES):
        grid = solution or random_grid(rng)
        puzzle = list(grid)
        order = list(range(81))
        rng.shuffle(order)
        filled = 81
        for i in order:
            if filled == givens:
                break
            d, puzzle[i] = puzzle[i], 0
            if count_solutions(puzzle) == 1:
                filled -= 1
            else:
                puzzle[i] = d
        if filled == givens:
            return puzzle, grid
        solution = None
    raise DGemmaError(f"no puzzle with {givens} givens in {MAX_TRIES} random grids; try a few more givens")


def puzzles(seed: int, givens: int, n: int) -> Iterator[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    for _ in range(n):
        yield make_puzzle(rng, givens)


# ----------------------------------------------------------------------------- token layout
def cell_token(cell: int, digit: int) -> int:
    return FIRST_CELL_TOKEN + cell * 9 + digit - 1


def token_digit(token: int, cell: int) -> int:
    """The digit a token puts in ``cell`` (0 when it is not one of that cell's tokens)."""
    t = token - FIRST_CELL_TOKEN - cell * 9
    return t + 1 if 0 <= t < 9 else 0


def token_text(cell: int, digit: int) -> str:
    return f"<r{cell // 9 + 1}c{cell % 9 + 1}:{digit}>"


def board_text(board: Sequence[int]) -> str:
    """A complete board as the cell tokens' text (the training data's ``text``)."""
    return "".join(token_text(i, d) for i, d in enumerate(board))


def vocabulary() -> dict[str, int]:
    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for cell in range(81):
        for d in range(1, 10):
            vocab[token_text(cell, d)] = cell_token(cell, d)
    for i in range(len(vocab), VOCAB_SIZE):
        vocab[f"<unused{i}>"] = i
    return vocab


def pins(board: Sequence[int]) -> list[Optional[int]]:
    """Canvas pins for a puzzle: the given's token, None for blanks."""
    return [cell_token(i, d) if d else None for i, d in enumerate(board)]


def decode(tokens: Sequence[int]) -> list[int]:
    return [token_digit(t, i) for i, t in enumerate(tokens[:81])]


def check_model(model) -> None:
    if model.args.canvas_length != 81 or model.args.vocab_size < FIRST_CELL_TOKEN + 729:
        raise DGemmaError("this model is not a Sudoku model (it needs an 81-token canvas of cell tokens; try --model sudoku)")


def stream_solve(model, tokenizer, board: Sequence[int], **overrides):
    """Events of solving ``board`` (:func:`~dgemma_mlx.generate.stream_generate` with the givens
    pinned after a BOS-only prompt); the final event's ``tokens`` decode with :func:`decode`."""
    from .generate import stream_generate

    check_model(model)
    overrides.setdefault("max_new_tokens", 81)
    return stream_generate(model, tokenizer, [tokenizer.bos_token_id], pinned=pins(board), stop_at_eos=False, **overrides)


@dataclass
class Solve:
    board: list[int]
    valid: bool
    passes: int


def solve_batch(model, tokenizer, boards: Sequence[Sequence[int]], *, settings, seed: int = 0) -> list[Solve]:
    """Solve many puzzles at once (one batch of canvases after one shared BOS); each row draws
    what a one-puzzle run with its own key would."""
    import mlx.core as mx

    from .refine import initial_canvas, refine

    check_model(model)
    cache = model.make_cache()
    model.encode(mx.array([[tokenizer.bos_token_id]]), cache)
    B = len(boards)
    pinned = mx.array([[t if t is not None else -1 for t in pins(b)] for b in boards], dtype=mx.int32)
    key = mx.random.split(mx.random.key(seed), B)
    init_keys = mx.random.split(mx.random.key(seed + 1), B)
    canvas = mx.concatenate(
        [initial_canvas((1, 81), model.args.vocab_size, init_keys[i], pinned=pinned[i : i + 1]) for i in range(B)]
    )
    last = refine(model, cache, canvas, settings=settings, key=key, pinned=pinned)
    argmax = last.argmax.tolist()
    out = []
    for b, row, n in zip(boards, argmax, last.passes.tolist()):
        solved = decode(row)
        out.append(Solve(solved, is_solution(solved, b), int(n)))
    return out
