"""Sudoku as infilling: boards, the seeded generator, the cell-token layout, pinned solving."""

from __future__ import annotations

import json
import random

import pytest

from dgemma_mlx import sudoku as sd
from dgemma_mlx.errors import DGemmaError

SOLVED = (
    "534678912672195348198342567859761423426853791713924856961537284287419635345286179"
)


def test_parse_board_accepts_dots_zeros_and_layout_characters():
    text = "\n".join(SOLVED[i : i + 9] for i in range(0, 81, 9)).replace("5", ".", 1)
    board = sd.parse_board(text.replace("\n", " | ", 2))
    assert board[0] == 0 and board[1:] == [int(c) for c in SOLVED[1:]]


@pytest.mark.parametrize(
    "text, message",
    [
        (SOLVED[:80], "has 81 cells"),
        (SOLVED[:80] + "x", "only digits"),
        ("55" + "0" * 79, "5 appears twice in row 1"),
        ("5" + "0" * 8 + "5" + "0" * 71, "5 appears twice in column 1"),
        ("5" + "0" * 9 + "5" + "0" * 70, "5 appears twice in box 1"),
    ],
)
def test_parse_board_rejects_bad_puzzles_with_one_line(text, message):
    with pytest.raises(DGemmaError, match=message):
        sd.parse_board(text)


def test_is_solution_checks_units_and_givens():
    board = [int(c) for c in SOLVED]
    assert sd.is_solution(board)
    puzzle = [d if i % 2 else 0 for i, d in enumerate(board)]
    assert sd.is_solution(board, puzzle)
    swapped = board[:]
    swapped[0], swapped[1] = swapped[1], swapped[0]
    assert not sd.is_solution(swapped)
    other = puzzle[:]
    other[1] = 1 if other[1] != 1 else 2
    assert not sd.is_solution(board, other)


def test_random_grids_are_solutions_and_seeded():
    a = [sd.random_grid(random.Random(7)) for _ in range(3)]
    b = [sd.random_grid(random.Random(7)) for _ in range(3)]
    assert a == b
    assert all(sd.is_solution(g) for g in a)


@pytest.mark.parametrize("givens", [45, 30])
def test_make_puzzle_has_the_givens_and_a_unique_solution(givens):
    puzzle, solution = sd.make_puzzle(random.Random(givens), givens)
    assert sum(1 for d in puzzle if d) == givens
    assert sd.count_solutions(puzzle) == 1
    assert sd.is_solution(solution, puzzle)


def test_make_puzzle_reaches_its_fewest_givens_and_refuses_fewer():
    puzzle, _ = sd.make_puzzle(random.Random(0), sd.MIN_GIVENS)
    assert sum(1 for d in puzzle if d) == sd.MIN_GIVENS and sd.count_solutions(puzzle) == 1
    for givens in (sd.MIN_GIVENS - 1, 82):
        with pytest.raises(DGemmaError, match="--givens must be between"):
            sd.make_puzzle(random.Random(0), givens)


def test_make_puzzle_gives_up_after_its_tries_with_a_clear_error(monkeypatch):
    monkeypatch.setattr(sd, "MAX_TRIES", 2)
    monkeypatch.setattr(sd, "count_solutions", lambda puzzle: 2)  # no cell can ever be removed
    with pytest.raises(DGemmaError, match="no puzzle with 40 givens in 2 random grids"):
        sd.make_puzzle(random.Random(0), 40)


def test_count_solutions_sees_several_solutions():
    assert sd.count_solutions([0] * 81) == 2


def test_cell_tokens_round_trip_and_encode_the_cell():
    board = [int(c) for c in SOLVED]
    tokens = [sd.cell_token(i, d) for i, d in enumerate(board)]
    assert sd.decode(tokens) == board
    assert len(set(sd.cell_token(i, d) for i in range(81) for d in range(1, 10))) == 729
    assert max(tokens) < sd.VOCAB_SIZE
    # A token of another cell is not a digit of this one.
    assert sd.token_digit(sd.cell_token(3, 5), 4) == 0


