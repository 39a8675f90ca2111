"""The models shipped inside the package (``dgemma_mlx/models/``, trained by ``recipes/``): they
load by name, generate and infill deterministically per seed, and show the sampler's real
behaviour end to end (blocks stopped by the adaptive rule before the pass limit, more than one
token per pass); ``dgemma sudoku`` solves with the bundled solver and rejects bad puzzles.

Tests of a model skip, saying so, when that model is not in the package (a checkout before the
trained models were copied in)."""

from __future__ import annotations

import random

import pytest

from dgemma_mlx import sudoku as sd
from dgemma_mlx.bundled import MODELS_DIR, bundled_path
from dgemma_mlx.events import CommitEvent, EndEvent, PassEvent
from test_cli import dgemma, one_line_error

FUNCTION = "def add(a, b):\n    return <|fill:4|>\n\n\ndef sub(a, b):\n    return a - b\n"
HARD = "800000000003600000070090200050007000000045700000100030001000068008500010090000400"  # 21 givens


def bundled(name: str):
    if bundled_path(name) is None:
        pytest.skip(f"the bundled model '{name}' is not in {MODELS_DIR / name} (recipes/ trains it)")
    from dgemma_mlx import load

    return load(name)


@pytest.fixture(scope="module")
def pycode():
    return bundled("pycode")


@pytest.fixture(scope="module")
def solver():
    return bundled("sudoku")


@pytest.fixture(scope="module")
def easy():
    """A puzzle with 60 givens and a unique solution, and that solution."""
    return sd.make_puzzle(random.Random(4), 60)


def events(gen):
    out = {"pass": [], "commit": [], "end": None}
    for e in gen:
        if isinstance(e, PassEvent):
            out["pass"].append(e)
        elif isinstance(e, CommitEvent):
            out["commit"].append(e)
        elif isinstance(e, EndEvent):
            out["end"] = e
    return out


def test_bundled_models_load_by_name(pycode, solver):
    assert pycode[0].args.canvas_length == 64
    sd.check_model(solver[0])


def test_pycode_generation_is_deterministic_per_seed(pycode):
    from dgemma_mlx.generate import generate

    model, tok = pycode
    runs = [generate(model, tok, "def parse_args(argv):\n", seed=s, max_new_tokens=64).tokens for s in (3, 3)]
    assert runs[0] == runs[1] and len(runs[0]) > 0


def test_pycode_infill_is_deterministic_per_seed_and_keeps_the_text_around_the_hole(pycode):
    from dgemma_mlx.infill import infill

    model, tok = pycode
    first, again = (infill(model, tok, FUNCTION, seed=5) for _ in range(2))
    assert first.text == again.text and first.fills == again.fills
    assert first.text.startswith("def add(a, b):\n    return ")
    assert first.text.endswith("\n\n\ndef sub(a, b):\n    return a - b\n")


def test_pycode_adaptive_stop_ends_blocks_early_with_several_tokens_per_pass(pycode):
    from dgemma_mlx.generate import stream_generate

    model, tok = pycode
    prompt = 'def mean(xs):\n    """Return the arithmetic mean of xs."""\n'  # a header and docstring, as evaluate.py's
    runs = [events(stream_generate(model, tok, prompt, seed=seed, max_new_tokens=128))
            for seed in range(4)]
    limit = runs[0]["pass"][0].max_steps
    commits = [c for run in runs for c in run["commit"]]
    early = [c for c in commits if c.steps < limit]
    assert len(early) >= len(commits) // 2, [c.steps for c in commits]  # the evaluation's rate is 9 in 10
    assert all(any(p.stopped for p in run["pass"]) for run in runs if any(c.steps < limit for c in run["commit"]))
    assert all((len(c.tokens) + c.eos) / c.steps > 1 for c in early), [(len(c.tokens), c.steps) for c in early]
    assert all(run["end"].stats.tokens_per_forward > 1 for run in runs)


def test_sudoku_solver_solves_an_easy_puzzle_in_fewer_passes_than_cells(solver, easy):
    model, tok = solver
    puzzle, solution = easy
    run = events(sd.stream_solve(model, tok, puzzle, seed=0))
    assert sd.decode(run["end"].tokens) == solution
    blanks = puzzle.count(0)
    assert run["end"].stats.steps < run["pass"][0].max_steps
    assert blanks / run["end"].stats.steps > 1  # more than one cell settled per pass
    for p in run["pass"]:  # the givens never move
        assert all(sd.token_digit(t, i) == d for i, (t, d) in enumerate(zip(p.canvas, puzzle)) if d)


def test_sudoku_solver_solves_held_out_45_given_puzzles_with_the_default_sampler(solver):
    from dgemma_mlx.generate import default_settings

    model, tok = solver
    pairs = list(sd.puzzles(1045, 45, 20))  # the recipe's held-out band (evaluate.py: seed 1000 + givens)
    results = sd.solve_batch(model, tok, [p for p, _ in pairs], settings=default_settings(model), seed=0)
    assert sum(r.valid and r.board == s for r, (_, s) in zip(results, pairs)) >= 17  # recipe: ~95%
    assert all(r.passes < 48 for r in results)  # the adaptive stop ends every one early


def test_dgemma_sudoku_prints_the_solved_board_and_exits_0(solver, easy):
    puzzle, solution = easy
    r = dgemma("sudoku", "".join(map(str, puzzle)), "--seed", "0")
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == sd.format_board(solution).splitlines()
    assert "solved" in r.stderr


def test_dgemma_sudoku_exits_3_when_the_board_is_not_a_solution(solver):
    r = dgemma("sudoku", HARD, "--steps", "1", "--seed", "0")
    assert r.returncode == 3, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 9 and all(len(l) == 9 and l.isdigit() for l in lines)
    assert "NOT a valid solution in 1 pass (" in r.stderr


@pytest.mark.parametrize(
    "puzzle, words",
    [
        (HARD[:80], ("81 cells", "80")),
        (HARD[:80] + "x", ("only digits", "'x'")),
        ("55" + "0" * 79, ("contradict", "5 appears twice in row 1")),
    ],
)
def test_dgemma_sudoku_rejects_bad_puzzles_with_one_line(puzzle, words):
    one_line_error(dgemma("sudoku", puzzle), *words)


@pytest.mark.parametrize(
    "args, words",
    [
        (("--random", "--givens", "17"), ("--givens must be between 22 and 81", "17")),
        ((HARD, "--givens", "45"), ("--givens is for --random",)),
        ((HARD, "--random"), ("not both",)),
    ],
)
def test_dgemma_sudoku_rejects_bad_options_with_one_line(args, words):
    one_line_error(dgemma("sudoku", *args), *words)
