"""Make the Sudoku recipe's data and base model directory (config, tokenizer), from a seed.

    python recipes/sudoku/prepare.py --out recipes/sudoku/work --train 200000

writes ``OUT/data/{train,valid,test}.jsonl`` (``{"text": ...}`` rows: complete grids as cell tokens;
the model learns to complete any subset of revealed cells, and solving pins the givens) and
``OUT/base/`` (``config.json``, ``generation_config.json``, a word-level tokenizer of the 729 cell
tokens, and initial weights whose embedding table is factorized by digit, row, column and box:
:func:`factorized_embedding`) for ``dgemma train --fine-tune-type full``. Held-out evaluation puzzles (unique solutions, by
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


def factorized_embedding(vocab: int, dims: int, seed: int):
    """An embedding table [vocab, dims] whose cell token ``<rRcC:D>`` is ``(digit[D] + row[R] +
    column[C] + box[B]) / 2``, each of the 36 vectors drawn like MLX's default embedding init
    (std ``dims**-0.5``); other ids keep a plain draw. Every token starts out sharing its digit
    with 80 others and its row, column and box with 8 others each, so attention to peers and
    "this digit is taken" are linear from the first step (the head is tied, so the digit also
    sits in the output logits). With a plain init the model spent 48k grids copying the visible
    cells at chance accuracy on the hidden ones."""
    import numpy as np

    rng = np.random.default_rng(seed)
    std = dims**-0.5
    table = rng.normal(0, std, (vocab, dims))
    digit, row, col, box = (rng.normal(0, std, (9, dims)) for _ in range(4))
    for cell in range(81):
        r, c = divmod(cell, 9)
        for d in range(1, 10):
            v = digit[d - 1] + row[r] + col[c] + box[(r // 3) * 3 + c // 3]
            table[sudoku.cell_token(cell, d)] = v / 2
    return table.astype(np.float32)


def write_initial_weights(path: Path, seed: int) -> None:
    """``OUT/base/model.safetensors``: DiffusionGemma's default random init (seeded) with the
    :func:`factorized_embedding`; train it with ``dgemma train --fine-tune-type full``."""
    import mlx.core as mx

    from dgemma_mlx.config import ModelArgs
    from dgemma_mlx.loading import load_config
    from dgemma_mlx.model import Model
    from dgemma_mlx.train.checkpoint import save_model

    args = ModelArgs.from_config(load_config(path))
    mx.random.seed(seed)
    model = Model(args)
    model.set_dtype(mx.float32)
    model.embed_tokens.weight = mx.array(factorized_embedding(args.vocab_size, args.hidden_size, seed))
    import shutil

    tmp = path.parent / (path.name + ".init")
    save_model(model, path, tmp)
    for f in tmp.glob("model*"):
        f.replace(path / f.name)
    shutil.rmtree(tmp)


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
    write_initial_weights(a.out / "base", a.seed)
    data = a.out / "data"
    data.mkdir(parents=True, exist_ok=True)
    write_grids(data / "train.jsonl", a.seed, a.train)
    write_grids(data / "valid.jsonl", a.seed + 1, a.valid)
    write_grids(data / "test.jsonl", a.seed + 2, a.valid)
    print(f"wrote {a.out}/base and {a.train} training grids to {data}")


if __name__ == "__main__":
    main()