def test_board_text_tokenizes_to_the_cell_tokens(tmp_path):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes" / "sudoku"))
    try:
        import prepare
    finally:
        sys.path.pop(0)
    from mlx_lm.tokenizer_utils import load

    prepare.write_tokenizer(tmp_path)
    tok = load(tmp_path, eos_token_ids=[1])
    board = [int(c) for c in SOLVED]
    assert tok.encode(sd.board_text(board), add_special_tokens=False) == [sd.cell_token(i, d) for i, d in enumerate(board)]


def test_the_recipes_initial_embedding_is_a_sum_of_digit_and_cell_parts():
    import sys
    from pathlib import Path

    import numpy as np

    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes" / "sudoku"))
    try:
        import prepare
    finally:
        sys.path.pop(0)
    E = prepare.factorized_embedding(sd.VOCAB_SIZE, 32, seed=0)
    t = sd.cell_token
    # Digits and cells add: swapping digits between two cells keeps the sum.
    np.testing.assert_allclose(E[t(0, 5)] + E[t(40, 7)], E[t(0, 7)] + E[t(40, 5)], atol=1e-6)
    # Cells in the same row differ only by their column and box parts.
    np.testing.assert_allclose(E[t(0, 3)] - E[t(1, 3)], E[t(0, 8)] - E[t(1, 8)], atol=1e-6)
    assert np.isfinite(E).all() and E.shape == (sd.VOCAB_SIZE, 32)


def test_pins_fix_exactly_the_givens():
    puzzle = [int(c) if i % 3 == 0 else 0 for i, c in enumerate(SOLVED)]
    pins = sd.pins(puzzle)
    assert [p is not None for p in pins] == [d != 0 for d in puzzle]
    assert all(sd.token_digit(p, i) == puzzle[i] for i, p in enumerate(pins) if p is not None)


@pytest.fixture(scope="module")
def sudoku_model(tmp_path_factory):
    """A random model with the Sudoku layout (81-token canvas, cell tokens, BOS-only prompt)."""
    import sys
    from pathlib import Path

    import mlx.core as mx
    from mlx.utils import tree_flatten

    sys.path.insert(0, str(Path(__file__).parents[1] / "recipes" / "sudoku"))
    try:
        import prepare
    finally:
        sys.path.pop(0)
    from dgemma_mlx import load
    from dgemma_mlx.config import ModelArgs
    from dgemma_mlx.model import Model

    path = tmp_path_factory.mktemp("sudoku")
    prepare.write_base(path)
    config = json.loads((path / "config.json").read_text())
    config["text_config"].update(hidden_size=32, intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2,
                                 head_dim=8, global_head_dim=16)
    (path / "config.json").write_text(json.dumps(config))
    mx.random.seed(0)
    m = Model(ModelArgs.from_config(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(m.parameters())))
    return load(path)


def test_solving_keeps_the_givens_in_every_pass(sudoku_model):
    from dgemma_mlx.events import EndEvent, PassEvent

    model, tok = sudoku_model
    puzzle, _ = sd.make_puzzle(random.Random(1), 40)
    events = list(sd.stream_solve(model, tok, puzzle, seed=3, steps=6))
    for e in events:
        if isinstance(e, PassEvent):
            digits = sd.decode(e.canvas)
            assert all(digits[i] == d for i, d in enumerate(puzzle) if d)
    end = events[-1]
    assert isinstance(end, EndEvent) and len(end.tokens) == 81


def test_batch_solving_keeps_givens_and_reports_passes(sudoku_model):
    from dgemma_mlx.generate import GenerationSettings

    model, tok = sudoku_model
    puzzles = [sd.make_puzzle(random.Random(s), 45)[0] for s in range(3)]
    solves = sd.solve_batch(model, tok, puzzles, settings=GenerationSettings(steps=4), seed=0)
    assert len(solves) == 3
    for puzzle, s in zip(puzzles, solves):
        assert all(s.board[i] == d for i, d in enumerate(puzzle) if d)
        assert 1 <= s.passes <= 4
        assert s.valid == sd.is_solution(s.board, puzzle)


def test_a_model_of_another_layout_is_refused(model, tokenizer):
    with pytest.raises(DGemmaError, match="not a Sudoku model"):
        sd.check_model(model)
