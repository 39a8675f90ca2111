"""Evaluation during training: fixed draws, so the same model scores the same data the same way."""

from __future__ import annotations

import math

from dgemma_mlx import load
from dgemma_mlx.train import Trainer, TrainingArgs
from dgemma_mlx.train.data import Dataset, Example


def test_evaluate_gives_finite_losses_from_fixed_draws(checkpoint, tmp_path):
    model, tok = load(checkpoint)  # its own copy: the trainer unfreezes it
    rows = ["Hello world, this is a test.", "Another line of text to score here."]
    data = Dataset([Example(list(tok.encode(t)), 1) for t in rows], 0, "rows")
    trainer = Trainer(model, tok, {"train": data}, TrainingArgs(fine_tune_type="full", batch_size=2), tmp_path)
    first, again = trainer.evaluate(data, None), trainer.evaluate(data, None)
    assert first == again
    assert all(math.isfinite(x) for x in first) and first[2] > 0


def test_evaluation_draws_the_reference_draws_whatever_the_training_draws(checkpoint, tmp_path):
    model, tok = load(checkpoint)
    rows = ["Hello world, this is a test.", "Another line of text to score here."]
    data = Dataset([Example(list(tok.encode(t)), 1) for t in rows], 0, "rows")
    scores = [Trainer(model, tok, {"train": data}, TrainingArgs(fine_tune_type="full", batch_size=2, blocks_per_example=k,
                                                                ordered_p=p), tmp_path / f"{k}-{p}").evaluate(data, None)
              for k, p in ((1, 0.0), (3, 0.0), (1, 1.0))]
    assert scores[0] == scores[1] == scores[2]
