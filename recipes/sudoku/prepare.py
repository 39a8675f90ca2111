"""Make the Sudoku recipe's data and base model directory (config, tokenizer), from a seed.

    python recipes/sudoku/prepare.py --out recipes/sudoku/work --train 200000

writes ``OUT/data/{train,valid,test}.jsonl`` (``{"text": ...}`` rows: complete grids as cell tokens;
the model learns to complete any subset of revealed cells, and solving pins the givens) and
``OUT/base/`` (``config.json``, ``generation_config.json``, a word-level tokenizer of the 729 cell
tokens) for ``dgemma train --from-scratch``. Held-out evaluation puzzles (unique solutions, by
number of givens) come from ``evaluate.py``'s own seed and never overlap the training grids'
seed stream.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from dgemma_mlx import sudoku
from dgemma_mlx.config import small_model_config
from dgemma_mlx.settings import REFERENCE_GENERATION_CONFIG

# The model: DiffusionGemma's architecture, small. Measured on 2 CPU cores (see README.md).
TEXT_SHAPE = dict(  # the rest of the config: dgemma_mlx.config.small_model_config
    vocab_size=sudoku.VOCAB_SIZE,
    hidden_size=128,
    intermediate_size=256,
    moe_intermediate_size=64,
    num_hidden_layers=6,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=32,
    global_head_dim=64,
    num_global_key_value_heads=1,
    sliding_window=128,
    num_experts=4,
    top_k_experts=2,
    max_position_embeddings=256,
)
GENERATION_CONFIG = {
    **REFERENCE_GENERATION_CONFIG,  # the reference sampler
    "max_new_tokens": 81,
    "bos_token_id": 2,
    "eos_token_id": [1],
    "pad_token_id": 0,
}


def write_tokenizer(path: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = sudoku.vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in sudoku.SPECIALS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in vocab if t.startswith("<r")])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.save_pretrained(str(path))


def write_base(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    config = small_model_config(81, **TEXT_SHAPE)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2))
    write_tokenizer(path)


def write_grids(path: Path, seed: int, n: int) -> None:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": sudoku.board_text(sudoku.random_grid(rng))}) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "work")
    p.add_argument("--train", type=int, default=200_000, help="training grids")
    p.add_argument("--valid", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    write_base(a.out / "base")
    data = a.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_grids(data / "train.jsonl", a.seed, a.train)
    write_grids(data / "valid.jsonl", a.seed + 1, a.valid)
    write_grids(data / "test.jsonl", a.seed + 2, a.valid)
    print(f"wrote {a.out}/base and {a.train} training grids to {data}")


if __name__ == "__main__":
    main()
