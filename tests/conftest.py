"""Shared fixtures: tiny random DiffusionGemma checkpoints built with transformers (no network)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def reference(tmp_path_factory):
    """``(torch_model, checkpoint_dir)``: a tiny float32 reference saved in the released config form."""
    return tiny.build_reference(tmp_path_factory.mktemp("ref") / "checkpoint", seed=0)


@pytest.fixture(scope="session")
def reference_model(reference):
    return reference[0]


@pytest.fixture(scope="session")
def checkpoint(reference) -> Path:
    return reference[1]


@pytest.fixture(scope="session")
def loaded(checkpoint):
    """``(model, tokenizer)`` loaded from the tiny original checkpoint."""
    from dgemma_mlx import load

    return load(checkpoint)


@pytest.fixture(scope="session")
def model(loaded):
    return loaded[0]


@pytest.fixture(scope="session")
def tokenizer(loaded):
    return loaded[1]


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """The tiny Gemma-style tokenizer alone (mlx-lm's TokenizerWrapper), without a model."""
    from mlx_lm.tokenizer_utils import load

    path = tmp_path_factory.mktemp("tokenizer")
    tiny.write_tokenizer(path)
    return load(path, eos_token_ids=tiny.EOS_IDS)
